"""Sign-in throttling (django-axes, platform_site/throttle.py) on both sign-in pages.

Failures are counted per user name *and* client address: after LOGIN_FAILURE_LIMIT of
them, that pair is refused (429, a page saying why and when to try again) until
LOGIN_COOLOFF_MINUTES have passed since the last one, or an admin deletes the attempt.
The address is REMOTE_ADDR (uvicorn puts the proxy's client there, from
FORWARDED_ALLOW_IPS); X-Forwarded-For counts only from LOGIN_TRUSTED_PROXIES.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from axes.models import AccessAttempt  # type: ignore[import-untyped]
from django.conf import settings as django_settings
from django.contrib.auth import SESSION_KEY
from django.test import Client
from django.urls import reverse

from tests.conftest import run_python, signed_in, subprocess_env

PASSWORD = "right-Pw-for-tests-4x8q"
WRONG = "wrong-Pw-for-tests-Zz91"
ATTACKER = "203.0.113.7"
SOMEONE_ELSE = "198.51.100.20"
PROXY = "10.0.0.2"
PAGES = ["/accounts/login/", "/admin/login/"]
LOCKED = "Too many failed sign-in attempts"


@pytest.fixture
def fast_hashing(settings: Any) -> None:
    """Passwords checked in microseconds, not a second each: the tests check dozens."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def admin_user(fast_hashing: None, django_user_model: Any) -> Any:
    return django_user_model.objects.create_superuser("admin", password=PASSWORD)


def sign_in(
    page: str, password: str, *, address: str = ATTACKER, browser: Client | None = None, **meta: Any
) -> Any:
    browser = browser or Client()
    return browser.post(
        page, {"username": "admin", "password": password}, REMOTE_ADDR=address, **meta
    )


def signed_in_ok(response: Any) -> bool:
    return response.status_code == 302 and SESSION_KEY in response.client.session


def fail(page: str, times: int, **kwargs: Any) -> None:
    for _ in range(times):
        response = sign_in(page, WRONG, **kwargs)
        assert response.status_code in {200, 429}
        assert not signed_in_ok(response)


@pytest.mark.parametrize("page", PAGES)
def test_fifty_wrong_passwords_then_the_right_one_is_refused(db, admin_user, page):
    fail(page, 50)

    response = sign_in(page, PASSWORD)

    assert response.status_code == 429
    assert not signed_in_ok(response)
    text = response.content.decode()
    assert LOCKED in text
    assert "try again in 15 minutes" in text
    assert response["Retry-After"] == str(15 * 60)
    assert PASSWORD not in text
    assert WRONG not in text


@pytest.mark.parametrize("page", PAGES)
def test_the_limit_is_the_setting_and_the_right_password_before_it_works(
    db, admin_user, page, settings
):
    settings.AXES_FAILURE_LIMIT = 3
    fail(page, 2)

    assert signed_in_ok(sign_in(page, PASSWORD))
    # A success starts the count afresh.
    fail(page, 2)
    assert signed_in_ok(sign_in(page, PASSWORD))
    fail(page, 3)
    assert sign_in(page, PASSWORD).status_code == 429


def test_the_same_user_from_another_address_is_not_locked_out(db, admin_user):
    # Locking by user name alone would let anyone lock the admin out from anywhere.
    fail(PAGES[1], 10)

    assert sign_in(PAGES[1], PASSWORD).status_code == 429
    assert signed_in_ok(sign_in(PAGES[1], PASSWORD, address=SOMEONE_ELSE))


def test_a_rotated_x_forwarded_for_does_not_escape_the_lock_by_default(db, admin_user):
    fail(PAGES[0], 10)

    for n in range(5):
        spoofed = sign_in(PAGES[0], PASSWORD, HTTP_X_FORWARDED_FOR=f"192.0.2.{n + 1}")
        assert spoofed.status_code == 429


def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(db, admin_user, settings):
    settings.LOGIN_TRUSTED_PROXIES = ["10.0.0.0/24"]
    through_proxy: dict[str, Any] = {"address": PROXY}
    fail(PAGES[1], 10, HTTP_X_FORWARDED_FOR=ATTACKER, **through_proxy)

    # The proxy's other clients are not locked out ...
    other = sign_in(PAGES[1], PASSWORD, HTTP_X_FORWARDED_FOR=SOMEONE_ELSE, **through_proxy)
    assert signed_in_ok(other)
    # ... the attacker is, whatever they add in front: the proxy appends the address it
    # saw, so the right-most address that is not a trusted proxy is the client.
    for forwarded in (ATTACKER, f"{SOMEONE_ELSE}, {ATTACKER}", f"{ATTACKER}, 10.0.0.3"):
        refused = sign_in(PAGES[1], PASSWORD, HTTP_X_FORWARDED_FOR=forwarded, **through_proxy)
        assert refused.status_code == 429, forwarded
    # An address that is not a trusted proxy is judged by itself, not by its header.
    direct = sign_in(PAGES[1], PASSWORD, address=SOMEONE_ELSE, HTTP_X_FORWARDED_FOR=ATTACKER)
    assert signed_in_ok(direct)


