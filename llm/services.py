"""Chat, code and embeddings: every OpenAI-SDK call of the platform goes through here.

A call resolves its route for the user it is made for (the credential's, or the
purpose's global default), holds the cached client through a lease (which turns SDK
exceptions into LLMError sentences), reads the answer, and records itself (`_Call`).

When that route is down (no answer, or its circuit breaker open: llm.breaker), the call
goes on to the credential's fallbacks and then the LLM_FAILOVER_* route (`_Routes`);
the result says so (`RouteInfo.failed_over_from`). An answer, a 4xx included, never
fails over. A streamed call fails over only before its first chunk.

`user` is whom the call is for. A credential they may not use raises
CredentialUnavailable, and a call with no `user` may use no credential at all. Calls
the platform makes for itself pass `user=PLATFORM`, which skips the ownership check.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from credentials.models import PLATFORM, APIKeyCredentials
from credentials.selectors import acredential
from llm import clients, errors, limits, metrics, prices
from llm import usage as usage_records
from llm.breaker import Ask, Ticket, breakers
from llm.errors import LLMError, reading_answer
from llm.models import CostSource
from llm.routes import (
    MAX_FALLBACK_HOPS,
    Purpose,
    Route,
    failover_route,
    fallback_route,
    resolve_route,
)

R = TypeVar("R", "ChatResult", "EmbeddingResult")
CODE_INSTRUCTIONS = (
    "You write code. Answer with the code first, then at most a few short sentences."
)
# Connection tests of many credentials run at most this many at once.
PROBE_THREADS = 8


@dataclass(frozen=True)
class PassedOver:
    """A route a call did not take because it was down: what a user may see of it."""

    source: str
    host: str
    credential_id: str | None
    credential_title: str | None
    reason: str  # "connection refused", "circuit breaker open", ...


@dataclass(frozen=True)
class RouteInfo:
    """What a user may see of a route: where it went, not with which key.

    After a failover, `source` is "failover", the credential is the one that served
    (None for the LLM_FAILOVER_* route) and `failed_over_from` the route it replaced.
    """

    source: str
    host: str
    credential_id: str | None = None
    credential_title: str | None = None
    failed_over_from: PassedOver | None = None


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
    cost_source: str = CostSource.NONE  # llm.prices: "header", "price_table" or "none"


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[list[float]]
    model: str
    usage: Usage
    route: RouteInfo
    cost_usd: float | None = None
    cost_source: str = CostSource.NONE


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
    credential_id = str(route.credential_id) if route.credential_id else None
    return RouteInfo(route.source, route.host, credential_id, route.credential_title)


# A token count larger than this is no count (and no usage record could store it).
MAX_TOKEN_COUNT = 2**31 - 1


def _usage(raw: Any) -> Usage:
    """The answer's token counts; read inside `reading_answer` (ValueError: not counts)."""
    usage = getattr(raw, "usage", None)
    if usage is None:
        return Usage()
    prompt = _count(getattr(usage, "prompt_tokens", None))
    completion = _count(getattr(usage, "completion_tokens", None))
    total = _count(getattr(usage, "total_tokens", None)) or prompt + completion
    return Usage(prompt, completion, total)


def _count(value: Any) -> int:
    if value is None:
        return 0
    count = int(value)  # a number or digits; anything else raises
    if isinstance(value, bool) or (count != value and str(count) != value):
        raise ValueError(f"a token count that is not a whole number: {value!r}")
    if not 0 <= count <= MAX_TOKEN_COUNT:
        raise ValueError(f"a token count out of range: {count}")
    return count


def _cost(headers: Any, answer: Any = None) -> float | None:
    """What the call cost, in USD, as LiteLLM reports it: the x-litellm-response-cost
    header, else `usage.cost` in the answer (streamed answers carry only that, in their
    last chunk, when stream_options.include_usage is set)."""
    value = headers.get("x-litellm-response-cost") if headers is not None else None
    if value in (None, "", "None"):
        value = getattr(getattr(answer, "usage", None), "cost", None)
    try:
        cost = float(value) if value not in (None, "", "None") else None
    except (TypeError, ValueError, OverflowError):
        return None
    return cost if cost is not None and math.isfinite(cost) and cost >= 0 else None


def _chat_result(raw: Any, route: Route) -> ChatResult:
    with reading_answer(route):
        completion = raw.parse()
        text = completion.choices[0].message.content or ""
        model = str(completion.model or "")
        usage = _usage(completion)
    return ChatResult(text, model, usage, _info(route), _cost(raw.headers, completion))


