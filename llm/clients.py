"""The only module that builds OpenAI clients, and the one place SDK errors are translated.

One sync and one async client per (base URL, key fingerprint, options), kept in a
bounded, thread-safe LRU and sharing one SSL context. Building a client costs
milliseconds and a connection pool; reusing one costs a dictionary lookup and keeps
connections alive between calls.

A call holds its client through a lease (`lease`, `alease`): eviction never closes a
client under a call in flight, and any exception the SDK raises inside the lease leaves
it as the LLMError that says what went wrong (`translate`).

Async clients belong to the event loop they were first used on (their connection pool
does), so they are keyed by loop too, and closed when that loop ends
(platform_site.loops): under uvicorn that is the worker's exit; under the test client,
`async_to_sync` or `asyncio.run`, the end of each run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import aiohttp
import httpx2
import openai
from django.conf import settings
from openai._vendor.httpx_aiohttp.transport import AiohttpTransport

from credentials.policy import site_base_url_problem
from llm import egress, errors, metrics
from llm.errors import CredentialUnavailable, LLMError
from llm.routes import Route
from platform_site.loops import at_loop_end

# Per-process salt: fingerprints identify a key inside this process and nowhere else.
_SALT = os.urandom(16)


@dataclass(frozen=True)
class ClientOptions:
    timeout: float
    connect_timeout: float
    max_retries: int
    trust_env: bool
    keepalive: float = 4.0
    timeout_setting: str = "LLM_TIMEOUT_SECONDS"  # named when a call runs out of time

    @classmethod
    def from_settings(cls) -> ClientOptions:
        return cls(
            timeout=settings.LLM_TIMEOUT_SECONDS,
            connect_timeout=settings.LLM_CONNECT_TIMEOUT_SECONDS,
            max_retries=settings.LLM_MAX_RETRIES,
            trust_env=settings.LLM_TRUST_ENV_PROXY,
            keepalive=settings.LLM_KEEPALIVE_SECONDS,
        )

    @classmethod
    def for_probes(cls) -> ClientOptions:
        """Connection tests: a short time budget of their own, and no retries."""
        timeout = settings.LLM_PROBE_TIMEOUT_SECONDS
        return cls(
            timeout=timeout,
            connect_timeout=min(settings.LLM_CONNECT_TIMEOUT_SECONDS, timeout),
            max_retries=0,
            trust_env=settings.LLM_TRUST_ENV_PROXY,
            keepalive=settings.LLM_KEEPALIVE_SECONDS,
            timeout_setting="LLM_PROBE_TIMEOUT_SECONDS",
        )

    def httpx_timeout(self) -> httpx2.Timeout:
        return httpx2.Timeout(self.timeout, connect=min(self.connect_timeout, self.timeout))


@cache
def shared_ssl_context() -> ssl.SSLContext:
    """Built once: loading the CA bundle is most of what a new client costs."""
    return httpx2.create_ssl_context()


def fingerprint(route: Route) -> str:
    """A keyed hash of the route's key: tells keys apart without holding them."""
    key = route.api_key.get_secret_value().encode()
    return hashlib.blake2b(key, key=_SALT, digest_size=16).hexdigest()


@dataclass(eq=False)
class _Entry:
    client: openai.OpenAI | openai.AsyncOpenAI
    credential_id: uuid.UUID | None
    loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
    in_use: int = 0  # calls holding a lease on the client
    retired: bool = False  # out of the cache; closed once in_use drops to 0


def _loop_gone(loop: weakref.ref[asyncio.AbstractEventLoop]) -> bool:
    alive = loop()
    return alive is None or alive.is_closed()


