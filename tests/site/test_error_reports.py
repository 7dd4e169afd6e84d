"""Error reports (Django's debug page under DEBUG=true, the e-mails to ADMINS) never show a
key or a secret setting, whatever DEBUG says (platform_site/errors.py).

Django filters sensitive POST fields and variables only when DEBUG is false, and `make
run` writes DEBUG=true: the debug page showed the key an admin had just entered. The
pages here are Django's own, rendered by `technical_500_response` as the handler does,
or produced by the handler itself (the admin, a database that refuses the save).
"""

from __future__ import annotations

import sys
from typing import Any

import openai
import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory
from django.urls import reverse
from django.views.debug import technical_500_response

from credentials.models import APIKeyCredentials

# Distinctive, obviously fake keys: one shaped like an OpenAI/LiteLLM key, one not.
SK_KEY = "sk-test-fake-debugpage-7Qx2Lm9W"
PLAIN_KEY = "test-fake-no-prefix-Wq7Zr2Np"
IN_A_URL = "test-fake-url-password-Hs4Tt8"
SESSION_ID = "testsessionfakeid0042abcdefghijkl"
VISIBLE_MESSAGE = "the widget broke while saving"
VISIBLE_LOCAL = "a-harmless-local-0042"

HTML = "text/html"
TEXT = "text/plain"


def secrets_of_the_settings() -> list[str]:
    return [django_settings.SECRET_KEY, *django_settings.CREDENTIALS_ENCRYPTION_KEYS]


def assert_no_secret(page: str, *more: str) -> None:
    for secret in (SK_KEY, PLAIN_KEY, IN_A_URL, SESSION_ID, *secrets_of_the_settings(), *more):
        assert secret not in page, f"{secret!r} is on the error page"


def failing_view(request: HttpRequest) -> HttpResponse:
    """A view that fails holding a key in its locals, as an SDK call's frames do."""
    api_key = PLAIN_KEY
    key = SK_KEY
    headers = {"Authorization": f"Bearer {SK_KEY}", "Accept": "application/json"}
    options = {"url": "/chat/completions", "extra": [f"Bearer {PLAIN_KEY}"]}
    note = VISIBLE_LOCAL
    try:
        raise RuntimeError(VISIBLE_MESSAGE)
    except RuntimeError:
        # Django's handler does exactly this under DEBUG=true.
        return technical_500_response(request, *sys.exc_info())
    finally:
        del api_key, key, headers, options, note


def post(accept: str, **extra: Any) -> HttpRequest:
    factory = RequestFactory()
    factory.cookies[django_settings.SESSION_COOKIE_NAME] = SESSION_ID
    return factory.post(
        f"/somewhere/?token={SK_KEY}&page=2",
        {"title": "Team LiteLLM", "api_key": PLAIN_KEY, "password": PLAIN_KEY, "note": SK_KEY},
        HTTP_ACCEPT=accept,
        HTTP_AUTHORIZATION=f"Bearer {SK_KEY}",
        **extra,
    )


@pytest.mark.parametrize("accept", [HTML, TEXT])
def test_the_debug_page_shows_no_key_posted_held_or_in_the_url(settings, accept):
    settings.DEBUG = True

    response = failing_view(post(accept))
    page = response.content.decode()

    assert response.status_code == 500
    assert response["Content-Type"].startswith(accept)
    assert_no_secret(page)
    # What helps to debug is still there (the text version shows no variables).
    assert VISIBLE_MESSAGE in page
    assert "Team LiteLLM" in page
    assert "page=2" in page
    if accept == HTML:
        assert VISIBLE_LOCAL in page
        assert "/chat/completions" in page
        assert "application/json" in page  # the other headers of the dict


@pytest.mark.parametrize("accept", [HTML, TEXT])
def test_the_debug_page_hides_every_secret_setting(settings, accept):
    settings.DEBUG = True
    settings.BACKUP_TARGET_URL = f"postgres://backup:{IN_A_URL}@db.example:5432/keyroute"
    settings.CACHES = {
        **settings.CACHES,
        "other": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://:{IN_A_URL}@127.0.0.1:6379/11",
        },
    }
    settings.REPORTS_DATABASE = {"HOST": "db.example", "USER": "reports", "PASSWORD": IN_A_URL}
    settings.OPENAI_API_KEY = SK_KEY
    settings.LLM_FAILOVER_API_KEY = PLAIN_KEY
    settings.METRICS_TOKEN = PLAIN_KEY + "-metrics"
    settings.SOME_WEBHOOK_SIGNATURE = PLAIN_KEY + "-signature"

    page = failing_view(post(accept)).content.decode()

    assert_no_secret(page, PLAIN_KEY + "-metrics", PLAIN_KEY + "-signature")
    assert "db.example:5432" in page  # the URL, without its password
    assert "TIME_ZONE" in page  # the other settings are shown


