"""Chat, code and embeddings: every OpenAI-SDK call of the platform goes through here.

Each call resolves its route (the credential's, or the purpose's global default), takes
the cached client for it and turns whatever goes wrong into an LLMError sentence.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from django.utils import timezone

from credentials.models import APIKeyCredentials
from llm import clients
from llm import usage as usage_records
from llm.errors import SDK_ERRORS, LLMError, from_sdk_error, malformed_answer
from llm.routes import Purpose, Route, resolve_route

R = TypeVar("R", "ChatResult", "EmbeddingResult")
CODE_INSTRUCTIONS = (
    "You write code. Answer with the code first, then at most a few short sentences."
)
# last_used_at is written at most once a minute per credential and process.
TOUCH_INTERVAL = 60.0
_touched: dict[uuid.UUID, float] = {}


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
    try:
        completion = raw.parse()
        text = completion.choices[0].message.content or ""
        model = str(completion.model or "")
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        raise malformed_answer(route) from None
    return ChatResult(
        text=text,
        model=model,
        usage=_usage(completion),
        route=_info(route),
        cost_usd=_cost(raw.headers),
    )


def _embedding_result(raw: Any, route: Route) -> EmbeddingResult:
    try:
        response = raw.parse()
        rows = sorted(response.data, key=lambda row: row.index)
        vectors = [list(map(float, row.embedding)) for row in rows]
        model = str(response.model or "")
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        raise malformed_answer(route) from None
    return EmbeddingResult(
        vectors=vectors,
        model=model,
        usage=_usage(response),
        route=_info(route),
        cost_usd=_cost(raw.headers),
    )


def _due(credential: APIKeyCredentials | None) -> bool:
    if credential is None:
        return False
    now = time.monotonic()
    if now - _touched.get(credential.pk, -TOUCH_INTERVAL) < TOUCH_INTERVAL:
        return False
    _touched[credential.pk] = now
    credential.last_used_at = timezone.now()
    return True


def _touch(credential: APIKeyCredentials | None) -> None:
    if _due(credential):
        assert credential is not None
        APIKeyCredentials.objects.filter(pk=credential.pk).update(
            last_used_at=credential.last_used_at
        )


async def _atouch(credential: APIKeyCredentials | None) -> None:
    if _due(credential):
        assert credential is not None
        await APIKeyCredentials.objects.filter(pk=credential.pk).aupdate(
            last_used_at=credential.last_used_at
        )


def _code_messages(prompt: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": CODE_INSTRUCTIONS},
        {"role": "user", "content": prompt},
    ]


class _Call:
    """One call's bookkeeping: its route once resolved, its clock, its usage record."""

    def __init__(
        self, purpose: Purpose, model: str, credential: APIKeyCredentials | None, user: Any
    ) -> None:
        self.purpose, self.model, self.credential, self.user = purpose, model, credential, user
        self.route: Route | None = None
        self.started = time.perf_counter()

    def resolve(self, *, allow_inactive: bool = False) -> Route:
        self.route = resolve_route(
            self.purpose, self.credential, self.user, allow_inactive=allow_inactive
        )
        return self.route

    def fields(
        self, outcome: str, result: ChatResult | EmbeddingResult | None = None
    ) -> dict[str, Any]:
        user = self.user
        usage = result.usage if result else Usage()
        cost = result.cost_usd if result else None
        return {
            "credential_id": self.credential.pk if self.credential else None,
            "user_id": user.pk if user is not None and user.is_authenticated else None,
            "purpose": self.purpose,
            "model": (result.model if result and result.model else self.model)[:200],
            "route_source": self.route.source if self.route else "",
            "route_host": self.route.host if self.route else "",
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "cost_usd": usage_records.as_decimal(cost),
            "latency_ms": (time.perf_counter() - self.started) * 1000,
            "outcome": outcome,
        }


def _run(call: _Call, send: Callable[[Any], Any], parse: Callable[[Any, Route], R]) -> R:
    """Resolve, lease a client, send, parse; record the call either way."""
    try:
        route = call.resolve()
        try:
            with clients.lease(route) as client:
                raw = send(client)
        except SDK_ERRORS as error:
            raise from_sdk_error(error, route, model=call.model) from None
        result = parse(raw, route)
    except LLMError as error:
        usage_records.record(**call.fields(type(error).__name__))
        raise
    usage_records.record(**call.fields("ok", result))
    _touch(call.credential)
    return result


async def _arun(
    call: _Call, send: Callable[[Any], Awaitable[Any]], parse: Callable[[Any, Route], R]
) -> R:
    """The async twin of _run."""
    try:
        route = call.resolve()
        try:
            async with clients.alease(route) as client:
                raw = await send(client)
        except SDK_ERRORS as error:
            raise from_sdk_error(error, route, model=call.model) from None
        result = parse(raw, route)
    except LLMError as error:
        await usage_records.arecord(**call.fields(type(error).__name__))
        raise
    await usage_records.arecord(**call.fields("ok", result))
    await _atouch(call.credential)
    return result