class ClientCache:
    """A bounded, thread-safe LRU of clients.

    An evicted client is closed as soon as no call holds a lease on it, so saving a
    credential never cuts a call in flight. Clients are built outside the lock (that
    takes milliseconds); when two threads build the same one, the loser's is dropped.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._closing: set[asyncio.Future[Any]] = set()
        self.builds = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[Any, ...], route: Route, build: Any, loop: Any = None) -> Any:
        """The client for `key`, without a lease: eviction may close it under the caller."""
        return self.acquire(key, route, build, loop, lease=False).client

    def acquire(
        self,
        key: tuple[Any, ...],
        route: Route,
        build: Any,
        loop: Any = None,
        *,
        lease: bool = True,
    ) -> _Entry:
        with self._lock:
            entry = self._entries.get(key)
            if self._valid(entry, loop):
                assert entry is not None
                self._entries.move_to_end(key)
                entry.in_use += lease
                return entry
        client = build()
        retired: list[_Entry] = []
        with self._lock:
            current = self._entries.get(key)
            if self._valid(current, loop):  # another thread built it meanwhile
                assert current is not None
                current.in_use += lease
                entry, spare = current, client
            else:
                spare = None
                entry = _Entry(client, route.credential_id, weakref.ref(loop) if loop else None)
                entry.in_use += lease
                self.builds += 1
                if current is not None:  # a client of a loop that is gone, under a reused id
                    retired.append(self._entries.pop(key))
                self._entries[key] = entry
                # Clients of event loops that are gone (a loop per request under WSGI or
                # asyncio.run) can never be used again.
                dead = [k for k, e in self._entries.items() if e.loop and _loop_gone(e.loop)]
                retired.extend(self._entries.pop(k) for k in dead)
                while len(self._entries) > self.maxsize:
                    retired.append(self._entries.popitem(last=False)[1])
        if isinstance(spare, openai.OpenAI):
            spare.close()  # never used; an unused async client holds no connection yet
        self._retire(retired)
        metrics.client_cache(size=len(self._entries), evicted=len(retired))
        return entry

    def release(self, entry: _Entry) -> None:
        with self._lock:
            entry.in_use -= 1
            idle = entry.retired and entry.in_use == 0
        if idle:
            self._close(entry)

    def evict(self, credential_id: uuid.UUID | None = None) -> int:
        """Drop the clients of one credential, or all of them; close them when idle."""
        with self._lock:
            keys = [
                key
                for key, entry in self._entries.items()
                if credential_id is None or entry.credential_id == credential_id
            ]
            evicted = [self._entries.pop(key) for key in keys]
        self._retire(evicted)
        metrics.client_cache(size=len(self._entries), evicted=len(evicted))
        return len(evicted)

    async def aclose_loop(self) -> None:
        """Close every async client of the running loop (its end is near)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.loop and e.loop() is loop]
            evicted = [self._entries.pop(key) for key in keys]
        metrics.client_cache(size=len(self._entries), evicted=len(evicted))
        for entry in evicted:
            await entry.client.close()  # type: ignore[misc]

    @staticmethod
    def _valid(entry: _Entry | None, loop: Any) -> bool:
        return entry is not None and (
            loop is None or (entry.loop is not None and entry.loop() is loop)
        )

    def _retire(self, entries: list[_Entry]) -> None:
        for entry in entries:
            with self._lock:
                entry.retired = True
                idle = entry.in_use == 0
            if idle:
                self._close(entry)

    def _close(self, entry: _Entry) -> None:
        client = entry.client
        if isinstance(client, openai.OpenAI):
            client.close()
            return
        loop = entry.loop() if entry.loop else None
        if loop is None or loop.is_closed():
            return  # its connections died with the loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        elif loop.is_running():
            asyncio.run_coroutine_threadsafe(client.close(), loop)


_cache = ClientCache(maxsize=settings.LLM_CLIENT_CACHE_SIZE)


def _check_policy(route: Route) -> None:
    problem = site_base_url_problem(route.base_url)
    if problem:
        who = f"credential {route.credential_title!r}" if route.credential_title else route.source
        raise CredentialUnavailable(
            f"The base URL of {who} is refused: {problem}", reason="base_url_refused"
        )


def _key(kind: str, route: Route, options: ClientOptions) -> tuple[Any, ...]:
    return (kind, route.base_url, fingerprint(route), options)


def _limits(options: ClientOptions) -> httpx2.Limits:
    # The SDK's pool sizes, and idle connections dropped before a proxy drops them.
    return httpx2.Limits(
        max_connections=1000, max_keepalive_connections=100, keepalive_expiry=options.keepalive
    )


def _http_options(options: ClientOptions) -> dict[str, Any]:
    return {"timeout": options.httpx_timeout(), "follow_redirects": False}


# Connections go only to addresses the base-URL policy accepts, judged as they are
# opened (llm.egress). With LLM_TRUST_ENV_PROXY the environment's proxy opens them, and
# resolves the names: the transports are the SDK's own, and the egress proxy must judge.


def _sync_http_client(options: ClientOptions) -> httpx2.Client:
    if options.trust_env:
        return openai.DefaultHttpx2Client(
            **_http_options(options), verify=shared_ssl_context(), limits=_limits(options)
        )
    transport = egress.GuardedTransport(verify=shared_ssl_context(), limits=_limits(options))
    return openai.DefaultHttpx2Client(
        **_http_options(options), transport=transport, trust_env=False
    )


def _async_http_client(options: ClientOptions) -> httpx2.AsyncClient:
    if options.trust_env:
        return openai.DefaultAioHttpClient(
            **_http_options(options), verify=shared_ssl_context(), limits=_limits(options)
        )
    context, limits = shared_ssl_context(), _limits(options)
    transport = AiohttpTransport(
        verify=context,
        limits=limits,
        client=partial(egress.aiohttp_session, context, limits),
    )
    return openai.DefaultAioHttpClient(
        **_http_options(options), transport=transport, trust_env=False
    )


