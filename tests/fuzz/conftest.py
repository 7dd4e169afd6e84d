"""The fuzzing harness: requests through the ASGI application, what counts as a failure,
and the site the fuzzed requests meet (users, credentials, a loopback upstream)."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.apps import apps
from django.contrib.auth import get_user_model
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from llm import usage
from llm.models import UsageRecord
from platform_site.asgi import application
from tests.conftest import signed_in
from tests.fuzz.strategies import ADMIN, ALICE, BOBS, HELLO, INACTIVE, MINE, SHARED, UPSTREAM
from tests.upstream import Upstream

# Set to explore: that many examples per test, random seeds, failures kept in .hypothesis/.
EXPLORE = int(os.environ.get("KEYROUTE_FUZZ_EXAMPLES") or 0)
ANONYMOUS_CSRF = "FuzzFuzzFuzzFuzzFuzzFuzzFuzzFuzz"  # a CSRF secret: 32 letters


def fuzz(examples: int) -> hypothesis_settings:
    """Hypothesis settings of a fuzz test: `examples` derandomized examples (CI)."""
    common: dict[str, Any] = {
        "deadline": None,
        "print_blob": True,
        # Fixtures are set up once per test, on purpose: the examples share the site.
        "suppress_health_check": [
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    }
    if EXPLORE:
        return hypothesis_settings(max_examples=EXPLORE, **common)
    return hypothesis_settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        **common,
    )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    content: bytes
    # Problems in the logs while it was answered (and its usage flushed).
    problems: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.content)

    def describe(self) -> str:
        return f"{self.status} {self.headers.get('content-type')}: {self.content[:300]!r}"


class Logs(logging.Handler):
    """What the root and "django" loggers receive at WARNING or above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: dict[int, logging.LogRecord] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.records[id(record)] = record  # a record reaches both loggers: keep it once

    def problems(self) -> list[str]:
        """Records at ERROR or above, with an exception, or mentioning a traceback.

        Except what Django logs by design about a request it refused: a 4xx answer is
        logged by django.request at WARNING with the exception that made it, and every
        SuspiciousOperation (a body over DATA_UPLOAD_MAX_MEMORY_SIZE, too many fields)
        by django.security.* at ERROR; the answer is a 400, not a crash.
        """
        found = []
        for record in self.records.values():
            try:
                message = record.getMessage()
            except Exception as broken:  # a broken log call is a problem too
                message = f"unformattable log message {record.msg!r}: {broken!r}"
                found.append(message)
                continue
            if record.name.startswith("django.security."):
                continue
            refused = record.name == "django.request" and record.levelno == logging.WARNING
            if (
                record.levelno >= logging.ERROR
                or (record.exc_info and not refused)
                or "Traceback" in message
            ):
                last = ""
                if record.exc_info and record.exc_info[1] is not None:
                    error = record.exc_info[1]
                    last = f" <- {type(error).__name__}: {error}"
                found.append(f"{record.levelname} {record.name}: {message}{last}")
        return found