def _embedding_result(raw: Any, route: Route) -> EmbeddingResult:
    with reading_answer(route):
        response = raw.parse()
        rows = sorted(response.data, key=lambda row: row.index)
        vectors = [list(map(float, row.embedding)) for row in rows]
        if not all(math.isfinite(sum(vector)) for vector in vectors):
            raise ValueError("a vector holds NaN or an infinity")
        model = str(response.model or "")
        usage = _usage(response)
    return EmbeddingResult(vectors, model, usage, _info(route), _cost(raw.headers, response))


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
            if self.cost is None:
                self.cost = _cost(None, chunk)
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


class _Routes:
    """The routes one call may take, in order, and what became of each.

    The chosen route first; when it is down (a connection-level failure, or its
    circuit breaker open): its credential's fallback chain (at most MAX_FALLBACK_HOPS,
    no cycles), then the LLM_FAILOVER_* route. A base URL that failed once in this call
    is not tried again. The chain is looked up only once the first route is down.
    """

    def __init__(
        self,
        purpose: Purpose,
        primary: Route,
        credential: APIKeyCredentials | None,
        *,
        fail_over: bool = True,
    ) -> None:
        self.purpose, self.primary, self.credential = purpose, primary, credential
        self.served: Route | None = None
        self.down: list[tuple[Route, LLMError]] = []  # failed or passed over, in order
        self.tried = 0
        self._queue = [primary]
        self._expanded = not fail_over  # the fallbacks are in the queue (or never will be)
        self._failed_urls: set[str] = set()
        self._passed: list[Route] = []  # passed over: their breakers were open

    def next(self) -> Route | Literal["expand"] | None:
        """The next route to try; "expand" when the fallback chain must be read first
        (`expand`); None when there is none left."""
        while self._queue:
            route = self._queue.pop(0)
            if route.base_url not in self._failed_urls:
                return route
        return None if self._expanded else "expand"

    def expand(self, chain: list[APIKeyCredentials]) -> None:
        """Queue the fallback chain's routes, then the LLM_FAILOVER_* route."""
        self._expanded = True
        self._queue = [route for c in chain if (route := fallback_route(self.purpose, c))]
        if last := failover_route(self.purpose):
            self._queue.append(last)

    def failed(self, route: Route, error: LLMError) -> None:
        """`route` gave no answer: the next goes elsewhere (never to its base URL)."""
        self.down.append((route, error))
        self._failed_urls.add(route.base_url)

    def skip(self, route: Route) -> None:
        """`route`'s breaker is open: passed over without a try."""
        retry_in = max(0.0, breakers.open_until(route.base_url) - time.time())
        self.down.append((route, errors.circuit_open(route, retry_in)))
        self._passed.append(route)

    def last_resort(self) -> Route | None:
        """When every route was passed over (none tried): the one whose breaker closes
        first, rather than failing without a try."""
        if not self._passed or self.tried:
            return None
        return min(self._passed, key=lambda route: breakers.open_until(route.base_url))

    def attempt(self, route: Route, ticket: Ticket) -> _Attempt:
        return _Attempt(self, route, ticket)

    def serve(self, route: Route) -> PassedOver | None:
        """`route` answered; the route it replaced after a failover, and why."""
        self.served = route
        if route is self.primary:
            return None
        first, error = self.down[0]
        reason = errors.IN_SHORT.get(error.fault, error.fault)
        return PassedOver(
            first.source, first.host, _info(first).credential_id, first.credential_title, reason
        )

    def info(self, result: R, route: Route) -> R:
        """`result` as served by `route`, saying which route it replaced (if any)."""
        passed = self.serve(route)
        if passed is None:
            return result
        return replace(result, route=replace(result.route, failed_over_from=passed))

    def error(self) -> LLMError:
        """Why no route served: the first one's error, naming the others that failed."""
        if not self.down:  # pragma: no cover - a route is always tried or passed over
            return errors.unreachable(self.primary, "refused")
        (_, first), *rest = self.down
        if not rest:
            return first
        also = "; ".join(
            f"{errors.who(r)} at {r.host} ({errors.IN_SHORT.get(e.fault, e.fault)})"
            for r, e in rest
        )
        error = type(first)(
            f"{first.message} Its failover routes are down too: {also}.",
            status=first.status,
            fault=first.fault,
        )
        error.retry_after = first.retry_after
        return error


