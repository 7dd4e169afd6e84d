"""The shared cache (CACHE_URL), read and written from async code without a thread hop.

Django's cache API is synchronous, and its `aget` runs `get` in a thread. On the hot
path (sessions, the copies' stamp) that hop is most of the cost, so here:

- local memory is read in place: it does no I/O;
- Redis is read with redis-py's asyncio client on the running loop, with the cache's
  own key function and serializer, so values written by Django's cache read back alike;
- any other backend goes through Django's async API (a hop).

A cache that does not answer is a miss (logged at most once a minute): callers fall back
to the database, so an outage of Redis slows requests down but does not fail them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.base import BaseCache
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache

from platform_site.loops import at_loop_end

log = logging.getLogger(__name__)

# Redis is on the local network: a second is long. Beyond settings.CACHE_MAX_CONNECTIONS
# a loop's commands wait for a connection (up to the same second) rather than open more.
SOCKET_TIMEOUT = 1.0
WARN_EVERY = 60.0
READY_KEY = "keyroute:readyz"

_clients: dict[tuple[asyncio.AbstractEventLoop, str], redis.asyncio.Redis] = {}
_last_warning = -WARN_EVERY


async def aget(key: str, default: Any = None, *, alias: str = "default") -> Any:
    """The cached value of `key`; `default` when it is missing or the cache fails."""
    backend = caches[alias]
    try:
        return await _get(backend, key, default)
    except Exception as error:
        warn(backend, error)
        return default


async def aget_many(keys: list[str], *, alias: str = "default") -> dict[str, Any] | None:
    """The cached values of those `keys` that exist; None when the cache fails."""
    backend = caches[alias]
    try:
        if isinstance(backend, LocMemCache):
            return backend.get_many(keys)
        if isinstance(backend, RedisCache):
            client = await aclient(backend)
            raws = await client.mget([backend.make_and_validate_key(key) for key in keys])
            loads = _serializer(backend).loads
            return {key: loads(raw) for key, raw in zip(keys, raws, strict=True) if raw is not None}
        return await backend.aget_many(keys)
    except Exception as error:
        warn(backend, error)
        return None


async def aadd(key: str, value: int, timeout: int | None, *, alias: str = "default") -> bool:
    """Set an integer `key` unless it exists; False when it existed or the cache failed."""
    return bool(await atry_add(key, value, timeout, alias=alias))


async def atry_add(
    key: str, value: int, timeout: float | None, *, alias: str = "default"
) -> bool | None:
    """`aadd` that tells a failed cache (None) from a key that existed (False)."""
    backend = caches[alias]
    try:
        if isinstance(backend, LocMemCache):
            return backend.add(key, value, timeout)
        if isinstance(backend, RedisCache):
            client = await aclient(backend)
            key = backend.make_and_validate_key(key)
            expires = None if timeout is None else max(1, round(timeout * 1000))
            return bool(await client.set(key, value, px=expires, nx=True))
        return await backend.aadd(key, value, timeout)
    except Exception as error:
        warn(backend, error)
        return None


async def aproblem(*, timeout: float, alias: str = "default") -> str | None:
    """What is wrong with the cache, as a sentence; None when it keeps a value (/readyz)."""
    backend = caches[alias]
    try:
        async with asyncio.timeout(timeout):
            await _set(backend, READY_KEY, "ready", 5)
            kept = await _get(backend, READY_KEY, None)
    except Exception:
        log.exception("Readiness: the cache does not answer.")
        return "The cache does not answer."
    return None if kept == "ready" else "The cache does not keep values."


async def _get(backend: BaseCache, key: str, default: Any) -> Any:
    if isinstance(backend, LocMemCache):
        return backend.get(key, default)
    if isinstance(backend, RedisCache):
        client = await aclient(backend)
        raw = await client.get(backend.make_and_validate_key(key))
        return default if raw is None else _serializer(backend).loads(raw)
    return await backend.aget(key, default)


async def _set(backend: BaseCache, key: str, value: Any, timeout: int) -> None:
    if isinstance(backend, LocMemCache):
        backend.set(key, value, timeout)
    elif isinstance(backend, RedisCache):
        client = await aclient(backend)
        raw = _serializer(backend).dumps(value)
        await client.set(backend.make_and_validate_key(key), raw, ex=timeout)
    else:
        await backend.aset(key, value, timeout)


async def aclient(backend: RedisCache) -> redis.asyncio.Redis:
    loop = asyncio.get_running_loop()
    url = backend._servers[0]  # type: ignore[attr-defined]  # the primary: replicas lag
    client = _clients.get((loop, url))
    if client is None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.CACHE_MAX_CONNECTIONS,
            timeout=SOCKET_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
        )
        client = _clients[loop, url] = redis.asyncio.Redis.from_pool(pool)  # closes the pool
        await at_loop_end(f"redis {url}", _close_clients)
    return client


def _serializer(backend: RedisCache) -> Any:
    """The cache's own serializer (integers as they are, the rest pickled by default)."""
    return backend._cache._serializer  # type: ignore[attr-defined]


async def _close_clients() -> None:
    loop = asyncio.get_running_loop()
    for key in [key for key in _clients if key[0] is loop]:
        await _clients.pop(key).aclose()


def warn(backend: BaseCache, error: Exception) -> None:
    """Log that the cache failed, at most once a minute (an outage would flood the log)."""
    global _last_warning
    now = time.monotonic()
    if now - _last_warning >= WARN_EVERY:
        _last_warning = now
        log.warning(
            "The cache (%s) does not answer (%s): reading from the database instead.",
            type(backend).__name__,
            type(error).__name__,
        )
