"""A real OpenAI-compatible HTTP server on loopback, for tests and benchmarks.

It answers /v1/models, /v1/chat/completions (plain and streamed) and /v1/embeddings,
records every request (method, path, headers, JSON body, client port), and can be told
to answer slowly, with any status and body, with garbage, to drop the connection or to
never answer. It runs on its own event loop in a thread (`Upstream.start()`), or as a
process: `python -m tests.upstream --port 8099 [--delay 1.0]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    peer: tuple[str, int]

    @property
    def authorization(self) -> str:
        return self.headers.get("Authorization", "")


@dataclass
class Behaviour:
    """How to answer: normally (after `delay`), or `status` with `body`, or `mode`."""

    delay: float = 0.0
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # answer | drop | hang | garbage | drop-mid-stream | verbatim (`status` with `body`,
    # a 200 included: bytes or a str as they are, anything else as JSON)
    mode: str = "answer"


class DeadPort:
    """A port where a proxy died: it accepts connections and closes them at once,
    noting when each came (`knocks`, perf_counter), so a test can tell whether anything
    still knocks."""

    def __init__(self, port: int = 0) -> None:
        self._socket = socket.create_server(("127.0.0.1", port), backlog=128)
        self.port = int(self._socket.getsockname()[1])
        self.knocks: list[float] = []
        self._thread = threading.Thread(target=self._serve, name="dead-port", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def attempts(self) -> int:
        return len(self.knocks)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # closed
            self.knocks.append(time.perf_counter())
            connection.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread
        self._socket.close()
        self._thread.join(5)

    def __enter__(self) -> DeadPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Upstream:
    def __init__(self, *, models: list[str] | None = None, cost: str | None = None) -> None:
        self.models = models or ["gpt-test-mini", "gpt-test-large", "embed-test"]
        self.cost = cost
        self.behaviour = Behaviour()
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.most_in_flight = 0  # the most requests it was answering at once
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # ---- control -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def respond(self, **behaviour: Any) -> None:
        self.behaviour = Behaviour(**behaviour)

    def reset(self) -> None:
        self.behaviour = Behaviour()
        self.requests.clear()

    @property
    def connections(self) -> int:
        """Distinct client connections the recorded requests came over."""
        return len({request.peer for request in self.requests})

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await handler(request)  # type: ignore[no-any-return]
        finally:
            self.in_flight -= 1

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[self._count])
        app.router.add_get("/v1/models", self.models_view)
        app.router.add_post("/v1/chat/completions", self.chat_view)
        app.router.add_post("/v1/embeddings", self.embeddings_view)
        app.router.add_get("/health/liveliness", self.liveliness_view)
        return app

    def start(self, port: int = 0) -> Upstream:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start(port))
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name=f"upstream-{port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("The loopback upstream did not start.")
        return self

    async def _shutdown(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
        # Handlers told to hang outlive their (closed) connections: cancel them too.
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _start(self, port: int) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- serving -------------------------------------------------------------------

    async def _record(self, request: web.Request) -> Any:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(
            Recorded(
                request.method, request.path, dict(request.headers), body, tuple(peer or ("", 0))
            )
        )
        return body

    async def _misbehave(self, request: web.Request) -> web.StreamResponse | None:
        """The scripted answer, or None to answer normally."""
        behaviour = self.behaviour
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.mode == "hang":
            await asyncio.sleep(3600)
        if behaviour.mode == "drop":
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        if behaviour.mode == "verbatim":
            if isinstance(behaviour.body, str | bytes):
                raw = behaviour.body
                return web.Response(
                    status=behaviour.status,
                    body=raw.encode() if isinstance(raw, str) else raw,
                    content_type="application/json",
                    headers=behaviour.headers,
                )
            return web.json_response(
                behaviour.body, status=behaviour.status, headers=behaviour.headers
            )
        if behaviour.mode == "garbage":
            return web.Response(
                status=200, text="this is not json {", content_type="application/json"
            )
        if behaviour.status != 200:
            body = (
                behaviour.body if behaviour.body is not None else {"error": {"message": "scripted"}}
            )
            return web.json_response(body, status=behaviour.status, headers=behaviour.headers)
        return None

    async def liveliness_view(self, request: web.Request) -> web.StreamResponse:
        return web.json_response("I'm alive!")

    async def models_view(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        scripted = await self._misbehave(request)
        if scripted is not None:
            return scripted
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "test"}
            for name in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    def _headers(self) -> dict[str, str]:
        headers = dict(self.behaviour.headers)
        if self.cost is not None:
            headers["x-litellm-response-cost"] = self.cost
        return headers

    async def chat_view(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        scripted = await self._misbehave(request)
        if scripted is not None:
            return scripted
        messages = body.get("messages") or [{}]
        prompt = str(messages[-1].get("content", ""))
        text = f"echo: {prompt}"
        model = body.get("model", "")
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = len(text.split())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if body.get("stream"):
            return await self._stream(request, text, model, usage)
        completion = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        return web.json_response(completion, headers=self._headers())

    async def _stream(
        self, request: web.Request, text: str, model: str, usage: dict[str, int]
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", **self._headers()}
        )
        await response.prepare(request)
        words = text.split(" ")
        for index, word in enumerate(words):
            piece = word if index == 0 else f" {word}"
            chunk = {
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if self.behaviour.mode == "drop-mid-stream":
                await asyncio.sleep(0.05)  # the first chunk reaches the client first
                assert request.transport is not None
                request.transport.abort()
                raise asyncio.CancelledError
        final = {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": usage,
        }
        await response.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response

    async def embeddings_view(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        scripted = await self._misbehave(request)
        if scripted is not None:
            return scripted
        texts = body.get("input") or []
        texts = [texts] if isinstance(texts, str) else texts
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(str(t))), float(i), 0.5]}
            for i, t in enumerate(texts)
        ]
        tokens = sum(len(str(t).split()) for t in texts)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model", ""),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers=self._headers(),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="A loopback OpenAI-compatible server.")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--delay", type=float, default=0.0, help="Seconds before each answer.")
    args = parser.parse_args()
    upstream = Upstream()
    upstream.respond(delay=args.delay)
    upstream.requests = _NotKept()  # a long-running server keeps no history
    web.run_app(
        upstream.app(), host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=4096
    )


class _NotKept(list[Recorded]):
    def append(self, item: Recorded) -> None:
        pass


if __name__ == "__main__":
    main()
