"""System checks of the credentials app: encryption keys (E001, E002), base URLs (E003)."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from django.core import checks
from django.core.checks import run_checks

from tests.conftest import TEST_FERNET_KEY, run_manage, subprocess_env

OURS = {"credentials.E001", "credentials.E002", "credentials.E003"}


def ours(check_id: str | None = None) -> list[checks.CheckMessage]:
    return [
        message
        for message in run_checks()
        if message.id in OURS and (check_id is None or message.id == check_id)
    ]


def test_it_accepts_valid_keys(settings):
    settings.CREDENTIALS_ENCRYPTION_KEYS = [Fernet.generate_key().decode(), TEST_FERNET_KEY]

    assert ours() == []


def test_it_refuses_empty_keys(settings):
    settings.CREDENTIALS_ENCRYPTION_KEYS = []

    (error,) = ours()

    assert error.id == "credentials.E001"
    assert error.level == checks.ERROR
    assert "CREDENTIALS_ENCRYPTION_KEYS is empty" in error.msg
    assert "generate_encryption_key" in str(error.hint)


def test_it_refuses_a_malformed_key_by_position_not_value(settings):
    settings.CREDENTIALS_ENCRYPTION_KEYS = [TEST_FERNET_KEY, "not-a-fernet-key"]

    (error,) = ours()

    assert error.id == "credentials.E002"
    assert error.level == checks.ERROR
    assert "Key number 2" in error.msg
    assert "not-a-fernet-key" not in error.msg
    assert "not-a-fernet-key" not in str(error.hint)
    assert TEST_FERNET_KEY not in error.msg + str(error.hint)
    assert "generate_encryption_key" in str(error.hint)


def test_it_never_shows_a_nearly_valid_key(settings):
    # One character short: the rest of it is as secret as a whole key.
    truncated = Fernet.generate_key().decode()[:-1]
    settings.CREDENTIALS_ENCRYPTION_KEYS = [truncated, "sk-test-fake-not-a-key-0001"]

    errors = ours()

    assert [error.id for error in errors] == ["credentials.E002", "credentials.E002"]
    assert "Key number 1" in errors[0].msg
    assert "Key number 2" in errors[1].msg
    for error in errors:
        shown = f"{error.msg} {error.hint!s} {error}"
        assert truncated[:12] not in shown
        assert "not-a-key-0001" not in shown


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("OPENAI_BASE_URL", "http://169.254.169.254/v1"),
        ("OPENAI_INTERNAL_BASE_URL", "http://metadata.google.internal"),
        ("LLM_FAILOVER_BASE_URL", "http://0xa9fea9fe/v1"),
    ],
)
def test_it_refuses_a_metadata_base_url(settings, name, url):
    setattr(settings, name, url)

    errors = ours("credentials.E003")

    assert len(errors) == 1
    assert errors[0].level == checks.ERROR
    assert errors[0].msg.startswith(f"{name} is refused")
    assert name in str(errors[0].hint)


def test_it_refuses_default_base_urls_outside_the_allowed_hosts(settings):
    settings.LLM_ALLOWED_BASE_URL_HOSTS = ["litellm"]
    assert settings.OPENAI_BASE_URL == "https://api.openai.com/v1"

    errors = ours("credentials.E003")

    names = [error.msg.split()[0] for error in errors]
    assert "OPENAI_BASE_URL" in names
    assert all("api.openai.com is not in LLM_ALLOWED_BASE_URL_HOSTS" in e.msg for e in errors)


def test_it_accepts_base_urls_on_the_allowed_hosts(settings):
    settings.LLM_ALLOWED_BASE_URL_HOSTS = ["litellm"]
    settings.OPENAI_BASE_URL = "http://litellm:4000/v1"
    settings.OPENAI_INTERNAL_BASE_URL = "http://litellm:4000/v1"

    assert ours("credentials.E003") == []


def test_it_does_not_echo_credentials_in_a_base_url(settings):
    settings.OPENAI_BASE_URL = "http://user:sk-test-fake-in-url-0001@litellm:4000/v1"

    (error,) = ours("credentials.E003")

    assert "sk-test-fake-in-url-0001" not in f"{error.msg} {error.hint!s}"


def test_manage_check_fails_without_keys():
    result = run_manage("check", env=subprocess_env(CREDENTIALS_ENCRYPTION_KEYS=""))

    assert result.returncode != 0
    assert "credentials.E001" in result.stdout + result.stderr
    assert "generate_encryption_key" in result.stdout + result.stderr


def test_manage_check_passes_with_a_valid_key():
    result = run_manage("check", env=subprocess_env())

    assert result.returncode == 0, result.stderr
    assert "credentials.E00" not in result.stdout + result.stderr
