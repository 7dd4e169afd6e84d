"""Chat, code and embeddings: every OpenAI-SDK call of the platform goes through here.

A call resolves its route for the user it is made for (the credential's, or the
purpose's global default), holds the cached client through a lease (which turns SDK
exceptions into LLMError sentences), reads the answer, and records itself (`_Call`).

`user` is whom the call is for. A credential they may not use raises
CredentialUnavailable, and a call with no `user` may use no credential at all. Calls
the platform makes for itself pass `user=PLATFORM`, which skips the ownership check.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from credentials.models import PLATFORM, APIKeyCredentials
from llm import clients
from llm import usage as usage_records
from llm.errors import LLMError, reading_answer
from llm.routes import Purpose, Route, resolve_route

R = TypeVar("R", "ChatResult", "EmbeddingResult")
CODE_INSTRUCTIONS = (
    "You write code. Answer with the code first, then at most a few short sentences."
)
# Connection tests of many credentials run at most this many at once.
PROBE_THREADS = 8


@dataclass(frozen=True)
class RouteInfo:
    """What a user may see of a route: where it went, not with which key."""

    source: str
    host: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class ChatResult:
    text: str
    model: str
    usage: Usage
    route: RouteInfo
    cost_usd: float | None = None


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[list[float]]
    model: str
    usage: Usage
    route: RouteInfo
    cost_usd: float | None = None


@dataclass(frozen=True)
class ModelList:
    models: list[str]
    latency_ms: float
    route: RouteInfo


@dataclass(frozen=True)
class ProbeResult:
    """A connection test of one credential: the models it may use, or what went wrong."""

    title: str
    host: str
    latency_ms: float
    models: tuple[str, ...] = ()
    error: str | None = None


def _info(route: Route) -> RouteInfo:
    return RouteInfo(source=route.source, host=route.host)


def _usage(raw: Any) -> Usage:
    usage = getattr(raw, "usage", None)
    if usage is None:
        return Usage()
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion = int(getattr(usage, "completion_tokens", 0) or 0)
    total = int(getattr(usage, "total_tokens", 0) or 0) or prompt + completion
    return Usage(prompt, completion, total)


def _cost(headers: Any) -> float | None:
    value = headers.get("x-litellm-response-cost")
    try:
        return float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None


def _chat_result(raw: Any, route: Route) -> ChatResult:
    with reading_answer(route):
        completion = raw.parse()
        text = completion.choices[0].message.content or ""
        model = str(completion.model or "")
        usage = _usage(completion)
    return ChatResult(text, model, usage, _info(route), _cost(raw.headers))


def _embedding_result(raw: Any, route: Route) -> EmbeddingResult:
    with reading_answer(route):
        response = raw.parse()
        rows = sorted(response.data, key=lambda row: row.index)
        vectors = [list(map(float, row.embedding)) for row in rows]
        model = str(response.model or "")
        usage = _usage(response)
    return EmbeddingResult(vectors, model, usage, _info(route), _cost(raw.headers))


class _StreamedAnswer:
    """A chat answer put together from its chunks."""

    def __init__(self, route: Route, model: str, cost: float | None) -> None:
        self.route, self.model, self.cost = route, model, cost
        self.pieces: list[str] = []
        self.usage = Usage()

    def add(self, chunk: Any) -> str:
        """The chunk's text (may be empty: the last chunk carries only the usage)."""
        self.model = chunk.model or self.model
        if chunk.usage:
            self.usage = _usage(chunk)
        piece = "".join(c.delta.content for c in chunk.choices if c.delta and c.delta.content)
        self.pieces.append(piece)
        return piece

    def result(self) -> ChatResult:
        text = "".join(self.pieces)
        return ChatResult(text, self.model, self.usage, _info(self.route), self.cost)


def _code_messages(prompt: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": CODE_INSTRUCTIONS},
        {"role": "user", "content": prompt},
    ]