def _complete(
    purpose: Purpose,
    messages: Sequence[dict[str, Any]],
    model: str,
    credential: APIKeyCredentials | None,
    user: Any,
    options: dict[str, Any],
) -> ChatResult:
    return _run(
        _Call(purpose, model, credential, user),
        lambda client: client.chat.completions.with_raw_response.create(
            model=model, messages=list(messages), **options
        ),
        _chat_result,
    )


async def _acomplete(
    purpose: Purpose,
    messages: Sequence[dict[str, Any]],
    model: str,
    credential: APIKeyCredentials | None,
    user: Any,
    options: dict[str, Any],
) -> ChatResult:
    return await _arun(
        _Call(purpose, model, credential, user),
        lambda client: client.chat.completions.with_raw_response.create(
            model=model, messages=list(messages), **options
        ),
        _chat_result,
    )


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
    outcome = "Cancelled"
    try:
        route = call.resolve()
        pieces: list[str] = []
        usage, seen_model, cost = Usage(), model, None
        try:
            async with (
                clients.alease(route) as client,
                client.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
                    model=model,
                    messages=list(messages),
                    stream=True,
                    stream_options={"include_usage": True},
                    **options,
                ) as response,
            ):
                cost = _cost(response.headers)
                async for chunk in await response.parse():
                    seen_model = chunk.model or seen_model
                    if chunk.usage:
                        usage = _usage(chunk)
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            pieces.append(choice.delta.content)
                            yield choice.delta.content
        except SDK_ERRORS as error:
            raise from_sdk_error(error, route, model=model) from None
        except (ValueError, TypeError, AttributeError, KeyError):
            raise malformed_answer(route) from None
        result = ChatResult(
            text="".join(pieces), model=seen_model, usage=usage, route=_info(route), cost_usd=cost
        )
        outcome = "ok"
        await usage_records.arecord(**call.fields("ok", result))
        await _atouch(credential)
        yield result
    except LLMError as error:
        outcome = type(error).__name__
        await usage_records.arecord(**call.fields(outcome))
        raise
    finally:
        if outcome == "Cancelled":
            usage_records.record_soon(**call.fields(outcome))


def chat(
    *,
    messages: Sequence[dict[str, Any]],
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
    **options: Any,
) -> ChatResult:
    """A chat completion; `options` go to the SDK (temperature, max_tokens, ...)."""
    return _complete("chat", messages, model, credential, user, options)


async def achat(
    *,
    messages: Sequence[dict[str, Any]],
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
    **options: Any,
) -> ChatResult:
    return await _acomplete("chat", messages, model, credential, user, options)


def generate_code(
    *,
    prompt: str,
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
    **options: Any,
) -> ChatResult:
    return _complete("code", _code_messages(prompt), model, credential, user, options)


async def agenerate_code(
    *,
    prompt: str,
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
    **options: Any,
) -> ChatResult:
    return await _acomplete("code", _code_messages(prompt), model, credential, user, options)


def embed(
    *,
    texts: Sequence[str],
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
) -> EmbeddingResult:
    return _run(
        _Call("embeddings", model, credential, user),
        lambda client: client.embeddings.with_raw_response.create(
            model=model, input=list(texts), encoding_format="float"
        ),
        _embedding_result,
    )


async def aembed(
    *,
    texts: Sequence[str],
    model: str,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
) -> EmbeddingResult:
    return await _arun(
        _Call("embeddings", model, credential, user),
        lambda client: client.embeddings.with_raw_response.create(
            model=model, input=list(texts), encoding_format="float"
        ),
        _embedding_result,
    )


def _model_list(page: Any, route: Route, started: float) -> ModelList:
    try:
        models = sorted(str(model.id) for model in page.data)
    except (ValueError, TypeError, AttributeError, KeyError):
        raise malformed_answer(route) from None
    latency = (time.perf_counter() - started) * 1000
    return ModelList(models=models, latency_ms=latency, route=_info(route))


def list_models(
    *,
    credential: APIKeyCredentials | None = None,
    user: Any = None,
    include_inactive: bool = False,
) -> ModelList:
    """GET {base}/models with the credential's key: the admin's connection test.

    `include_inactive` lets an admin test a credential before activating it. Listing
    models is not a usage of the credential: it writes no usage record.
    """
    route = resolve_route("chat", credential, user, allow_inactive=include_inactive)
    started = time.perf_counter()
    try:
        with clients.lease(route) as client:
            page = client.models.list()
    except SDK_ERRORS as error:
        raise from_sdk_error(error, route) from None
    return _model_list(page, route, started)


async def alist_models(
    *, credential: APIKeyCredentials | None = None, user: Any = None
) -> ModelList:
    """The models the credential's key may use (the playground's suggestions)."""
    route = resolve_route("chat", credential, user)
    started = time.perf_counter()
    try:
        async with clients.alease(route) as client:
            page = await client.models.list()
    except SDK_ERRORS as error:
        raise from_sdk_error(error, route) from None
    return _model_list(page, route, started)


__all__ = [
    "ChatResult",
    "EmbeddingResult",
    "LLMError",
    "ModelList",
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
]