class _Attempt:
    """One try of one route: reports the outcome to its breaker and to the call."""

    __slots__ = ("route", "routes", "ticket")

    def __init__(self, routes: _Routes, route: Route, ticket: Ticket) -> None:
        self.routes, self.route, self.ticket = routes, route, ticket

    def __enter__(self) -> None:
        self.routes.tried += 1

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        breakers.done(self.ticket, error)
        if isinstance(error, LLMError) and error.connection_level:
            self.routes.failed(self.route, error)


def _fallbacks(credential: APIKeyCredentials | None) -> Iterator[APIKeyCredentials]:
    """The credential's fallback chain, read from the database (sync code)."""
    seen = {credential.pk} if credential else set()
    while credential is not None and len(seen) <= MAX_FALLBACK_HOPS:
        next_id = credential.fallback_id
        if next_id is None or next_id in seen:
            return
        seen.add(next_id)
        credential = APIKeyCredentials.objects.filter(pk=next_id).first()
        if credential is not None:
            yield credential


async def _afallbacks(credential: APIKeyCredentials | None) -> AsyncIterator[APIKeyCredentials]:
    """The fallback chain from this process's copies (no thread hop while fresh)."""
    seen = {credential.pk} if credential else set()
    while credential is not None and len(seen) <= MAX_FALLBACK_HOPS:
        next_id = credential.fallback_id
        if next_id is None or next_id in seen:
            return
        seen.add(next_id)
        credential = await acredential(next_id)
        if credential is not None:
            yield credential


def _tickets(routes: _Routes) -> Iterator[tuple[Route, Ticket]]:
    """The routes to try, each with its breaker's leave (sync code: the chain from the
    database, the cache asked in this thread)."""
    while (route := routes.next()) is not None:
        if route == "expand":
            routes.expand(list(_fallbacks(routes.credential)))
            continue
        ticket = breakers.admit(route.base_url)
        if isinstance(ticket, Ask):
            ticket = breakers.ask(route.base_url)
        if ticket is None:
            routes.skip(route)
        else:
            yield route, ticket
    if (last := routes.last_resort()) and (forced := breakers.force(last.base_url)):
        yield last, forced


async def _atickets(routes: _Routes) -> AsyncGenerator[tuple[Route, Ticket]]:
    """`_tickets` for async calls: the chain from the copies, the cache asked on the loop."""
    while (route := routes.next()) is not None:
        if route == "expand":
            routes.expand([credential async for credential in _afallbacks(routes.credential)])
            continue
        ticket = breakers.admit(route.base_url)
        if isinstance(ticket, Ask):
            ticket = await breakers.aask(route.base_url)
        if ticket is None:
            routes.skip(route)
        else:
            yield route, ticket
    if (last := routes.last_resort()) and (forced := await breakers.aforce(last.base_url)):
        yield last, forced


