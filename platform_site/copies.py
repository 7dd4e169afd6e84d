"""Users and credentials kept in this process, so that a request reads no database.

Every copy is tagged with the stamp the shared cache held when it was loaded. Saving or
deleting a user or a credential bumps that stamp (at once, and again when the
transaction commits), so the next request in every worker sees a different stamp and
loads afresh: a deactivated user, a new key or owner takes effect on the very next
request. Reading the stamp is one cache read per request without a thread hop
(platform_site.shared_cache), memoized for the request by the ASGI handler.

A copy is also dropped after MAX_AGE seconds: a backstop for changes made behind
Django's back (SQL by hand), and for sites that run several workers on a local-memory
cache, which no worker shares (`check --deploy` warns about that).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import threading
import time
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Generic, TypeVar

from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import transaction

from platform_site import shared_cache

log = logging.getLogger(__name__)

STAMP = "keyroute:copies-stamp"
MAX_AGE = 60.0
MAX_COPIES = 10_000

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# The stamp as this request first read it (None: not read yet); unset outside requests.
_request_stamp: ContextVar[list[int | None]] = ContextVar("keyroute_request_stamp")


def begin_request() -> None:
    """Read the stamp at most once in the current request (the ASGI handler calls this)."""
    _request_stamp.set([None])


def bump() -> None:
    """Users or credentials changed: every worker's copies are stale from now on."""
    _bump()
    if transaction.get_connection().in_atomic_block:
        # A worker may load the old row between this bump and the commit; the second
        # bump makes it load again.
        transaction.on_commit(_bump)


def _bump() -> None:
    try:
        try:
            cache.incr(STAMP)
        except ValueError:  # not there yet, or evicted
            if not cache.add(STAMP, _fresh_stamp(), None):
                cache.incr(STAMP)
    except Exception:
        log.exception(
            "Could not bump %s in the cache: other workers see this change within %g s.",
            STAMP,
            MAX_AGE,
        )


def _fresh_stamp() -> int:
    # Random, not 1: a stamp that comes back after the cache lost it must not match
    # copies tagged before.
    return secrets.randbits(48)


async def astamp() -> int | None:
    """The current stamp; None when the cache cannot tell (then no copy is trusted)."""
    memo = _request_stamp.get(None)
    if memo is not None and memo[0] is not None:
        return memo[0]
    stamp = await shared_cache.aget(STAMP)
    if stamp is None:
        await shared_cache.aadd(STAMP, _fresh_stamp(), None)
        stamp = await shared_cache.aget(STAMP)
    if memo is not None:
        memo[0] = stamp
    return stamp  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Copy(Generic[V]):
    stamp: int
    until: float
    value: V | None


class LocalCopies(Generic[K, V]):
    """Objects by key, loaded from the database and trusted while the stamp holds.

    Each caller gets its own shallow copy, so per-request state set on an object (a
    user's permission cache) never reaches another request. None (no such row) is kept
    too: asking for a missing id again and again does not reach the database. Requests
    that miss the same key at once (hundreds in flight when a copy expires or the stamp
    moves) share one load.
    """

    def __init__(self, name: str, load: Callable[[K], V | None]) -> None:
        self.name = name
        self._load = load
        self._copies: dict[K, _Copy[V]] = {}
        self._loads: dict[tuple[asyncio.AbstractEventLoop, K], _Load[V]] = {}
        self._lock = threading.Lock()  # the test client runs loops in several threads

    async def aget(self, key: K) -> V | None:
        stamp = await astamp()
        kept = self._copies.get(key)
        if kept is not None and kept.stamp == stamp and kept.until > time.monotonic():
            return copy.copy(kept.value)
        return copy.copy(await self._load_once(key, stamp))

    def get(self, key: K) -> V | None:
        """`aget` for sync code: the stamp read and a miss loaded in the caller's thread."""
        try:
            stamp = cache.get(STAMP)
        except Exception:
            stamp = None  # the cache failed: no copy is trusted
        kept = self._copies.get(key)
        if kept is not None and kept.stamp == stamp and kept.until > time.monotonic():
            return copy.copy(kept.value)
        value = self._load(key)
        if stamp is not None:
            self._keep(key, stamp, value)
        return copy.copy(value)

    async def _load_once(self, key: K, stamp: int | None) -> V | None:
        loop = asyncio.get_running_loop()
        load = self._loads.get((loop, key))
        if load is None or load.stamp != stamp or stamp is None:
            # A load started before the stamp moved may return the old row: not shared.
            load = self._loads[loop, key] = _Load(stamp, loop.create_task(self._fetch(key, stamp)))
            load.task.add_done_callback(lambda _: self._forget(loop, key, load))
        # Shielded: a caller that goes away does not cancel the others' load.
        return await asyncio.shield(load.task)

    async def _fetch(self, key: K, stamp: int | None) -> V | None:
        # The database, in the thread of the request that missed first (never a shared one).
        value = await sync_to_async(self._load)(key)
        if stamp is not None:
            self._keep(key, stamp, value)
        return value

    def _keep(self, key: K, stamp: int, value: V | None) -> None:
        with self._lock:
            self._copies.pop(key, None)
            self._copies[key] = _Copy(stamp, time.monotonic() + MAX_AGE, value)
            if len(self._copies) > MAX_COPIES:
                del self._copies[next(iter(self._copies))]

    def _forget(self, loop: asyncio.AbstractEventLoop, key: K, load: _Load[V]) -> None:
        if self._loads.get((loop, key)) is load:
            del self._loads[loop, key]


@dataclass(frozen=True)
class _Load(Generic[V]):
    stamp: int | None
    task: asyncio.Task[V | None]
