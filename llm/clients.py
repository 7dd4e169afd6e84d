"""The only module that builds OpenAI clients.

One sync and one async client per (base URL, key fingerprint, options), kept in a
bounded, thread-safe LRU and sharing one SSL context. Building a client costs
milliseconds and a connection pool; reusing one costs a dictionary lookup and keeps
connections alive between calls.

Async clients belong to the event loop they were first used on (their connection
pool does), so they are also keyed by loop. Code that runs its own loops
(`asyncio.run` in a command or a test) should `await aclose_loop_clients()` before the
loop ends; under an ASGI server the loop lives as long as the process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import threading
import uuid
import weakref
from collections import OrderedDict
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from functools import cache
from typing import Any

import httpx2
import openai
from django.conf import settings

from credentials.policy import base_url_problem
from llm.errors import CredentialUnavailable
from llm.routes import Route

# Per-process salt: fingerprints identify a key inside this process and nowhere else.
_SALT = os.urandom(16)


@dataclass(frozen=True)
class ClientOptions:
    timeout: float
    connect_timeout: float
    max_retries: int
    trust_env: bool

    @classmethod
    def from_settings(cls) -> ClientOptions:
        return cls(
            timeout=settings.LLM_TIMEOUT_SECONDS,
            connect_timeout=settings.LLM_CONNECT_TIMEOUT_SECONDS,
            max_retries=settings.LLM_MAX_RETRIES,
            trust_env=settings.LLM_TRUST_ENV_PROXY,
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
        return len(evicted)

    async def aclose_loop(self) -> None:
        """Close every async client of the running loop (its end is near)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.loop and e.loop() is loop]
            evicted = [self._entries.pop(key) for key in keys]
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
    problem = base_url_problem(route.base_url, allowed_hosts=settings.LLM_ALLOWED_BASE_URL_HOSTS)
    if problem:
        who = f"credential {route.credential_title!r}" if route.credential_title else route.source
        raise CredentialUnavailable(
            f"The base URL of {who} is refused: {problem}", reason="base_url_refused"
        )


def _key(kind: str, route: Route, options: ClientOptions) -> tuple[Any, ...]:
    return (kind, route.base_url, fingerprint(route), options)


def _http_options(options: ClientOptions) -> dict[str, Any]:
    return {
        "verify": shared_ssl_context(),
        "timeout": options.httpx_timeout(),
        "follow_redirects": False,
        "trust_env": options.trust_env,
    }


def _sdk_options(route: Route, options: ClientOptions) -> dict[str, Any]:
    _check_policy(route)
    return {
        "api_key": route.api_key.get_secret_value(),
        "base_url": route.base_url,
        "timeout": options.httpx_timeout(),
        "max_retries": options.max_retries,
    }


def _sync_entry(route: Route, *, lease: bool) -> _Entry:
    options = ClientOptions.from_settings()

    def build() -> openai.OpenAI:
        return openai.OpenAI(
            **_sdk_options(route, options),
            http_client=openai.DefaultHttpx2Client(**_http_options(options)),
        )

    return _cache.acquire(_key("sync", route, options), route, build, lease=lease)


def _async_entry(route: Route, *, lease: bool) -> _Entry:
    options = ClientOptions.from_settings()
    loop = asyncio.get_running_loop()

    def build() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            **_sdk_options(route, options),
            http_client=openai.DefaultAioHttpClient(**_http_options(options)),
        )

    key = (*_key("async", route, options), id(loop))
    return _cache.acquire(key, route, build, loop, lease=lease)


def get_client(route: Route) -> openai.OpenAI:
    """The cached sync client for `route`, unleased (prefer `lease` for calls)."""
    client = _sync_entry(route, lease=False).client
    assert isinstance(client, openai.OpenAI)
    return client


def get_async_client(route: Route) -> openai.AsyncOpenAI:
    """The cached async client for `route` on the running loop, unleased."""
    client = _async_entry(route, lease=False).client
    assert isinstance(client, openai.AsyncOpenAI)
    return client


class _Lease:
    """Holds a client open until the block ends, even if it is evicted meanwhile.

    A class, not a generator-based context manager: an abandoned async stream is
    finalized by the garbage collector, and generator context managers finalized out of
    order fail with "generator didn't stop after athrow()".
    """

    def __init__(self, entry: _Entry) -> None:
        self.entry = entry

    def __enter__(self) -> Any:
        return self.entry.client

    def __exit__(self, *exc: object) -> None:
        _cache.release(self.entry)

    async def __aenter__(self) -> Any:
        return self.entry.client

    async def __aexit__(self, *exc: object) -> None:
        _cache.release(self.entry)


def lease(route: Route) -> AbstractContextManager[openai.OpenAI]:
    """The sync client for `route`, kept open until the `with` block ends."""
    return _Lease(_sync_entry(route, lease=True))


def alease(route: Route) -> AbstractAsyncContextManager[openai.AsyncOpenAI]:
    """The async client for `route` (aiohttp transport) on the running loop, leased."""
    return _Lease(_async_entry(route, lease=True))


def evict(credential_id: uuid.UUID | None = None) -> int:
    return _cache.evict(credential_id)


async def aclose_loop_clients() -> None:
    await _cache.aclose_loop()


def cache_stats() -> dict[str, int]:
    return {"clients": len(_cache), "builds": _cache.builds}
