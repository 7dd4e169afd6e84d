"""The ASGI application: Django's handler and middleware, with no thread on the hot path.

Requests go through `platform_site.asgi.application` in this process. Each runs its sync
code in a thread of its own, as under uvicorn, so the data it reads must be committed
(transactional_db). Thread hops are counted by watching asgiref's `SyncToAsync`: every
sync call made from async code goes through it (the counting wrapper calls the real one).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import SyncToAsync, async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.conf import settings as django_settings
from django.core.signals import request_finished
from django.utils.module_loading import import_string

from llm import usage
from llm.models import ModelPrice
from platform_site.asgi import Handler, application
from platform_site.middleware import ON_THE_LOOP
from platform_site.signals import worker_stopping
from tests.conftest import signed_in

MODEL = "gpt-test-mini"


def asgi(
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
    scheme: str = "http",
    app: Any = application,
) -> tuple[int, dict[str, str], bytes]:
    """One request through the ASGI application: status, headers, the whole body."""
    raw = b"" if body is None else json.dumps(body).encode()
    header_list = [(b"host", b"127.0.0.1")]
    header_list += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if body is not None:
        header_list.append((b"content-type", b"application/json"))

    path, _, query = path.partition("?")

    async def call() -> tuple[int, dict[str, str], bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": scheme,
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": header_list,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        communicator = ApplicationCommunicator(app, scope)
        await communicator.send_input({"type": "http.request", "body": raw, "more_body": False})
        start = await communicator.receive_output(10)
        content = b""
        while True:
            message = await communicator.receive_output(10)
            content += message.get("body", b"")
            if not message.get("more_body"):
                break
        await communicator.wait()
        answer_headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        return start["status"], answer_headers, content

    return async_to_sync(call)()


@pytest.fixture
def hops(monkeypatch) -> list[str]:
    """The sync functions called from async code (each one a thread hop), by name."""
    calls: list[str] = []
    real_call = SyncToAsync.__call__

    async def counting(self: SyncToAsync[Any, Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(self.func, "__qualname__", None) or type(self.func).__name__)
        return await real_call(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counting)
    return calls


@pytest.fixture
def buffered_usage(settings, monkeypatch):
    """Usage records buffered, as the site runs (the tests write them as calls end)."""
    settings.LLM_USAGE_FLUSH_SECONDS = 3600
    monkeypatch.setattr(usage, "_buffer", usage.UsageBuffer(maxsize=1000, interval=3600))


def test_it_answers_http(transactional_db):
    assert asgi("GET", "/healthz")[0] == 200
    status, _, content = asgi("GET", "/readyz")
    assert (status, json.loads(content)) == (200, {"status": "ok"})


def test_it_speaks_the_lifespan_protocol_and_tells_receivers_it_stops():
    # uvicorn ends a worker by its signal after the lifespan, so atexit never runs there:
    # what a worker buffers is written on `worker_stopping` (tests/llm/test_usage.py).
    stopping: list[object] = []

    def receiver(sender: object, **kwargs: object) -> None:
        stopping.append(sender)

    async def lifespan() -> list[object]:
        communicator = ApplicationCommunicator(application, {"type": "lifespan"})
        await communicator.send_input({"type": "lifespan.startup"})
        said = [await communicator.receive_output()]
        await communicator.send_input({"type": "lifespan.shutdown"})
        said.append(await communicator.receive_output())
        await communicator.wait()
        return said

    worker_stopping.connect(receiver)
    try:
        said = async_to_sync(lifespan)()
    finally:
        worker_stopping.disconnect(receiver)

    assert said == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert stopping == [type(application)]


def test_it_refuses_what_is_not_http():
    async def websocket() -> None:
        communicator = ApplicationCommunicator(application, {"type": "websocket"})
        await communicator.send_input({"type": "websocket.connect"})
        await communicator.wait()

    with pytest.raises(ValueError, match="only handle ASGI/HTTP"):
        async_to_sync(websocket)()


# ---- Django's own middleware ------------------------------------------------------------


def test_the_settings_name_djangos_own_middleware_and_each_twin_is_one():
    assert "django.middleware.security.SecurityMiddleware" in django_settings.MIDDLEWARE
    for listed in django_settings.MIDDLEWARE:
        twin = import_string(ON_THE_LOOP[listed])
        assert issubclass(twin, import_string(listed))


def test_the_twins_send_djangos_security_headers(transactional_db, settings):
    settings.SECURE_HSTS_SECONDS = 3600
    fresh = Handler()  # middleware reads its settings when the chain is built

    status, headers, _ = asgi("GET", "/healthz", scheme="https", app=fresh)

    assert status == 200
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"
    assert headers["strict-transport-security"].startswith("max-age=3600")


def test_the_twins_redirect_to_https_except_the_probes(transactional_db, settings):
    settings.SECURE_SSL_REDIRECT = True
    fresh = Handler()

    status, headers, _ = asgi("GET", "/llm/", app=fresh)

    assert (status, headers["location"]) == (301, "https://127.0.0.1/llm/")
    assert asgi("GET", "/healthz", app=fresh)[0] == 200
    assert asgi("GET", "/readyz", app=fresh)[0] == 200


def test_the_twins_refuse_a_form_without_its_csrf_token(transactional_db):
    status, _, content = asgi("POST", "/admin/login/", body={"username": "x"})

    assert status == 403
    assert b"CSRF" in content


# ---- no thread on the hot path ----------------------------------------------------------


# Spend control on: an allow-list, a budget and a cap, rates (llm.limits), and a price
# table that prices every call (the upstream sends no cost).
SPEND_CONTROL = {
    "allowed_models": [MODEL, "embed-*"],
    "monthly_budget_usd": Decimal(1000),
    "user_monthly_budget_usd": Decimal(100),
    "requests_per_minute": 10**6,
    "tokens_per_minute": 10**9,
    "user_requests_per_minute": 10**6,
    "user_tokens_per_minute": 10**9,
}


@pytest.fixture(params=[{}, SPEND_CONTROL], ids=["", "spend control on"])
def alices(request, django_user_model, credential_factory, upstream):
    """Alice signed in, and her credential on `upstream`."""
    alice = django_user_model.objects.create_user("alice")
    credential = credential_factory(
        title="Alice", owner=alice, base_url=upstream.base_url, **request.param
    )
    ModelPrice.objects.create(model="*", input_usd_per_million=1, output_usd_per_million=2)
    return signed_in(alice), str(credential.pk)


def test_the_hot_path_makes_no_thread_hop_once_warm(
    transactional_db, private_cache, buffered_usage, alices, hops, upstream
):
    headers, credential = alices
    chat = {
        "credential": credential,
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
    }
    send = {"credential": credential, "purpose": "chat", "model": MODEL, "prompt": "hi"}
    calls = {
        "chat": ("POST", "/api/llm/chat", chat),
        "streamed chat": ("POST", "/api/llm/chat", {**chat, "stream": True}),
        "embeddings": (
            "POST",
            "/api/llm/embeddings",
            {"credential": credential, "model": MODEL, "input": "hi"},
        ),
        "models": ("GET", f"/api/llm/models?credential={credential}", None),
        "budget": ("GET", f"/api/llm/budget?credential={credential}", None),
        "playground send": ("POST", "/llm/send", send),
        "healthz": ("GET", "/healthz", None),
    }
    # Cold: the session, the user and the credential are read once; the choice is saved.
    for method, path, body in calls.values():
        assert asgi(method, path, headers=headers, body=body)[0] == 200
    assert hops

    per_call = {}
    for name, (method, path, body) in calls.items():
        hops.clear()
        status, _, _ = asgi(method, path, headers=headers, body=body)
        per_call[name] = (status, list(hops))

    assert per_call == {name: (200, []) for name in calls}
    assert len(upstream.requests) == 2 * 5


def test_readiness_reads_the_database_in_a_thread_of_its_own(transactional_db, hops):
    assert asgi("GET", "/readyz")[0] == 200
    # The response is closed in that thread too: its connection is closed where it opened.
    assert hops == ["_select_one", "HttpResponseBase.close"]


def test_a_receiver_django_does_not_ship_is_called_from_a_thread(transactional_db, hops):
    called: list[str] = []

    def receiver(**kwargs: Any) -> None:
        called.append("finished")

    request_finished.connect(receiver)
    try:
        assert asgi("GET", "/healthz")[0] == 200
    finally:
        request_finished.disconnect(receiver)

    assert called == ["finished"]
    assert len(hops) == 1
