"""An admin adds a credential in a real browser; the key never comes back out."""

from __future__ import annotations

import re

from credentials.models import APIKeyCredentials
from tests.conftest import raw_api_key

# Obviously fake; never a real key.
BROWSER_KEY = "sk-test-fake-browser-Q1w2E3r4T5y6"
ADMIN_PASSWORD = "browser-test-only-Pw-8f3k"
TITLE = "Browser LiteLLM"


def test_an_admin_adds_a_credential_and_the_key_stays_hidden(
    live_server, transactional_db, django_user_model, page, artifacts
):
    django_user_model.objects.create_superuser(
        "browser-admin", "browser-admin@example.com", ADMIN_PASSWORD
    )

    page.goto(live_server.url + "/admin/login/")
    page.get_by_label("Username").fill("browser-admin")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.locator("input[type=submit]").click()
    page.wait_for_url(live_server.url + "/admin/")

    # From the admin index, like a person: the "Add" link of API key credentials.
    page.locator("tr.model-apikeycredentials a.addlink").click()
    page.wait_for_url(re.compile(r"/admin/credentials/apikeycredentials/add/$"))
    page.locator("input[name=title]").fill(TITLE)
    page.locator("select[name=provider]").select_option(label="LiteLLM Proxy")
    key_box = page.locator("input[name=api_key]")
    assert key_box.get_attribute("type") == "password"
    key_box.fill(BROWSER_KEY)
    page.locator("input[name=base_url]").fill("http://litellm:4000/v1")
    page.locator("input[name=_save]").click()

    page.wait_for_url(re.compile(r"/admin/credentials/apikeycredentials/$"))
    changelist = page.content()
    page.screenshot(path=artifacts / "admin-add-credential.png", full_page=True)
    assert "was added successfully" in changelist
    assert TITLE in changelist
    assert "…T5y6" in changelist
    assert BROWSER_KEY not in changelist

    page.locator("#result_list").get_by_role("link", name=TITLE).click()
    page.wait_for_url(re.compile(r"/admin/credentials/apikeycredentials/[0-9a-f-]+/change/$"))
    change_page = page.content()
    assert "http://litellm:4000/v1" in change_page
    assert BROWSER_KEY not in change_page
    assert page.locator("input[name=api_key]").input_value() == ""

    page.get_by_role("link", name="History").click()
    page.wait_for_url(re.compile(r"/history/$"))
    history = page.content()
    assert "Added." in history
    assert BROWSER_KEY not in history

    credential = APIKeyCredentials.objects.get(title=TITLE)
    assert credential.base_url == "http://litellm:4000/v1"
    assert credential.key_hint == "T5y6"
    assert BROWSER_KEY not in raw_api_key(credential.pk)
    assert credential.api_key.get_secret_value() == BROWSER_KEY
