from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from credentials.models import APIKeyCredentials
from tests.upstream import Upstream

PROJECT = Path(__file__).resolve().parent.parent
# Obviously fake keys; never real ones.
FAKE_KEY = "sk-test-fake-Zq9xLmN0pQrS7tUv"
GLOBAL_KEY = "sk-test-fake-global-default-0000"
TEST_FERNET_KEY = settings.CREDENTIALS_ENCRYPTION_KEYS[0]


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    django_db_modify_db_settings_parallel_suffix: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    db: dict[str, Any] = settings.DATABASES["default"]
    # Threads of the tests (executors, the usage flusher) must not keep connections to
    # the test database open: PostgreSQL would refuse to drop it at the end.
    db["CONN_MAX_AGE"] = 0
    # A file, not memory, so that manage.py run in a subprocess sees the test database.
    if db["ENGINE"].endswith("sqlite3"):
        db.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("db") / "test.sqlite3")


@pytest.fixture
def credential_factory(db: None) -> Callable[..., APIKeyCredentials]:
    def make(**fields: Any) -> APIKeyCredentials:
        fields.setdefault("title", f"Credential {APIKeyCredentials.objects.count() + 1}")
        fields.setdefault("api_key", FAKE_KEY)
        credential = APIKeyCredentials(**fields)
        credential.full_clean()
        credential.save()
        return credential

    return make


def raw_api_key(pk: uuid.UUID) -> str:
    """The api_key column as stored, read with SQL."""
    table = APIKeyCredentials._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT api_key FROM {table} WHERE id = %s",
            [pk.hex if connection.vendor == "sqlite" else pk],
        )
        (stored,) = cursor.fetchone()
    return str(stored)


def database_url() -> str:
    """A DATABASE_URL for the database the tests are using right now."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = f"{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}"
    return f"postgres://{user}{password}@{host}/{db['NAME']}"


def subprocess_env(**overrides: str) -> dict[str, str]:
    """A clean environment for a child process: no .env, the test keys, then `overrides`."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "ENV_FILE": os.devnull,
        "SECRET_KEY": "keyroute-tests-only-not-a-secret",
        "CREDENTIALS_ENCRYPTION_KEYS": TEST_FERNET_KEY,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(overrides)
    return env


def run_manage(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROJECT / "manage.py"), *args],
        env=env,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A loopback OpenAI-compatible server, the global default of every purpose."""
    with Upstream() as server:
        yield server


@pytest.fixture
def start_upstream() -> Iterator[Callable[..., Upstream]]:
    """Start as many loopback servers as a test needs; all stop at its end."""
    servers: list[Upstream] = []

    def start(**kwargs: Any) -> Upstream:
        server = Upstream(**kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def global_route(settings, upstream):
    """Point the global defaults at `upstream` with a fake key."""
    settings.OPENAI_BASE_URL = upstream.base_url
    settings.OPENAI_INTERNAL_BASE_URL = upstream.base_url
    settings.OPENAI_API_KEY = GLOBAL_KEY
    settings.OPENAI_INTERNAL_API_KEY = GLOBAL_KEY
    return upstream
