"""An admin fills a credential's allowed models from its /models in a real browser."""

from __future__ import annotations

import re
from decimal import Decimal

from credentials.models import APIKeyCredentials
from llm.models import UsageRecord

# Obviously fake; never a real key.
BROWSER_KEY = "sk-test-fake-browser-limits-H7j8K9"
ADMIN_PASSWORD = "browser-test-only-Pw-3m9q"
MODELS = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]


def sign_in(page, live_server, django_user_model) -> None:
    django_user_model.objects.create_superuser(
        "browser-admin", "browser-admin@example.com", ADMIN_PASSWORD
    )
    page.goto(live_server.url + "/admin/login/")
    page.get_by_label("Username").fill("browser-admin")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.locator("input[type=submit]").click()
    page.wait_for_url(live_server.url + "/admin/")


def test_an_admin_picks_allowed_models_from_the_suggestions(
    live_server, transactional_db, django_user_model, page, artifacts, start_upstream
):
    proxy = start_upstream(models=MODELS)
    credential = APIKeyCredentials(
        title="Team proxy",
        api_key=BROWSER_KEY,
        base_url=proxy.base_url,
        monthly_budget_usd=Decimal(10),
    )
    credential.save()
    UsageRecord.objects.create(
        credential=credential, purpose="chat", model="gpt-4o", total_tokens=10, cost_usd=2
    )
    sign_in(page, live_server, django_user_model)

    page.goto(f"{live_server.url}/admin/credentials/apikeycredentials/{credential.pk}/change/")
    box = page.locator("textarea[name=allowed_models]")
    box.fill("gpt-4o")
    page.get_by_role("button", name="Suggest models from this credential's /models").click()

    chips = page.locator(".model-chip")
    chips.first.wait_for()
    assert chips.all_inner_texts() == MODELS
    assert page.locator(".suggest-status").inner_text() == "3 model(s) from /models."
    assert page.get_by_role("button", name="gpt-4o", exact=True).is_disabled()  # listed already
    page.get_by_role("button", name="text-embedding-3-small").click()
    assert box.input_value() == "gpt-4o\ntext-embedding-3-small"
    assert page.get_by_role("button", name="text-embedding-3-small").is_disabled()
    assert page.locator("meter").get_attribute("value") == "2"
    assert "$2.00 of $10.00 (20%), resets on " in page.locator(".spend-this-month").inner_text()
    page.screenshot(path=artifacts / "admin-allowed-models.png", full_page=True)
    assert BROWSER_KEY not in page.content()

    page.locator("input[name=_continue]").click()
    page.wait_for_url(re.compile(r"/change/$"))
    credential.refresh_from_db()
    assert credential.allowed_models == ["gpt-4o", "text-embedding-3-small"]
    assert credential.api_key.get_secret_value() == BROWSER_KEY
    (request,) = [r for r in proxy.requests if r.path == "/v1/models"]
    assert request.authorization == f"Bearer {BROWSER_KEY}"


def test_a_failed_listing_shows_its_sentence(
    live_server, transactional_db, django_user_model, page, start_upstream
):
    proxy = start_upstream(models=MODELS)
    proxy.respond(status=401, body={"error": {"message": f"bad key {BROWSER_KEY}"}})
    credential = APIKeyCredentials(title="Rejected", api_key=BROWSER_KEY, base_url=proxy.base_url)
    credential.save()
    sign_in(page, live_server, django_user_model)

    page.goto(f"{live_server.url}/admin/credentials/apikeycredentials/{credential.pk}/change/")
    page.get_by_role("button", name="Suggest models from this credential's /models").click()

    status = page.locator(".suggest-status")
    status.filter(has_text="rejected the key").wait_for()
    assert status.inner_text().startswith(
        f"The LLM proxy at 127.0.0.1:{proxy.port} rejected the key of credential 'Rejected' (401)"
    )
    assert page.locator(".model-chip").count() == 0
    assert BROWSER_KEY not in page.content()


def test_the_add_page_asks_to_save_first(live_server, transactional_db, django_user_model, page):
    sign_in(page, live_server, django_user_model)

    page.goto(f"{live_server.url}/admin/credentials/apikeycredentials/add/")

    button = page.get_by_role("button", name="Suggest models from this credential's /models")
    assert button.is_disabled()
    assert page.locator(".suggest-status").inner_text().startswith("Save the credential first")
