"""The site's chat call through the OpenAI SDK, in a bare ASGI app: no Django, no project code.

bench/concurrency.py serves it under uvicorn with the site's flags (1 worker, uvloop,
httptools, --no-access-log) and drives it with the same load as the site: it is the
reference row "(r)", the ceiling of "the same SDK call without Django" (no middleware,
session, CSRF, database, usage record or client cache). The site's chat rate over this
one's says how much of that ceiling the site keeps; GET /healthz of the site says what
uvicorn alone can do, which no SDK call gets near.

    BARE_BASE_URL=http://127.0.0.1:8099/v1 BARE_API_KEY=sk-... \\
        python -m uvicorn --app-dir bench bare_app:app --loop uvloop --http httptools

POST /v1/chat takes {"model": ..., "messages": [...]} (the site's body without the
credential), makes one `chat.completions.with_raw_response.create` call, `.parse()`s it as
llm/services.py does and answers 200 with {"text", "model", "usage": {"prompt_tokens",
"completion_tokens", "total_tokens"}, "cost"} (cost: the x-litellm-response-cost header, or
null); 502 when the SDK raises or its answer is malformed; 400 when the body is not a chat
request. GET /healthz answers 200 without any call (the benchmark waits for it). Anything
else: 404, or 405 for another method.

Environment: BARE_BASE_URL and BARE_API_KEY (required); BARE_TIMEOUT_SECONDS (60),
BARE_CONNECT_TIMEOUT_SECONDS (5) and BARE_MAX_RETRIES (0): the site's defaults for the
timeouts, and no retries as the site runs in the benchmark (LLM_MAX_RETRIES=0). The client
is built as llm/clients.py builds it: AsyncOpenAI over openai.DefaultAioHttpClient, one
SSL context, no redirects, no proxy from the environment.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT_PATH = "/v1/chat"
HEALTH_PATH = "/healthz"
# What _chat_result in llm/services.py takes for a malformed answer.
MALFORMED = (ValueError, TypeError, AttributeError, IndexError, KeyError)


@dataclass(frozen=True)
class Config:
    base_url: str
    api_key: str
    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_retries: int = 0

    @classmethod
    def from_env(cls) -> Config:
        """Raises KeyError or ValueError when the environment is incomplete or wrong."""
        return cls(
            base_url=os.environ["BARE_BASE_URL"],
            api_key=os.environ["BARE_API_KEY"],
            timeout=float(os.environ.get("BARE_TIMEOUT_SECONDS") or 60),
            connect_timeout=float(os.environ.get("BARE_CONNECT_TIMEOUT_SECONDS") or 5),
            max_retries=int(os.environ.get("BARE_MAX_RETRIES") or 0),
        )

    def httpx_timeout(self) -> httpx2.Timeout:
        return httpx2.Timeout(self.timeout, connect=min(self.connect_timeout, self.timeout))


def build_client(config: Config) -> openai.AsyncOpenAI:
    """The client llm/clients.py would build for this route, with the same options."""
    verify: ssl.SSLContext = httpx2.create_ssl_context()
    return openai.AsyncOpenAI(
        api_key=config.api_key,
        base_url=config.base_url,
        timeout=config.httpx_timeout(),
        max_retries=config.max_retries,
        http_client=openai.DefaultAioHttpClient(
            verify=verify,
            timeout=config.httpx_timeout(),
            follow_redirects=False,
            trust_env=False,
        ),
    )


class _State:
    """The process's one client: built on the first request, on the server's loop (its
    aiohttp connection pool belongs to that loop), reused by every request after it."""

    def __init__(self) -> None:
        self.config: Config | None = None
        self.client: openai.AsyncOpenAI | None = None

    def get_client(self) -> openai.AsyncOpenAI:
        # No await between the check and the assignment: concurrent first requests
        # cannot build two clients.
        if self.client is None:
            self.client = build_client(self.config or Config.from_env())
        return self.client

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.close()


_state = _State()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI 3 entry point."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http":
        await http(scope, receive, send)
    # Anything else (websocket) is not served: returning lets the server refuse it.


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:  # a missing variable stops the server now, not at the first request
                _state.config = Config.from_env()
            except (KeyError, ValueError) as error:
                await send({"type": "lifespan.startup.failed", "message": f"bare_app: {error!r}"})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _state.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def http(scope: Scope, receive: Receive, send: Send) -> None:
    path, method = scope["path"], scope["method"]
    if path == HEALTH_PATH:
        if method != "GET":
            await answer(send, 405, {"error": "GET only"})
            return
        await answer(send, 200, {"status": "ok"})
    elif path == CHAT_PATH:
        if method != "POST":
            await answer(send, 405, {"error": "POST only"})
            return
        body = await read_body(receive)
        if body is None:
            return  # the client left; there is no one to answer
        request = chat_request(body)
        if request is None:
            await answer(send, 400, {"error": 'expected {"model": "...", "messages": [...]}'})
            return
        await answer(send, *await chat(*request))
    else:
        await answer(send, 404, {"error": f"no such path: {path}"})


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def chat_request(body: bytes) -> tuple[str, list[Any]] | None:
    """(model, messages), or None when the body is not a chat request."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    model, messages = data.get("model"), data.get("messages")
    if not isinstance(model, str) or not model or not isinstance(messages, list) or not messages:
        return None
    return model, messages


async def chat(model: str, messages: list[Any]) -> tuple[int, dict[str, Any]]:
    """The call of llm/services.py (_acomplete, then _chat_result): (status, JSON body)."""
    client = _state.get_client()
    try:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=messages)
    except openai.OpenAIError as error:
        return 502, {"error": f"{type(error).__name__}: {error}"}
    try:
        completion = raw.parse()
        text = completion.choices[0].message.content or ""
        answered_model = str(completion.model or "")
    except MALFORMED as error:
        return 502, {"error": f"malformed answer: {type(error).__name__}"}
    return 200, {
        "text": text,
        "model": answered_model,
        "usage": usage(completion),
        "cost": cost(raw.headers),
    }


def usage(completion: Any) -> dict[str, int]:
    """As _usage in llm/services.py: zeros when absent, total = prompt + completion if 0."""
    found = getattr(completion, "usage", None)
    prompt = int(getattr(found, "prompt_tokens", 0) or 0)
    completion_tokens = int(getattr(found, "completion_tokens", 0) or 0)
    total = int(getattr(found, "total_tokens", 0) or 0) or prompt + completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": total}


def cost(headers: Any) -> float | None:
    """As _cost in llm/services.py: the LiteLLM proxy's cost header, when it sent one."""
    value = headers.get("x-litellm-response-cost")
    try:
        return float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None


async def answer(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
