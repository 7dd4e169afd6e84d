"""Spend control in the playground: only the allowed models are suggested, the budget
left shows under the credential, and refusals appear as their sentence."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from playwright.sync_api import expect

from credentials.models import APIKeyCredentials
from tests.browser.test_playground_browser import USER_PASSWORD, sign_in

ALICE_KEY = "sk-test-fake-alice-Lm41Kq93"


def next_month() -> str:
    now = datetime.now(UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return f"1 {datetime(year, month, 1):%B %Y}"


def send(page, prompt: str) -> None:
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()


def test_the_playground_suggests_only_the_allowed_models_and_refuses_others(
    asgi_server, django_user_model, start_upstream, page
):
    alice = django_user_model.objects.create_user("alice", password=USER_PASSWORD)
    upstream = start_upstream(models=["gpt-test-mini", "gpt-test-large", "embed-test"])
    credential = APIKeyCredentials(
        title="Team mini",
        owner=alice,
        api_key=ALICE_KEY,
        base_url=upstream.base_url,
        allowed_models=["gpt-test-mini", "embed-*"],
    )
    credential.save()

    sign_in(page, asgi_server, "alice")
    page.get_by_label("Credential").select_option(str(credential.pk))

    suggested = page.locator("#models option")
    expect(suggested).to_have_count(2)
    assert sorted(o.get_attribute("value") for o in suggested.all()) == [
        "embed-test",
        "gpt-test-mini",
    ]
    expect(page.locator("#budget")).to_be_hidden()  # no budget, no line

    page.get_by_label("Model").fill("gpt-test-large")
    send(page, "may I?")

    error = page.locator("#error")
    expect(error).to_contain_text("Credential 'Team mini' may not use the model 'gpt-test-large'")
    expect(error).to_contain_text("it allows gpt-test-mini, embed-*")
    assert {r.path for r in upstream.requests} == {"/v1/models"}  # the suggestions only
    assert ALICE_KEY not in page.content()


def test_the_budget_left_shows_and_changes_after_each_send(
    asgi_server, django_user_model, start_upstream, page
):
    alice = django_user_model.objects.create_user("alice", password=USER_PASSWORD)
    upstream = start_upstream(cost="0.003")
    budgeted = APIKeyCredentials(
        title="Team budget",
        owner=alice,
        api_key=ALICE_KEY,
        base_url=upstream.base_url,
        monthly_budget_usd=Decimal("1000"),
        user_monthly_budget_usd=Decimal("0.004"),
    )
    budgeted.save()
    free = APIKeyCredentials(
        title="Free", owner=alice, api_key=ALICE_KEY, base_url=upstream.base_url
    )
    free.save()
    resets = f"(resets {next_month()})"

    sign_in(page, asgi_server, "alice")
    credential, line = page.get_by_label("Credential"), page.locator("#budget")
    credential.select_option(str(free.pk))
    expect(line).to_be_hidden()
    credential.select_option(str(budgeted.pk))
    expect(line).to_have_text(
        f"Budget this month: $1,000.00 left of $1,000.00 {resets}; your cap: $0.004 left of $0.004"
    )

    page.get_by_label("Model").fill("gpt-test-mini")
    send(page, "one")
    expect(page.locator("#answer")).to_have_text("echo: one")
    expect(line).to_have_text(
        f"Budget this month: $999.997 left of $1,000.00 {resets}; your cap: $0.001 left of $0.004"
    )

    send(page, "two")
    expect(line).to_have_text(
        f"Budget this month: $999.994 left of $1,000.00 {resets}; your cap: $0.00 left of $0.004"
    )

    send(page, "three")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(
        "You have spent $0.006 of your $0.004 monthly cap on credential 'Team budget'"
    )
    expect(error).to_contain_text(f"it resets on {next_month()} at 00:00 UTC")
    expect(page.locator("#result")).to_be_hidden()
    assert len([r for r in upstream.requests if r.path == "/v1/chat/completions"]) == 2
    assert ALICE_KEY not in page.content()