def test_an_sdk_call_that_fails_shows_no_key_in_its_frames(settings, upstream):
    # A real call of the SDK that fails while its frames hold the request's headers: text
    # with a lone surrogate, which it cannot encode (issue 10: such text reached it). The
    # page itself must also render: Django's could not encode the surrogate.
    settings.DEBUG = True
    client = openai.OpenAI(api_key=PLAIN_KEY, base_url=upstream.base_url, max_retries=0)

    def call_the_sdk(request: HttpRequest) -> HttpResponse:
        try:
            client.chat.completions.create(
                model="gpt-test-mini",
                messages=[{"role": "user", "content": "hi \ud800"}],
                extra_headers={"X-Note": VISIBLE_LOCAL},
            )
        except UnicodeEncodeError:
            return technical_500_response(request, *sys.exc_info())
        raise AssertionError("the SDK sent the request")

    try:
        response = call_the_sdk(RequestFactory().get("/", HTTP_ACCEPT=HTML))
    finally:
        client.close()
    page = response.content.decode()

    assert response.status_code == 500
    assert_no_secret(page)
    assert "UnicodeEncodeError" in page
    assert VISIBLE_LOCAL in page
    assert upstream.requests == []


# ---- end to end: the admin, a database that refuses the save, DEBUG=true -----------------

REFUSE_SQLITE = """
CREATE TRIGGER refuse_credentials BEFORE INSERT ON {table}
BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END
"""
REFUSE_POSTGRES = """
CREATE FUNCTION refuse_credentials() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION 'refused by the test trigger'; END $$ LANGUAGE plpgsql;
CREATE TRIGGER refuse_credentials BEFORE INSERT ON {table}
FOR EACH ROW EXECUTE FUNCTION refuse_credentials();
"""


@pytest.fixture
def refusing_database(db: None) -> None:
    """The database refuses every new credential (a trigger: a real database error)."""
    table = APIKeyCredentials._meta.db_table
    sql = REFUSE_SQLITE if connection.vendor == "sqlite" else REFUSE_POSTGRES
    with connection.cursor() as cursor:
        cursor.execute(sql.format(table=table))


def test_the_admin_form_that_fails_under_debug_shows_no_key(
    settings, refusing_database, django_user_model
):
    settings.DEBUG = True
    admin = django_user_model.objects.create_superuser("admin", password="unused-Pw-4x8q")
    browser = Client(raise_request_exception=False)
    browser.force_login(admin)

    response = browser.post(
        reverse("admin:credentials_apikeycredentials_add"),
        {
            "title": "Team LiteLLM",
            "provider": "litellm",
            "owner": "",
            "api_key": PLAIN_KEY,
            "base_url": "http://litellm:4000/v1/",
            "fallback": "",
            "is_active": "on",
            "expires_at_0": "",
            "expires_at_1": "",
            "_save": "Save",
        },
        HTTP_ACCEPT=HTML,
    )
    page = response.content.decode()

    assert response.status_code == 500
    assert "refused by the test trigger" in page  # Django's debug page, with the error
    assert "Team LiteLLM" in page
    assert_no_secret(page)


def test_the_report_mailed_to_admins_shows_no_key(settings, refusing_database, django_user_model):
    # DEBUG=false, as in production: Django mails the report (text and HTML) to ADMINS.
    from django.core import mail

    settings.DEBUG = False
    settings.ADMINS = [("Ops", "ops@example.com")]
    admin = django_user_model.objects.create_superuser("admin", password="unused-Pw-4x8q")
    browser = Client(raise_request_exception=False)
    browser.force_login(admin)

    response = browser.post(
        reverse("admin:credentials_apikeycredentials_add") + f"?token={PLAIN_KEY}",
        {"title": "Team LiteLLM", "provider": "litellm", "api_key": PLAIN_KEY, "_save": "Save"},
        HTTP_AUTHORIZATION=f"Bearer {SK_KEY}",
    )

    assert response.status_code == 500
    assert len(mail.outbox) == 1
    report = mail.outbox[0]
    assert "refused by the test trigger" in report.body
    assert_no_secret(f"{report.subject}\n{report.body}")