def asgi(
    method: str,
    raw_path: bytes,
    *,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> tuple[int, dict[str, str], bytes]:
    """One request through the ASGI application, as uvicorn hands it over."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        # uvicorn: the path percent-decoded as UTF-8 (invalid bytes replaced).
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": query,
        "headers": [(b"host", b"127.0.0.1"), *(headers or [])],
        "client": client,
        "server": ("127.0.0.1", 8000),
    }

    async def call() -> tuple[int, dict[str, str], bytes]:
        communicator = ApplicationCommunicator(application, scope)
        await communicator.send_input({"type": "http.request", "body": body, "more_body": False})
        start = await communicator.receive_output(60)
        content = b""
        while True:
            message = await communicator.receive_output(60)
            content += message.get("body", b"")
            if not message.get("more_body"):
                break
        await communicator.wait(10)
        answer_headers = {k.decode().lower(): v.decode("latin-1") for k, v in start["headers"]}
        return start["status"], answer_headers, content

    return async_to_sync(call)()


def _header_list(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value.encode("latin-1")) for name, value in headers.items()]


@dataclass
class Site:
    """The site as the fuzzed requests meet it."""

    upstream: Upstream
    logs: Logs
    ids: dict[str, str]
    browsers: dict[str, list[tuple[bytes, bytes]]]
    fresh_usage: Callable[[], None]

    def resolve(self, value: Any) -> Any:
        """`value` with the placeholders (MINE, SHARED...) swapped for real ids."""
        if isinstance(value, str):
            return self.ids.get(value, value)
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if isinstance(value, dict):
            return {key: self.resolve(item) for key, item in value.items()}
        return value

    def resolve_path(self, path: str) -> str:
        for placeholder, value in self.ids.items():
            path = path.replace(placeholder, value)
        return path

    def send(
        self,
        method: str,
        path: str,
        *,
        query: bytes = b"",
        body: bytes | None = None,
        content_type: str | None = None,
        who: str = "alice",
        headers: dict[str, str] | None = None,
        client: tuple[str, int] = ("127.0.0.1", 50000),
    ) -> Answer:
        """One request as `who` (alice, admin or anonymous); then the buffered usage is
        written, and what the logs received meanwhile is kept with the answer."""
        self.logs.records.clear()
        header_list = list(self.browsers[who])
        if content_type is not None:
            header_list.append((b"content-type", content_type.encode("latin-1")))
        if body is not None:
            header_list.append((b"content-length", str(len(body)).encode()))
        header_list += _header_list(headers or {})
        status, got, content = asgi(
            method,
            path.encode("ascii"),
            query=query,
            headers=header_list,
            body=body or b"",
            client=client,
        )
        try:
            usage.flush()
        finally:
            problems = self.logs.problems()
            if problems:
                self.fresh_usage()  # the failing records must not fail the next example
        return Answer(status, got, content, problems)

    def post_json(self, path: str, body: Any, **kwargs: Any) -> Answer:
        raw = json.dumps(self.resolve(body)).encode()
        return self.send("POST", path, body=raw, content_type="application/json", **kwargs)

    def assert_usage_still_recorded(self) -> None:
        """One more real chat call, after everything the fuzzer sent, is recorded.

        By a user of its own: the fuzzed admin may have deleted or deactivated alice."""
        model = f"fuzz-final-{uuid.uuid4().hex[:12]}"
        user = get_user_model().objects.create_user(model)
        self.browsers[model] = _header_list(signed_in(user))
        body = {"model": model, "messages": HELLO}
        answer = self.post_json("/api/llm/chat", body, who=model)
        assert answer.status == 200, answer.describe()
        assert not answer.problems, answer.problems
        assert UsageRecord.objects.filter(model=model, outcome="ok").count() == 1


def assert_fine(answer: Answer, *, api: bool = False) -> None:
    """No 500 (no 5xx at all: the upstream is healthy), nothing logged at ERROR, and for
    the JSON API the documented error shape with a sentence."""
    assert answer.status < 500, answer.describe()
    assert not answer.problems, answer.problems
    if api and 400 <= answer.status < 500:
        assert answer.headers.get("content-type") == "application/json", answer.describe()
        error = answer.json()["error"]
        assert isinstance(error["message"], str), answer.describe()
        assert error["message"].strip(), answer.describe()
        assert isinstance(error["type"], str), answer.describe()
        assert error["type"], answer.describe()
    if api and answer.status == 200:
        if answer.headers.get("content-type") == "text/event-stream":
            assert b"event: error" not in answer.content, answer.describe()
            assert b"event: done" in answer.content, answer.describe()
        else:
            answer.json()


@pytest.fixture
def site(
    transactional_db: None,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    private_cache: None,
    django_user_model: Any,
    credential_factory: Any,
    global_route: Upstream,
) -> Iterator[Site]:
    """Alice (a user), bob (another), an admin, their credentials on a loopback upstream
    that is also the global default, and usage records buffered as the site runs.

    Data is committed (transactional_db): the ASGI application runs each request's sync
    code in a thread of its own, as under uvicorn."""
    # Failed logins hash the password given: the fast hasher keeps the login fuzz fast.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.LLM_USAGE_FLUSH_SECONDS = 3600

    def fresh_usage() -> None:
        monkeypatch.setattr(usage, "_buffer", usage.UsageBuffer(maxsize=10_000, interval=3600))

    fresh_usage()
    alice = django_user_model.objects.create_user("alice")
    bob = django_user_model.objects.create_user("bob")
    admin = django_user_model.objects.create_superuser("admin", password="fuzz-admin-pass")
    base_url = global_route.base_url
    mine = credential_factory(title="Alice's", owner=alice, base_url=base_url)
    shared = credential_factory(title="Shared", base_url=base_url)
    bobs = credential_factory(title="Bob's", owner=bob, base_url=base_url)
    inactive = credential_factory(title="Off", owner=alice, base_url=base_url, is_active=False)
    logs = Logs()
    watched = [logging.getLogger(), logging.getLogger("django")]
    for logger in watched:
        logger.addHandler(logs)
    alice_browser = signed_in(alice)
    anonymous = {"Cookie": f"csrftoken={ANONYMOUS_CSRF}", "X-CSRFToken": ANONYMOUS_CSRF}
    try:
        yield Site(
            upstream=global_route,
            logs=logs,
            ids={
                MINE: str(mine.pk),
                SHARED: str(shared.pk),
                BOBS: str(bobs.pk),
                INACTIVE: str(inactive.pk),
                ALICE: str(alice.pk),
                ADMIN: str(admin.pk),
                UPSTREAM: base_url,
            },
            browsers={
                "alice": _header_list(alice_browser),
                "alice without token": _header_list({"Cookie": alice_browser["Cookie"]}),
                "admin": _header_list(signed_in(admin)),
                "anonymous": _header_list(anonymous),
            },
            fresh_usage=fresh_usage,
        )
    finally:
        for logger in watched:
            logger.removeHandler(logs)


@pytest.fixture
def reset_login_throttle() -> Callable[[], None]:
    """Forget failed logins (django-axes, when installed): each example starts afresh."""

    def reset() -> None:
        if apps.is_installed("axes"):
            from axes.utils import reset as axes_reset  # type: ignore[import-untyped]

            axes_reset()

    return reset