def _sdk_options(route: Route, options: ClientOptions) -> dict[str, Any]:
    _check_policy(route)
    return {
        "api_key": route.api_key.get_secret_value(),
        "base_url": route.base_url,
        "timeout": options.httpx_timeout(),
        "max_retries": options.max_retries,
    }


def _sync_entry(route: Route, options: ClientOptions, *, lease: bool) -> _Entry:
    def build() -> openai.OpenAI:
        return openai.OpenAI(
            **_sdk_options(route, options),
            http_client=_sync_http_client(options),
        )

    return _cache.acquire(_key("sync", route, options), route, build, lease=lease)


def _async_entry(route: Route, options: ClientOptions) -> _Entry:
    loop = asyncio.get_running_loop()

    def build() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            **_sdk_options(route, options),
            http_client=_async_http_client(options),
        )

    key = (*_key("async", route, options), id(loop))
    return _cache.acquire(key, route, build, loop)


def get_client(route: Route) -> openai.OpenAI:
    """The cached sync client for `route`, unleased (calls should take a `lease`)."""
    client = _sync_entry(route, ClientOptions.from_settings(), lease=False).client
    assert isinstance(client, openai.OpenAI)
    return client


class _Lease:
    """A client held open until the block ends, even if it is evicted meanwhile.

    Whatever the SDK raises inside the block leaves it as an LLMError (`translate`).
    A class, not a generator-based context manager: an abandoned async stream is
    finalized by the garbage collector, and generator context managers finalized out of
    order fail with "generator didn't stop after athrow()".
    """

    def __init__(self, route: Route, model: str | None, options: ClientOptions) -> None:
        self.route, self.model, self.options = route, model, options
        self.entry: _Entry | None = None

    def __enter__(self) -> openai.OpenAI:
        self.entry = _sync_entry(self.route, self.options, lease=True)
        return self.entry.client  # type: ignore[return-value]

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self._release(error)

    async def __aenter__(self) -> openai.AsyncOpenAI:
        self.entry = _async_entry(self.route, self.options)
        await at_loop_end("OpenAI clients", _cache.aclose_loop)
        return self.entry.client  # type: ignore[return-value]

    async def __aexit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        self._release(error)

    def _release(self, error: BaseException | None) -> None:
        assert self.entry is not None
        _cache.release(self.entry)
        if error is not None and not isinstance(error, LLMError):
            translated = sdk_error(error, self.route, model=self.model, options=self.options)
            if translated is not None:
                raise translated from None


def lease(route: Route, *, model: str | None = None, probe: bool = False) -> _Lease:
    """The sync client for `route`, held until the `with` block ends.

    `model` is named in a "model not found" error; `probe` gives the call the short
    time budget of connection tests and no retries.
    """
    return _Lease(route, model, _options(probe))


def alease(route: Route, *, model: str | None = None, probe: bool = False) -> _Lease:
    """The async client for `route` (aiohttp transport) on the running loop, held."""
    return _Lease(route, model, _options(probe))


def _options(probe: bool) -> ClientOptions:
    return ClientOptions.for_probes() if probe else ClientOptions.from_settings()


def evict(credential_id: uuid.UUID | None = None) -> int:
    return _cache.evict(credential_id)


def cache_stats() -> dict[str, int]:
    return {"clients": len(_cache), "builds": _cache.builds}


def probe_status(route: Route, url: str) -> int:
    """The status a GET of `url` answers, sent without the key: the doctor's look at
    LiteLLM's unauthenticated /health/liveliness.

    The route's probe client sends it (short time budget, no retries, the route's base
    URL policy). Any answer is a status, a 404 included; no answer raises the LLMError
    that says why, as every lease does.
    """
    with lease(route, probe=True) as client:
        try:
            response = client.get(
                url, cast_to=httpx2.Response, options={"headers": {"Authorization": openai.Omit()}}
            )
        except openai.APIStatusError as error:
            return error.status_code
    return response.status_code


# ---- translating SDK errors ----------------------------------------------------------

# What resolvers say when a name does not resolve (glibc, musl, macOS). Not "dns": the
# error text carries the host, and a proxy named dns-gateway is refused, not unresolved.
DNS_FAILURES = (
    "name or service not known",
    "temporary failure in name resolution",
    "nodename nor servname",
    "no address associated",
    "getaddrinfo failed",
)
DNS_ERRORS = (socket.gaierror, aiohttp.ClientConnectorDNSError)
TLS_ERRORS = (ssl.SSLError, ssl.CertificateError, aiohttp.ClientSSLError)
# The SDK's transports wrap these in different exceptions (the aiohttp one even calls a
# refused connection a connect timeout), so the cause chain is what tells them apart.
CONNECT_FAILURES = (
    ConnectionRefusedError,
    socket.gaierror,
    aiohttp.ClientConnectorError,
    httpx2.ConnectError,
)
DROPPED = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    httpx2.RemoteProtocolError,
    httpx2.ReadError,
)


