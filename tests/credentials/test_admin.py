from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse
from django.utils import timezone

from credentials.models import APIKeyCredentials
from tests.conftest import FAKE_KEY, raw_api_key

ADD_URL = reverse("admin:credentials_apikeycredentials_add")
LIST_URL = reverse("admin:credentials_apikeycredentials_changelist")


def change_url(credential: APIKeyCredentials) -> str:
    return reverse("admin:credentials_apikeycredentials_change", args=[credential.pk])


def form_data(**overrides: str) -> dict[str, str]:
    data = {
        "title": "Team LiteLLM",
        "provider": "litellm",
        "owner": "",
        "api_key": FAKE_KEY,
        "base_url": "http://litellm:4000/v1/",
        "fallback": "",
        "is_active": "on",
        "expires_at_0": "",
        "expires_at_1": "",
        "_save": "Save",
    }
    data.update(overrides)
    return data


def test_it_adds_a_credential_through_the_form_encrypted(admin_client):
    response = admin_client.post(ADD_URL, form_data())

    assert response.status_code == 302
    credential = APIKeyCredentials.objects.get()
    assert credential.base_url == "http://litellm:4000/v1"
    assert credential.key_hint == FAKE_KEY[-4:]
    assert FAKE_KEY not in raw_api_key(credential.pk)
    assert credential.api_key.get_secret_value() == FAKE_KEY
    assert response.wsgi_request.sensitive_post_parameters == ("api_key",)


def test_it_requires_the_key_when_adding(admin_client):
    response = admin_client.post(ADD_URL, form_data(api_key=""))

    assert response.status_code == 200
    assert "This field is required" in response.content.decode()
    assert not APIKeyCredentials.objects.exists()


def test_no_page_ever_shows_the_key(admin_client, credential_factory):
    credential = credential_factory(title="Shown everywhere", base_url="http://litellm:4000/v1")
    admin_client.post(
        change_url(credential), form_data(title="Renamed", base_url=credential.base_url)
    )
    history = reverse("admin:credentials_apikeycredentials_history", args=[credential.pk])
    pages = [LIST_URL, change_url(credential), history, reverse("admin:index"), ADD_URL]

    for url in pages:
        response = admin_client.get(url)
        assert response.status_code == 200, url
        assert FAKE_KEY not in response.content.decode(), url
    assert "…" + FAKE_KEY[-4:] in admin_client.get(LIST_URL).content.decode()
    assert all(FAKE_KEY not in entry.change_message for entry in LogEntry.objects.all())


def test_a_rejected_form_does_not_echo_the_key(admin_client):
    response = admin_client.post(ADD_URL, form_data(base_url="http://169.254.169.254/v1"))

    page = response.content.decode()
    assert "Link-local and cloud-metadata addresses are never allowed" in page
    assert FAKE_KEY not in page


def test_editing_without_a_key_keeps_the_stored_one(admin_client, credential_factory):
    credential = credential_factory(base_url="http://litellm:4000/v1")
    token = raw_api_key(credential.pk)

    response = admin_client.post(
        change_url(credential), form_data(title="Renamed", api_key="", base_url=credential.base_url)
    )

    assert response.status_code == 302
    credential.refresh_from_db()
    assert credential.title == "Renamed"
    assert raw_api_key(credential.pk) == token
    assert "API key" not in LogEntry.objects.get().change_message


def test_changing_the_base_url_without_the_key_is_refused(admin_client, credential_factory):
    credential = credential_factory(base_url="http://litellm:4000/v1")

    response = admin_client.post(
        change_url(credential), form_data(api_key="", base_url="http://elsewhere.example/v1")
    )

    assert response.status_code == 200
    assert "enter the key again" in response.content.decode()
    credential.refresh_from_db()
    assert credential.base_url == "http://litellm:4000/v1"


def test_changing_the_base_url_with_the_key_is_accepted(admin_client, credential_factory):
    credential = credential_factory(base_url="http://litellm:4000/v1")

    response = admin_client.post(
        change_url(credential),
        form_data(api_key="sk-test-fake-again-0003", base_url="http://elsewhere.example/v1"),
    )

    assert response.status_code == 302
    credential.refresh_from_db()
    assert credential.base_url == "http://elsewhere.example/v1"
    assert credential.api_key.get_secret_value() == "sk-test-fake-again-0003"
    assert LogEntry.objects.get().change_message  # "Changed API key and base URL."
    assert "sk-test-fake-again-0003" not in LogEntry.objects.get().change_message


def test_it_shows_the_effective_route(admin_client, credential_factory, settings):
    settings.OPENAI_BASE_URL = "http://global-proxy:4000/v1"
    settings.OPENAI_INTERNAL_BASE_URL = "http://internal-proxy:4000/v1"
    own = credential_factory(title="Own", base_url="http://own-proxy:4000/v1")
    default = credential_factory(title="Default", base_url="")

    listing = admin_client.get(LIST_URL).content.decode()

    assert 'http://own-proxy:4000/v1<br><small class="quiet">credential</small>' in listing
    assert (
        'http://global-proxy:4000/v1<br><small class="quiet">global default OPENAI_BASE_URL'
        in listing
    )
    page = admin_client.get(change_url(default)).content.decode()
    assert (
        "embeddings: http://internal-proxy:4000/v1 (global default OPENAI_INTERNAL_BASE_URL)"
        in page
    )
    assert (
        "Every purpose: http://own-proxy:4000/v1 (credential)"
        in admin_client.get(change_url(own)).content.decode()
    )


