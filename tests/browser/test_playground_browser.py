"""A user signs in, picks a credential and chats with it in a real browser."""

from __future__ import annotations

from playwright.sync_api import expect

from credentials.models import APIKeyCredentials
from llm.models import UsageRecord

USER_PASSWORD = "browser-test-only-Pw-2x9q"
ALICE_KEY = "sk-test-fake-alice-Zz81Yy72"
BOB_KEY = "sk-test-fake-bob-Xx63Ww54"


def sign_in(page, base_url: str, username: str) -> None:
    page.goto(base_url + "/llm/")
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(USER_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base_url + "/llm/")


def test_a_user_chats_through_their_credential_and_sees_the_route(
    asgi_server, django_user_model, start_upstream, page, artifacts
):
    alice = django_user_model.objects.create_user("alice", password=USER_PASSWORD)
    bob = django_user_model.objects.create_user("bob", password=USER_PASSWORD)
    upstream = start_upstream(cost="0.0042")
    mine = APIKeyCredentials(
        title="Alice's proxy", owner=alice, api_key=ALICE_KEY, base_url=upstream.base_url
    )
    mine.save()
    APIKeyCredentials(
        title="Bob's proxy", owner=bob, api_key=BOB_KEY, base_url=upstream.base_url
    ).save()

    sign_in(page, asgi_server, "alice")
    credential = page.get_by_label("Credential")
    assert "Bob's proxy" not in credential.inner_text()
    credential.select_option(
        label=f"Alice's proxy · litellm · 127.0.0.1:{upstream.port} · …{ALICE_KEY[-4:]}"
    )
    page.get_by_label("Purpose").select_option("chat")
    page.get_by_label("Model").fill("gpt-test-mini")
    page.get_by_label("Prompt").fill("hello from the browser")
    page.get_by_role("button", name="Send").click()

    expect(page.locator("#answer")).to_have_text("echo: hello from the browser")
    meta = page.locator("#meta")
    expect(meta.locator("[data-field=route]")).to_have_text(
        f"route: credential · 127.0.0.1:{upstream.port}"
    )
    expect(meta.locator("[data-field=cost]")).to_have_text("cost: $0.004200")
    expect(meta).to_contain_text("tokens:")
    expect(meta).to_contain_text("latency:")
    page.screenshot(path=str(artifacts / "playground-chat.png"), full_page=True)

    (request,) = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
    assert request.authorization == f"Bearer {ALICE_KEY}"
    assert request.body["stream"] is True
    assert ALICE_KEY not in page.content()
    record = UsageRecord.objects.get()
    assert (record.credential_id, record.user_id, record.outcome) == (mine.pk, alice.pk, "ok")

    # The choice is remembered: a new visit offers the same credential, purpose and model.
    page.goto(asgi_server + "/llm/")
    expect(page.get_by_label("Credential")).to_have_value(str(mine.pk))
    expect(page.get_by_label("Model")).to_have_value("gpt-test-mini")


def test_a_failing_proxy_shows_a_sentence_not_an_error_page(
    asgi_server, django_user_model, page, artifacts
):
    alice = django_user_model.objects.create_user("alice", password=USER_PASSWORD)
    APIKeyCredentials(
        title="Down proxy", owner=alice, api_key=ALICE_KEY, base_url="http://127.0.0.1:9/v1"
    ).save()

    sign_in(page, asgi_server, "alice")
    page.get_by_label("Model").fill("gpt-test-mini")
    page.get_by_label("Prompt").fill("anyone there?")
    page.get_by_role("button", name="Send").click()

    error = page.locator("#error")
    expect(error).to_contain_text("Could not connect to the LLM proxy at 127.0.0.1:9")
    expect(error).to_contain_text("Is the proxy running?")
    page.screenshot(path=str(artifacts / "playground-error.png"), full_page=True)
    assert ALICE_KEY not in page.content()


def test_a_failover_says_who_served_and_why(
    asgi_server, django_user_model, start_upstream, page, artifacts
):
    alice = django_user_model.objects.create_user("alice", password=USER_PASSWORD)
    upstream = start_upstream()
    backup = APIKeyCredentials(title="Team backup", api_key=BOB_KEY, base_url=upstream.base_url)
    backup.save()
    APIKeyCredentials(
        title="Down proxy",
        owner=alice,
        api_key=ALICE_KEY,
        base_url="http://127.0.0.1:9/v1",
        fallback=backup,
    ).save()

    sign_in(page, asgi_server, "alice")
    page.get_by_label("Credential").select_option(
        label=f"Down proxy · litellm · 127.0.0.1:9 · …{ALICE_KEY[-4:]}"
    )
    page.get_by_label("Model").fill("gpt-test-mini")
    page.get_by_label("Prompt").fill("anyone there?")
    page.get_by_role("button", name="Send").click()

    expect(page.locator("#answer")).to_have_text("echo: anyone there?")
    meta = page.locator("#meta")
    expect(meta.locator("[data-field=route]")).to_have_text(
        f"route: failover · 127.0.0.1:{upstream.port}"
    )
    expect(meta.locator("[data-field=failover]")).to_have_text(
        f"failover: served by Team backup (127.0.0.1:{upstream.port}) because "
        "Down proxy (127.0.0.1:9) was unreachable (connection refused)"
    )
    page.screenshot(path=str(artifacts / "playground-failover.png"), full_page=True)
    assert ALICE_KEY not in page.content()
    assert BOB_KEY not in page.content()