class _Call:
    """One call's bookkeeping, for sync, async and streaming calls alike.

    Entering resolves the chosen route, checks the credential's limits (llm.limits:
    a refusal is raised before anything is sent) and starts the clock; leaving counts
    the call against those limits and writes the usage record with the outcome ("ok",
    the error's class, or "Cancelled": the caller went away), the route that served,
    whether that was a failover, and the cost (llm.prices: `priced`).
    """

    def __init__(
        self, purpose: Purpose, model: str, credential: APIKeyCredentials | None, user: Any
    ) -> None:
        self.purpose, self.model, self.credential, self.user = purpose, model, credential, user
        self.routes: _Routes | None = None
        self.result: ChatResult | EmbeddingResult | None = None
        self.admission: limits.Admission | None = None
        self.started = time.perf_counter()

    def __enter__(self) -> _Routes:
        try:
            routes = self._resolve()
            self.admission = limits.admit(self.credential, self.user, self.model)
            return routes
        except LLMError as error:
            self.__exit__(type(error), error, None)
            raise

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        usage_records.record(**self._finish(error))
        limits.charge(self.admission, self._cost(), self._tokens())

    async def __aenter__(self) -> _Routes:
        try:
            routes = self._resolve()
            self.admission = await limits.aadmit(self.credential, self.user, self.model)
            return routes
        except LLMError as error:
            await self.__aexit__(type(error), error, None)
            raise

    async def __aexit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        await usage_records.arecord(**self._finish(error))
        await self.acharge()

    async def acharge(self) -> None:
        """Count the call against the limits now, once (a stream does so before it hands
        over its result: a reader may send its next call as soon as it has it)."""
        admission, self.admission = self.admission, None
        await limits.acharge(admission, self._cost(), self._tokens())

    def _cost(self) -> float | None:
        return self.result.cost_usd if self.result else None

    def _tokens(self) -> int:
        return self.result.usage.total_tokens if self.result else 0

    def priced(self, result: R) -> R:
        """`result` with its cost: the answer's own, else from the price table."""
        if prices.answered(result.cost_usd, _tokens(result)):
            return replace(result, cost_source=CostSource.HEADER)
        return self._from_table(result, prices.table())

    async def apriced(self, result: R) -> R:
        if prices.answered(result.cost_usd, _tokens(result)):
            return replace(result, cost_source=CostSource.HEADER)
        return self._from_table(result, await prices.atable())

    def _from_table(self, result: R, table: prices.PriceTable) -> R:
        cost, source = prices.cost_of(
            table,
            models=(result.model, self.model),
            provider=self.credential.provider if self.credential else None,
            tokens=_tokens(result),
        )
        return replace(result, cost_usd=cost, cost_source=source)

    def _resolve(self) -> _Routes:
        primary = resolve_route(self.purpose, self.credential, user=self.user)
        self.routes = _Routes(self.purpose, primary, self.credential)
        return self.routes

    def _finish(self, error: BaseException | None) -> dict[str, Any]:
        """The usage record's fields, once the call is counted in the metrics."""
        fields = self._fields(error)
        result = self.result if error is None else None
        serving = fields["serving_credential_id"]
        metrics.record_call(
            purpose=self.purpose,
            source=fields["route_source"],
            host=fields["route_host"],
            outcome=fields["outcome"],
            latency_seconds=fields["latency_ms"] / 1000,
            prompt_tokens=fields["prompt_tokens"],
            completion_tokens=fields["completion_tokens"],
            cost_usd=result.cost_usd if result else None,
            credential_id=str(serving) if serving else None,
        )
        if fields["failed_over"] and self.routes:
            metrics.record_failover(
                from_host=self.routes.primary.host, to_host=fields["route_host"]
            )
        return fields

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
        routes = self.routes
        route = routes and (routes.served or routes.primary)
        return {
            "credential_id": self.credential.pk if self.credential else None,
            "serving_credential_id": route.credential_id if route else None,
            # The titles at the call: usage keeps them after a credential is deleted.
            "credential_title": self.credential.title if self.credential else "",
            "serving_credential_title": (route.credential_title or "") if route else "",
            "user_id": user.pk if getattr(user, "is_authenticated", False) else None,
            "purpose": self.purpose,
            "model": (result.model if result and result.model else self.model)[:200],
            "route_source": route.source if route else "",
            "route_host": route.host if route else "",
            "failed_over": bool(routes and routes.served and routes.served is not routes.primary),
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "cost_usd": usage_records.as_decimal(result.cost_usd if result else None),
            "cost_source": result.cost_source if result else CostSource.NONE,
            "latency_ms": (time.perf_counter() - self.started) * 1000,
            "outcome": outcome,
        }


def _tokens(result: ChatResult | EmbeddingResult) -> tuple[int, int]:
    return result.usage.prompt_tokens, result.usage.completion_tokens


def _run(call: _Call, send: Callable[[Any], Any], read: Callable[[Any, Route], R]) -> R:
    with call as routes:
        for route, ticket in _tickets(routes):
            try:
                with (
                    routes.attempt(route, ticket),
                    clients.lease(route, model=call.model) as client,
                ):
                    result = read(send(client), route)
            except LLMError as error:
                if error.connection_level:
                    continue
                raise
            call.result = result = routes.info(call.priced(result), route)
            return result
        raise routes.error()