# Where the SDK reads an answer: what it raises there other than an OpenAIError (the JSON
# parser's error on an HTML page, an AttributeError on a list where an object was due,
# ...) says the answer is not an OpenAI-compatible one. Where it builds a request: what
# it raises there says the request cannot be encoded. (file name, function) pairs.
_SDK_DIR = os.path.dirname(openai.__file__)
_READING = frozenset(
    {
        ("_base_client.py", "_process_response"),
        ("_response.py", "parse"),
        ("_response.py", "_parse"),
        ("_legacy_response.py", "parse"),
        ("_legacy_response.py", "_parse"),
        ("_streaming.py", "__next__"),
        ("_streaming.py", "__anext__"),
        ("_streaming.py", "__stream__"),
    }
)
_BUILDING = frozenset({("_base_client.py", "_build_request")})


def sdk_error(
    error: BaseException,
    route: Route,
    *,
    model: str | None = None,
    options: ClientOptions | None = None,
) -> LLMError | None:
    """The LLMError for `error`, raised inside a lease; None when it is not the SDK's
    (a bug of the caller's stays what it is)."""
    if isinstance(error, openai.OpenAIError):
        return translate(error, route, model=model, options=options)
    frames = _sdk_frames(error)
    if isinstance(error, errors.MALFORMED) and frames & _READING:
        return errors.malformed_answer(route)
    if isinstance(error, UnicodeEncodeError | RecursionError) and frames & _BUILDING:
        return errors.unsendable(route, error)
    return None


def _sdk_frames(error: BaseException) -> set[tuple[str, str]]:
    """The SDK's (file name, function) pairs that `error` was raised through."""
    frames = set()
    trace = error.__traceback__
    while trace is not None:
        code = trace.tb_frame.f_code
        if code.co_filename.startswith(_SDK_DIR + os.sep):
            frames.add((os.path.basename(code.co_filename), code.co_name))
        trace = trace.tb_next
    return frames


def translate(
    error: openai.OpenAIError,
    route: Route,
    *,
    model: str | None = None,
    options: ClientOptions | None = None,
) -> LLMError:
    """The LLMError for an exception the OpenAI SDK raised while calling `route`."""
    causes = list(_causes(error))
    refused = next((cause for cause in causes if isinstance(cause, egress.EgressRefused)), None)
    if refused is not None:
        return errors.egress_refused(route, refused.host, refused.address, refused.problem)
    if any(isinstance(cause, TLS_ERRORS) for cause in causes):
        return errors.unreachable(route, "tls")
    if any(isinstance(cause, CONNECT_FAILURES) for cause in causes):
        text = " ".join(str(cause) for cause in causes).lower()
        unresolved = any(isinstance(cause, DNS_ERRORS) for cause in causes) or any(
            phrase in text for phrase in DNS_FAILURES
        )
        return errors.unreachable(route, "dns" if unresolved else "refused")
    if any(isinstance(cause, DROPPED) for cause in causes):
        return errors.dropped(route)
    if isinstance(error, openai.APITimeoutError):
        return errors.timed_out(route, (options or ClientOptions.from_settings()).timeout_setting)
    if isinstance(error, openai.APIConnectionError):
        return errors.connection_failed(route)
    if isinstance(error, openai.APIStatusError):
        return errors.answered(
            route,
            error.status_code,
            _upstream_detail(error, route),
            model=model,
            retry_after=_retry_after(error.response),
            model_refused=_model_refused(error),
        )
    if isinstance(error, openai.APIResponseValidationError):
        return errors.malformed_answer(route)
    return errors.call_failed(route, type(error).__name__)


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _upstream_detail(error: openai.APIStatusError, route: Route) -> str:
    """The upstream's own error message, short, with the key scrubbed out."""
    body: Any = error.body
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message", "")
    text = body if isinstance(body, str) else json.dumps(body) if body else ""
    key = route.api_key.get_secret_value()
    if key:
        text = text.replace(key, "[key]")
    return " ".join(text.split())[:200]


# How proxies say "this key may not use that model": LiteLLM 1.108 (403, its error
# type), and the 401 wording of older LiteLLM releases.
MODEL_REFUSALS = ("not available for this api key", "not allowed to access model")


def _model_refused(error: openai.APIStatusError) -> bool:
    if error.status_code not in (401, 403):
        return False
    if str(getattr(error, "type", "") or "") == "key_model_access_denied":
        return True
    return any(phrase in error.message.lower() for phrase in MODEL_REFUSALS)


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