class _Call:
    """One call's bookkeeping, for sync, async and streaming calls alike.

    Entering resolves the route and starts the clock; leaving writes the usage record
    with the outcome: "ok", the error's class, or "Cancelled" (the caller went away).
    """

    def __init__(
        self, purpose: Purpose, model: str, credential: APIKeyCredentials | None, user: Any
    ) -> None:
        self.purpose, self.model, self.credential, self.user = purpose, model, credential, user
        self.route: Route | None = None
        self.result: ChatResult | EmbeddingResult | None = None
        self.started = time.perf_counter()

    def __enter__(self) -> Route:
        try:
            return self._resolve()
        except LLMError as error:
            self.__exit__(type(error), error, None)
            raise

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        usage_records.record(**self._fields(error))

    async def __aenter__(self) -> Route:
        try:
            return self._resolve()
        except LLMError as error:
            await self.__aexit__(type(error), error, None)
            raise

    async def __aexit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        await usage_records.arecord(**self._fields(error))

    def _resolve(self) -> Route:
        self.route = resolve_route(self.purpose, self.credential, user=self.user)
        return self.route

    def _fields(self, error: BaseException | None) -> dict[str, Any]:
        if error is None:
            outcome = "ok"
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):
            outcome = "Cancelled"
        else:
            outcome = type(error).__name__
        result = self.result if error is None else None
        usage = result.usage if result else Usage()
        user = self.user  # a user, None, or PLATFORM (no user id)
        return {
            "credential_id": self.credential.pk if self.credential else None,
            "user_id": user.pk if getattr(user, "is_authenticated", False) else None,
            "purpose": self.purpose,
            "model": (result.model if result and result.model else self.model)[:200],
            "route_source": self.route.source if self.route else "",
            "route_host": self.route.host if self.route else "",
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "cost_usd": usage_records.as_decimal(result.cost_usd if result else None),
            "latency_ms": (time.perf_counter() - self.started) * 1000,
            "outcome": outcome,
        }


def _run(call: _Call, send: Callable[[Any], Any], read: Callable[[Any, Route], R]) -> R:
    with call as route, clients.lease(route, model=call.model) as client:
        result = call.result = read(send(client), route)
    return result


async def _arun(
    call: _Call, send: Callable[[Any], Awaitable[Any]], read: Callable[[Any, Route], R]
) -> R:
    async with call as route, clients.alease(route, model=call.model) as client:
        result = call.result = read(await send(client), route)
    return result


def _completion(messages: Sequence[dict[str, Any]], model: str, options: dict[str, Any]) -> Any:
    """The SDK call of a chat completion, for a sync or an async client."""
    return lambda client: client.chat.completions.with_raw_response.create(
        model=model, messages=list(messages), **options
    )


def _embedding(texts: Sequence[str], model: str) -> Any:
    return lambda client: client.embeddings.with_raw_response.create(
        model=model, input=list(texts), encoding_format="float"
    )


def chat(
    *,
    messages: Sequence[dict[str, Any]],
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
    **options: Any,
) -> ChatResult:
    """A chat completion; `options` go to the SDK (temperature, max_tokens, ...)."""
    call = _Call("chat", model, credential, user)
    return _run(call, _completion(messages, model, options), _chat_result)


async def achat(
    *,
    messages: Sequence[dict[str, Any]],
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
    **options: Any,
) -> ChatResult:
    call = _Call("chat", model, credential, user)
    return await _arun(call, _completion(messages, model, options), _chat_result)