async def _arun(
    call: _Call, send: Callable[[Any], Awaitable[Any]], read: Callable[[Any, Route], R]
) -> R:
    async with call as routes, aclosing(_atickets(routes)) as tickets:
        async for route, ticket in tickets:
            try:
                with routes.attempt(route, ticket):
                    async with clients.alease(route, model=call.model) as client:
                        result = read(await send(client), route)
            except LLMError as error:
                if error.connection_level:
                    continue
                raise
            call.result = result = routes.info(await call.apriced(result), route)
            return result
        raise routes.error()


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
) -> AsyncIterator[str | RouteInfo | ChatResult]:
    """A chat completion as it is generated: the RouteInfo of the route that answers
    (once its first chunk came), the text pieces, then the ChatResult.

    A failure before the first chunk fails over (or raises LLMError); a failure after
    it raises LLMError (never a silent switch: the reader has half an answer). A stream
    abandoned by its reader is recorded as "Cancelled".
    """
    call = _Call("chat", model, credential, user)
    async with call as routes, aclosing(_atickets(routes)) as tickets:
        async for route, ticket in tickets:
            try:
                with routes.attempt(route, ticket):
                    stream = await _open_stream(route, model, messages, options)
            except LLMError as error:
                if error.connection_level:
                    continue
                raise
            async with stream.resources:
                yield replace(_info(route), failed_over_from=routes.serve(route))
                answer = _StreamedAnswer(route, model, stream.cost)
                piece = stream.first
                while piece is not None:
                    with reading_answer(route):
                        text = answer.add(piece)
                    if text:
                        yield text
                    with reading_answer(route):
                        piece = await anext(stream.chunks, None)
            call.result = result = routes.info(await call.apriced(answer.result()), route)
            await call.acharge()
            yield result
            return
        raise routes.error()


@dataclass
class _OpenStream:
    resources: AsyncExitStack  # the lease and the response, open until the stream ends
    chunks: AsyncIterator[Any]
    first: Any  # the first chunk (None: the stream was empty)
    cost: float | None


async def _open_stream(
    route: Route, model: str, messages: Sequence[dict[str, Any]], options: dict[str, Any]
) -> _OpenStream:
    """Start a streamed completion and wait for its first chunk: until then, a failure
    may fail over. Whatever the SDK raises comes out of the lease as an LLMError."""
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(clients.alease(route, model=model))
        response = await stack.enter_async_context(
            client.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
                model=model,
                messages=list(messages),
                stream=True,
                stream_options={"include_usage": True},
                **options,
            )
        )
        chunks = aiter(await response.parse())
        with reading_answer(route):
            first = await anext(chunks, None)
            if first is None and "text/event-stream" not in response.headers.get(
                "content-type", ""
            ):
                raise ValueError("no events: the answer is not a stream")
        return _OpenStream(stack.pop_all(), chunks, first, _cost(response.headers))
    raise AssertionError("unreachable")  # pragma: no cover - for type checkers


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


def model_ids(page: Any) -> list[str]:
    """The model names of a GET /models answer, sorted; read inside `reading_answer`."""
    ids = [model.id for model in page.data]
    if not all(isinstance(name, str) for name in ids):
        raise TypeError("a model without a name")
    return sorted(ids)


def _model_list(
    page: Any, route: Route, started: float, credential: APIKeyCredentials | None = None
) -> ModelList:
    """The models of a GET /models answer; with `credential`, those its allow-list allows."""
    with reading_answer(route):
        models = model_ids(page)
    if credential is not None and credential.allowed_models:
        models = [name for name in models if credential.allows_model(name)]
    latency = (time.perf_counter() - started) * 1000
    return ModelList(models=models, latency_ms=latency, route=_info(route))


def list_models(*, credential: APIKeyCredentials | None = None, user: Any = None) -> ModelList:
    """GET {base}/models with the credential's key, filtered by its allowed models.
    Listing models is not a use of the credential: it writes no usage record, counts
    against no limit, and it does not fail over (the list is the credential's own), but
    it respects the route's circuit breaker."""
    routes = _Routes("chat", resolve_route("chat", credential, user=user), None, fail_over=False)
    started = time.perf_counter()
    for route, ticket in _tickets(routes):
        with routes.attempt(route, ticket), clients.lease(route) as client:
            return _model_list(client.models.list(), route, started, credential)
    raise routes.error()


async def alist_models(
    *, credential: APIKeyCredentials | None = None, user: Any = None
) -> ModelList:
    """The models the credential may use (the playground's suggestions)."""
    routes = _Routes("chat", resolve_route("chat", credential, user=user), None, fail_over=False)
    started = time.perf_counter()
    async with aclosing(_atickets(routes)) as tickets:
        async for route, ticket in tickets:
            with routes.attempt(route, ticket):
                async with clients.alease(route) as client:
                    page = await client.models.list()
            return _model_list(page, route, started, credential)
    raise routes.error()


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
    "PassedOver",
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