def test_after_the_cool_off_the_right_password_works(db, admin_user):
    fail(PAGES[0], 10)
    assert sign_in(PAGES[0], PASSWORD).status_code == 429

    # 15 minutes pass since the last failure (the refused sign-in above counts as one).
    AccessAttempt.objects.update(
        attempt_time=AccessAttempt.objects.get().attempt_time - timedelta(minutes=15, seconds=1)
    )

    assert signed_in_ok(sign_in(PAGES[0], PASSWORD))


def test_an_admin_lifts_the_lock_by_deleting_the_attempt(db, admin_user, django_user_model):
    fail(PAGES[1], 10)
    attempt = AccessAttempt.objects.get()
    assert (attempt.username, attempt.ip_address) == ("admin", ATTACKER)
    other_admin = django_user_model.objects.create_superuser("other", password=PASSWORD)
    unlocking = Client()
    unlocking.force_login(other_admin)

    listed = unlocking.get(reverse("admin:axes_accessattempt_changelist"))
    deleted = unlocking.post(
        reverse("admin:axes_accessattempt_delete", args=[attempt.pk]), {"post": "yes"}
    )

    assert listed.status_code == 200
    assert ATTACKER in listed.content.decode()
    assert deleted.status_code == 302
    assert signed_in_ok(sign_in(PAGES[1], PASSWORD))


def test_the_lockout_page_shows_neither_password(db, admin_user):
    fail(PAGES[0], 5)

    for password in (WRONG, PASSWORD):
        text = sign_in(PAGES[0], password).content.decode()
        assert LOCKED in text
        assert WRONG not in text
        assert PASSWORD not in text
    for attempt in AccessAttempt.objects.all():
        assert WRONG not in attempt.post_data
        assert PASSWORD not in attempt.post_data


# ---- the site under uvicorn (ASGI, as in production) ------------------------------------


def test_the_site_under_uvicorn_locks_out_and_says_so(start_site, django_user_model):
    django_user_model.objects.create_user("alice", password=PASSWORD)
    site = start_site(LOGIN_FAILURE_LIMIT="3", LOGIN_COOLOFF_MINUTES="2")
    first = site.request("GET", "/accounts/login/")
    headers = first.follow({})
    csrf = first.cookies()["csrftoken"]

    def attempt(password: str) -> Any:
        body = f"username=alice&password={password}&csrfmiddlewaretoken={csrf}"
        return site.request("POST", "/accounts/login/", headers=headers, body=body)

    answers = [attempt(WRONG).status for _ in range(3)]
    refused = attempt(PASSWORD)

    assert answers == [200, 200, 429]
    assert refused.status == 429
    text = refused.content.decode()
    assert LOCKED in text
    assert "try again in 2 minutes" in text
    assert PASSWORD not in text
    assert refused.headers["Retry-After"] == "120"
    # Another user is not locked out from the same address.
    django_user_model.objects.create_user("bob", password=PASSWORD)
    body = f"username=bob&password={PASSWORD}&csrfmiddlewaretoken={csrf}"
    bob = site.request("POST", "/accounts/login/", headers=headers, body=body)
    assert bob.status == 302


def test_signing_in_with_force_login_is_unaffected(db, alice):
    headers = signed_in(alice)

    assert "sessionid" in headers["Cookie"]


# ---- settings --------------------------------------------------------------------------

READ = """
import json, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "platform_site.settings")
from django.conf import settings
print(json.dumps({"limit": settings.AXES_FAILURE_LIMIT,
                  "cool_off": settings.AXES_COOLOFF_TIME.total_seconds(),
                  "proxies": settings.LOGIN_TRUSTED_PROXIES,
                  "parameters": settings.AXES_LOCKOUT_PARAMETERS}))
"""


def test_the_settings_come_from_the_environment():
    result = run_python(
        "-c",
        READ,
        env=subprocess_env(
            LOGIN_FAILURE_LIMIT="7",
            LOGIN_COOLOFF_MINUTES="2.5",
            LOGIN_TRUSTED_PROXIES="10.0.0.0/8, 127.0.0.1",
        ),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        '{"limit": 7, "cool_off": 150.0, "proxies": ["10.0.0.0/8", "127.0.0.1"], '
        '"parameters": [["username", "ip_address"]]}'
    )


def test_the_defaults_lock_after_five_for_fifteen_minutes_and_trust_no_header():
    assert django_settings.AXES_FAILURE_LIMIT == 5
    assert django_settings.AXES_COOLOFF_TIME.total_seconds() == 15 * 60
    assert django_settings.LOGIN_TRUSTED_PROXIES == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOGIN_FAILURE_LIMIT", "0"),
        ("LOGIN_FAILURE_LIMIT", "2.5"),
        ("LOGIN_COOLOFF_MINUTES", "0"),
        ("LOGIN_COOLOFF_MINUTES", "soon"),
        ("LOGIN_TRUSTED_PROXIES", "my-proxy"),
    ],
)
def test_a_bad_value_stops_start_up_and_names_the_variable(name, value):
    result = run_python("-c", READ, env=subprocess_env(**{name: value}))

    assert result.returncode != 0
    assert f"Unexpected value {name}=" in result.stderr
