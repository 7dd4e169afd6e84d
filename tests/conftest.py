from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from credentials.models import APIKeyCredentials
from tests.redis_server import RedisServer
from tests.upstream import Upstream, free_port

PROJECT = Path(__file__).resolve().parent.parent
# Obviously fake keys; never real ones.
FAKE_KEY = "sk-test-fake-Zq9xLmN0pQrS7tUv"
GLOBAL_KEY = "sk-test-fake-global-default-Qgbl"
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


@pytest.fixture(autouse=True)
def _fresh_breakers() -> Iterator[None]:
    """Every test starts with closed circuit breakers: loopback ports are reused."""
    from llm.breaker import breakers

    breakers.reset()
    yield
    breakers.reset()


@pytest.fixture(autouse=True)
def _fresh_prices() -> None:
    """Sync code checks the price table once a second; a rolled-back test deletes its
    prices without a signal."""
    from llm import prices

    prices.forget()


@pytest.fixture
def alice(django_user_model: Any) -> Any:
    """A signed-up user; tests that need an owner other than the admin use her."""
    return django_user_model.objects.create_user("alice")


@pytest.fixture
def api(alice: Any) -> Any:
    """Alice's signed-in client; a 500 is answered as a page, not raised, so tests see it."""
    from django.test import Client

    client = Client(raise_request_exception=False)
    client.force_login(alice)
    return client


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
        # Servers started by the tests speak plain HTTP to a browser or a client.
        "SECURE_SSL_REDIRECT": "false",
        "SESSION_COOKIE_SECURE": "false",
        "CSRF_COOKIE_SECURE": "false",
    }
    env.update(overrides)
    return env


def run_manage(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return run_python(str(PROJECT / "manage.py"), *args, env=env, timeout=timeout)


def run_python(
    *argv: str, env: dict[str, str], cwd: Path = PROJECT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """python ARGV... in a child process; `run_python("-c", code, ...)` runs code."""
    return subprocess.run(
        [sys.executable, *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def private_cache(settings: Any) -> None:
    """A cache of the test's own. Tests that count loads or hops need one: other tests
    (other xdist workers) bump the copies' stamp in a shared Redis at any moment."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": f"test-{uuid.uuid4()}",
        }
    }


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free port (tests/redis_server.py)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


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


# ---- the site under uvicorn -------------------------------------------------------------

# A Redis database for the tests that need one whatever CACHE_URL says. Sharing it is
# safe: a stamp bumped by another test only makes a worker load afresh.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@dataclass
class Site:
    """The site served by uvicorn in a process of its own, on the test database."""

    base_url: str
    process: subprocess.Popen[str]

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: Any = None,
        timeout: float = 30,
    ) -> Answer:
        """One HTTP request; `body` is sent as JSON, or as a form when it is a str."""
        data = None
        headers = dict(headers or {})
        if isinstance(body, str):
            data = body.encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(  # noqa: S310 (http://127.0.0.1 only)
            self.base_url + path, data=data, headers=headers, method=method
        )
        started = time.perf_counter()
        try:
            with _no_redirects.open(request, timeout=timeout) as answer:
                status, content, got = answer.status, answer.read(), answer.headers
        except urllib.error.HTTPError as error:
            status, content, got = error.code, error.read(), error.headers
        return Answer(status, content, time.perf_counter() - started, got)


@dataclass
class Answer:
    status: int
    content: bytes
    seconds: float
    headers: Message

    def cookies(self) -> dict[str, str]:
        """The cookies it sets: name -> value."""
        return {name: morsel.value for name, morsel in self._jar().items()}

    def follow(self, headers: dict[str, str]) -> dict[str, str]:
        """`headers` with the cookies this answer set, as a browser sends them next."""
        jar = SimpleCookie(headers.get("Cookie", ""))
        jar.update(self._jar())
        return {**headers, "Cookie": "; ".join(f"{k}={m.coded_value}" for k, m in jar.items())}

    def _jar(self) -> SimpleCookie:
        jar = SimpleCookie()
        for header in self.headers.get_all("Set-Cookie") or []:
            jar.load(header)
        return jar

    def json(self) -> Any:
        return json.loads(self.content)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_no_redirects = urllib.request.build_opener(_NoRedirect)


def listening(process: subprocess.Popen[str], port: int, *, seconds: float) -> bool:
    """Wait until `process` listens on 127.0.0.1:`port`: False if it exits or the time
    is up first."""
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


@pytest.fixture
def start_site(transactional_db: None) -> Iterator[Callable[..., Site]]:
    """Start the site under uvicorn (ASGI, as in production) as often as a test needs;
    all stop at its end. Keyword arguments are environment variables of the server.

    Data for it must be committed: hence transactional_db."""
    sites: list[Site] = []

    def start(**env: str) -> Site:
        port = free_port()
        defaults = {
            "DATABASE_URL": database_url(),
            "ALLOWED_HOSTS": "127.0.0.1",
            "LLM_MAX_RETRIES": "0",
            "LOG_LEVEL": "WARNING",
        }
        server_env = subprocess_env(**{**defaults, **env})
        command = [sys.executable, "-m", "uvicorn", "platform_site.asgi:application"]
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
            cwd=PROJECT,
            env=server_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        site = Site(f"http://127.0.0.1:{port}", process)
        sites.append(site)
        if listening(process, port, seconds=30):
            return site
        process.kill()
        pytest.fail(f"uvicorn did not start: {process.communicate()[1]}")

    yield start
    for site in sites:
        site.process.terminate()
    for site in sites:
        try:
            site.process.wait(10)
        except subprocess.TimeoutExpired:
            site.process.kill()
            site.process.wait(5)


def signed_in(user: Any) -> dict[str, str]:
    """Headers of a browser signed in as `user`: session and CSRF cookies, CSRF header.

    The session is written to the database (and this process's cache), where a server
    started by `start_site` finds it."""
    from django.http import HttpRequest
    from django.middleware.csrf import get_token
    from django.test import Client

    browser = Client()
    browser.force_login(user)
    session = browser.cookies[settings.SESSION_COOKIE_NAME].value
    page = HttpRequest()
    token = get_token(page)  # the masked token for the header; the secret is the cookie
    cookies = f"{settings.SESSION_COOKIE_NAME}={session}; {settings.CSRF_COOKIE_NAME}="
    return {"Cookie": cookies + page.META["CSRF_COOKIE"], "X-CSRFToken": token}