def listed_titles(admin_client, query: str) -> set[str]:
    response = admin_client.get(LIST_URL + query)
    assert response.status_code == 200
    return {c.title for c in response.context["cl"].result_list}


def test_filters_and_search_work(admin_client, credential_factory, django_user_model):
    alice = django_user_model.objects.create_user("alice")
    credential_factory(
        title="Shared LiteLLM", provider="litellm", base_url="http://litellm:4000/v1"
    )
    credential_factory(title="Alice OpenRouter", provider="openrouter", owner=alice)
    credential_factory(title="Old OpenAI", provider="openai", is_active=False)
    credential_factory(
        title="Expired", provider="other", expires_at=timezone.now() - timedelta(days=1)
    )

    assert listed_titles(admin_client, "?provider__exact=openrouter") == {"Alice OpenRouter"}
    assert listed_titles(admin_client, "?is_active__exact=0") == {"Old OpenAI"}
    assert listed_titles(admin_client, "?ownership=owned") == {"Alice OpenRouter"}
    assert "Alice OpenRouter" not in listed_titles(admin_client, "?ownership=shared")
    assert listed_titles(admin_client, "?expired=yes") == {"Expired"}
    assert "Expired" not in listed_titles(admin_client, "?expired=no")
    assert listed_titles(admin_client, "?q=alice") == {"Alice OpenRouter"}
    assert listed_titles(admin_client, "?q=litellm:4000") == {"Shared LiteLLM"}
    assert "shared" in admin_client.get(LIST_URL).content.decode()


@pytest.mark.parametrize("lookup", ["api_key", "api_key__startswith", "key_hint__exact"])
def test_it_refuses_lookups_on_the_key(admin_client, credential_factory, lookup):
    credential_factory()

    response = admin_client.get(f"{LIST_URL}?{lookup}=sk-")

    assert response.status_code == 400


def test_actions_activate_and_deactivate(admin_client, credential_factory):
    credential = credential_factory(is_active=True)

    admin_client.post(LIST_URL, {"action": "deactivate", "_selected_action": [str(credential.pk)]})
    credential.refresh_from_db()
    assert credential.is_active is False

    response = admin_client.post(
        LIST_URL, {"action": "activate", "_selected_action": [str(credential.pk)]}, follow=True
    )
    credential.refresh_from_db()
    assert credential.is_active is True
    assert "1 credential(s) activated." in response.content.decode()


def test_the_key_box_never_renders_a_value(admin_client, credential_factory):
    credential = credential_factory()

    page = admin_client.get(change_url(credential)).content.decode()

    assert 'type="password" name="api_key"' in page
    assert "Leave blank to keep it" in page


GARBAGE = [
    "abc",
    "1 OR 1=1",
    "1; DROP TABLE auth_user",
    "99999999999999999999999",
    "9223372036854775808",
    "-9223372036854775809",
    "2147483648",
    "1.5",
    "1e3",
    "0x1",
    " 1 ",
    "1\x00",
    "\x00",
    "\u202e1",
    "١",  # an Arabic-Indic digit one: int() takes it, a form should not
    "x" * 5000,
]


@pytest.fixture
def superuser_client(client, django_user_model):
    """A superuser's client (no password: hashing one costs more than the test), that
    answers a 500 as a page instead of raising it."""
    client.raise_request_exception = False
    client.force_login(
        django_user_model.objects.create_user("root", is_staff=True, is_superuser=True)
    )
    return client


@pytest.mark.parametrize("field", ["owner", "fallback"])
@pytest.mark.parametrize("value", GARBAGE, ids=lambda value: ascii(value)[:30])
@pytest.mark.parametrize("page", ["add", "change"])
def test_garbage_in_a_choice_field_is_a_form_error(
    superuser_client, credential_factory, alice, field, value, page
):
    client = superuser_client
    existing = credential_factory(title="Existing", owner=alice)
    url = ADD_URL if page == "add" else change_url(existing)

    response = client.post(url, form_data(title="Garbage", **{field: value}))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == [field]
    assert errors[field][0] in response.content.decode()
    assert not APIKeyCredentials.objects.filter(title="Garbage").exists()
    assert APIKeyCredentials.objects.get(pk=existing.pk).owner == alice


def test_bytes_that_are_not_utf8_in_the_owner_field_are_a_form_error(superuser_client):
    client = superuser_client
    body = urlencode(form_data(owner="1")).replace("owner=1", "owner=%ED%A0%80%FF")

    response = client.post(ADD_URL, body, content_type="application/x-www-form-urlencoded")

    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert not APIKeyCredentials.objects.exists()


def test_a_real_owner_is_still_accepted(admin_client, alice):
    response = admin_client.post(ADD_URL, form_data(owner=str(alice.pk)))

    assert response.status_code == 302
    assert APIKeyCredentials.objects.get().owner == alice
