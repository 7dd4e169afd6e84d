"""The ASGI application: Django's handler without a thread per request (see asgi.py)."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator

from platform_site.asgi import application


def http_get(path: str) -> tuple[int, dict[str, object]]:
    async def call() -> tuple[int, dict[str, object]]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        communicator = ApplicationCommunicator(application, scope)
        await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await communicator.receive_output(5)
        body = await communicator.receive_output(5)
        await communicator.wait()
        return start["status"], json.loads(body["body"])

    return async_to_sync(call)()


@pytest.mark.parametrize("thread_per_request", [False, True])
def test_it_answers_http_with_and_without_a_thread_per_request(
    transactional_db, settings, thread_per_request
):
    settings.ASGI_THREAD_PER_REQUEST = thread_per_request

    assert http_get("/healthz") == (200, {"status": "ok"})
    assert http_get("/readyz") == (200, {"status": "ok"})


def test_it_refuses_what_is_not_http():
    async def lifespan() -> None:
        communicator = ApplicationCommunicator(application, {"type": "lifespan"})
        await communicator.send_input({"type": "lifespan.startup"})
        await communicator.wait()

    with pytest.raises(ValueError, match="only handle ASGI/HTTP"):
        async_to_sync(lifespan)()