async def astream_chat(
    *,
    messages: Sequence[dict[str, Any]],
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
    **options: Any,
) -> AsyncIterator[str | ChatResult]:
    """A chat completion as it is generated: text pieces, then the ChatResult.

    A failure before or during the stream raises LLMError; a stream abandoned by its
    reader is recorded as "Cancelled".
    """
    call = _Call("chat", model, credential, user)
    async with (
        call as route,
        clients.alease(route, model=model) as client,
        client.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
            model=model,
            messages=list(messages),
            stream=True,
            stream_options={"include_usage": True},
            **options,
        ) as response,
    ):
        answer = _StreamedAnswer(route, model, _cost(response.headers))
        with reading_answer(route):
            async for chunk in await response.parse():
                if piece := answer.add(chunk):
                    yield piece
        result = call.result = answer.result()
    yield result


def generate_code(
    *,
    prompt: str,
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
    **options: Any,
) -> ChatResult:
    call = _Call("code", model, credential, user)
    return _run(call, _completion(_code_messages(prompt), model, options), _chat_result)


async def agenerate_code(
    *,
    prompt: str,
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
    **options: Any,
) -> ChatResult:
    call = _Call("code", model, credential, user)
    return await _arun(call, _completion(_code_messages(prompt), model, options), _chat_result)


def embed(
    *,
    texts: Sequence[str],
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
) -> EmbeddingResult:
    call = _Call("embeddings", model, credential, user)
    return _run(call, _embedding(texts, model), _embedding_result)


async def aembed(
    *,
    texts: Sequence[str],
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
) -> EmbeddingResult:
    call = _Call("embeddings", model, credential, user)
    return await _arun(call, _embedding(texts, model), _embedding_result)


def _model_list(page: Any, route: Route, started: float) -> ModelList:
    with reading_answer(route):
        models = sorted(str(model.id) for model in page.data)
    latency = (time.perf_counter() - started) * 1000
    return ModelList(models=models, latency_ms=latency, route=_info(route))


def list_models(*, credential: APIKeyCredentials | None = None, user: Any = None) -> ModelList:
    """GET {base}/models with the credential's key. Listing models is not a use of the
    credential: it writes no usage record."""
    route = resolve_route("chat", credential, user=user)
    started = time.perf_counter()
    with clients.lease(route) as client:
        page = client.models.list()
    return _model_list(page, route, started)


async def alist_models(
    *, credential: APIKeyCredentials | None = None, user: Any = None
) -> ModelList:
    """The models the credential's key may use (the playground's suggestions)."""
    route = resolve_route("chat", credential, user=user)
    started = time.perf_counter()
    async with clients.alease(route) as client:
        page = await client.models.list()
    return _model_list(page, route, started)


def probe(credentials: Sequence[APIKeyCredentials]) -> list[ProbeResult]:
    """Test the connection of each credential, all at once: the admin's action.

    GET {base}/models with the credential's key, for the platform (inactive and expired
    credentials included), within LLM_PROBE_TIMEOUT_SECONDS and without retries. The
    results come in the order of `credentials`.
    """
    if not credentials:
        return []
    with ThreadPoolExecutor(min(PROBE_THREADS, len(credentials)), "probe") as pool:
        return list(pool.map(_probe, credentials))


def _probe(credential: APIKeyCredentials) -> ProbeResult:
    started = time.perf_counter()
    host = urlsplit(credential.effective_base_url).netloc
    try:
        route = resolve_route("chat", credential, user=PLATFORM, allow_inactive=True)
        host = route.host
        with clients.lease(route, probe=True) as client:
            listing = _model_list(client.models.list(), route, started)
    except LLMError as error:
        latency = (time.perf_counter() - started) * 1000
        return ProbeResult(credential.title, host, latency, error=str(error))
    return ProbeResult(credential.title, host, listing.latency_ms, tuple(listing.models))


__all__ = [
    "PLATFORM",
    "ChatResult",
    "EmbeddingResult",
    "LLMError",
    "ModelList",
    "ProbeResult",
    "RouteInfo",
    "Usage",
    "achat",
    "aembed",
    "agenerate_code",
    "alist_models",
    "astream_chat",
    "chat",
    "embed",
    "generate_code",
    "list_models",
    "probe",
]
