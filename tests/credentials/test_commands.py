"""`manage.py generate_encryption_key` and `manage.py ensure_admin`."""

from __future__ import annotations

import io
import re

import pytest
from cryptography.fernet import Fernet
from django.contrib.auth import authenticate, get_user_model
from django.core.management import CommandError, call_command

from tests.conftest import run_manage, subprocess_env

PASSWORD = re.compile(r"with password: (\S+)")


def generate_key_without_keys():
    return run_manage("generate_encryption_key", env=subprocess_env(CREDENTIALS_ENCRYPTION_KEYS=""))


def test_it_prints_a_fernet_key_even_without_configured_keys():
    result = generate_key_without_keys()

    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert result.stdout == f"{key}\n"
    assert len(key) == 44
    token = Fernet(key).encrypt(b"sk-test-fake-generated-0001")
    assert Fernet(key).decrypt(token) == b"sk-test-fake-generated-0001"
    # The advice goes to stderr, so `$(manage.py generate_encryption_key)` is the key alone.
    assert "rotate_credential_keys" in result.stderr
    assert key not in result.stderr


def test_it_prints_a_fernet_key_even_with_a_malformed_key():
    result = run_manage(
        "generate_encryption_key",
        env=subprocess_env(CREDENTIALS_ENCRYPTION_KEYS="not-a-fernet-key"),
    )

    assert result.returncode == 0, result.stderr
    Fernet(result.stdout.strip())


def test_it_prints_a_different_key_each_time():
    first = generate_key_without_keys()
    second = generate_key_without_keys()

    assert first.returncode == second.returncode == 0
    assert first.stdout.strip() != second.stdout.strip()


def test_it_creates_a_superuser_with_a_password_that_works(db):
    stdout = io.StringIO()

    call_command("ensure_admin", stdout=stdout, no_color=True)

    output = stdout.getvalue()
    passwords = PASSWORD.findall(output)
    assert len(passwords) == 1
    (password,) = passwords
    assert output.count(password) == 1
    user = get_user_model().objects.get(username="admin")
    assert user.is_superuser
    assert user.is_staff
    assert user.password != password
    assert authenticate(username="admin", password=password) == user
    assert authenticate(username="admin", password=password + "x") is None


def test_it_takes_a_username(db):
    stdout = io.StringIO()

    call_command("ensure_admin", "--username", "operator", stdout=stdout, no_color=True)

    (password,) = PASSWORD.findall(stdout.getvalue())
    user = authenticate(username="operator", password=password)
    assert user is not None
    assert user.is_superuser


def test_it_does_nothing_when_a_superuser_exists(db):
    call_command("ensure_admin", stdout=io.StringIO(), no_color=True)
    users = get_user_model().objects
    before = list(users.values_list("pk", "username", "password"))
    stdout = io.StringIO()

    call_command("ensure_admin", stdout=stdout, no_color=True)

    output = stdout.getvalue()
    assert "nothing to do" in output
    assert "password" not in output.lower()
    assert list(users.values_list("pk", "username", "password")) == before


def test_it_does_nothing_when_another_superuser_exists(db):
    get_user_model().objects.create_superuser(username="someone", password="not-used-0001")
    stdout = io.StringIO()

    call_command("ensure_admin", stdout=stdout, no_color=True)

    assert "password" not in stdout.getvalue().lower()
    assert not get_user_model().objects.filter(username="admin").exists()


def test_it_explains_a_plain_user_holding_the_name(db, django_user_model):
    django_user_model.objects.create_user("admin")

    with pytest.raises(CommandError, match="exists but is not a superuser"):
        call_command("ensure_admin", stdout=io.StringIO())

    assert not django_user_model.objects.filter(is_superuser=True).exists()
