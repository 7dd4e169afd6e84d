"""`manage.py check --deploy --fail-level WARNING` is honest: it passes with the documented
production environment and fails, naming the setting, when one is unsafe."""

from __future__ import annotations

import secrets

import pytest

from tests.conftest import TEST_REDIS_URL, run_manage, subprocess_env

CHECK = ("check", "--deploy", "--fail-level", "WARNING")


def production(**overrides: str) -> dict[str, str]:
    """The environment README's "Production" section documents, on a fresh machine."""
    env = subprocess_env(
        DEBUG="false",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="keyroute.example.com",
        CSRF_TRUSTED_ORIGINS="https://keyroute.example.com",
        DATABASE_URL="postgres://keyroute:unused@127.0.0.1:5432/keyroute",
        CACHE_URL=TEST_REDIS_URL,
    )
    # Only what the operator sets: the defaults of a production site, not the tests'.
    for name in ("SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE"):
        env.pop(name)
    env.update(overrides)
    return env


def test_the_documented_production_environment_passes():
    result = run_manage(*CHECK, env=production())

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("SECURE_SSL_REDIRECT", "false", "SECURE_SSL_REDIRECT"),
        ("SECURE_HSTS_SECONDS", "0", "SECURE_HSTS_SECONDS"),
        ("SECURE_HSTS_INCLUDE_SUBDOMAINS", "false", "SECURE_HSTS_INCLUDE_SUBDOMAINS"),
        ("SECURE_HSTS_PRELOAD", "false", "SECURE_HSTS_PRELOAD"),
        ("SESSION_COOKIE_SECURE", "false", "SESSION_COOKIE_SECURE"),
        ("CSRF_COOKIE_SECURE", "false", "CSRF_COOKIE_SECURE"),
        ("DEBUG", "true", "DEBUG"),
        ("SECRET_KEY", "short-and-weak", "SECRET_KEY"),
    ],
)
def test_an_unsafe_setting_fails_the_check_and_is_named(variable, value, named):
    result = run_manage(*CHECK, env=production(**{variable: value}))

    assert result.returncode == 1
    assert named in result.stderr


def test_one_worker_may_keep_its_cache_in_local_memory():
    result = run_manage(*CHECK, env=production(CACHE_URL="locmemcache://"))

    assert result.returncode == 0, result.stderr


def test_several_workers_on_a_local_memory_cache_fail_the_check_and_say_why():
    env = production(CACHE_URL="locmemcache://", WEB_CONCURRENCY="2")

    result = run_manage(*CHECK, env=env)

    assert result.returncode == 1
    assert "platform_site.W001" in result.stderr
    assert "CACHE_URL is local memory, and WEB_CONCURRENCY=2 workers" in result.stderr


def test_djangos_security_checks_see_djangos_middleware():
    result = run_manage("check", "--deploy", env=production(SECURE_HSTS_SECONDS="0"))

    # W001-W003 would say the middleware is missing and hide the checks that need it.
    assert "security.W001" not in result.stderr
    assert "security.W002" not in result.stderr
    assert "security.W003" not in result.stderr
    assert "security.W004" in result.stderr


def test_a_proxy_ssl_header_is_read_from_one_variable():
    result = run_manage(
        "shell",
        "-c",
        "from django.conf import settings; print(settings.SECURE_PROXY_SSL_HEADER)",
        env=production(SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto,https"),
    )

    assert result.stdout.strip().endswith("('HTTP_X_FORWARDED_PROTO', 'https')")


@pytest.mark.parametrize("value", ["X-Forwarded-Proto", ",https", "X Forwarded,https"])
def test_a_malformed_proxy_ssl_header_stops_start_up(value):
    result = run_manage("check", env=production(SECURE_PROXY_SSL_HEADER=value))

    assert result.returncode == 1
    assert "Unexpected value SECURE_PROXY_SSL_HEADER=" in result.stderr
    assert "X-Forwarded-Proto,https" in result.stderr
