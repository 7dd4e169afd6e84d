"""A circuit breaker per base URL, shared by every worker through the cache.

    closed --(LLM_BREAKER_FAILURES connection failures in a row)--> open
    open --(LLM_BREAKER_COOLDOWN_SECONDS)--> half-open: one call, across all workers, tries it
    half-open --(that call is answered)--> closed
    half-open --(that call fails to connect)--> open again, with a fresh deadline

Connection failures are the faults in `llm.errors.CONNECTION_FAULTS` (refused, DNS,
TLS, timeout, dropped, 502/503/504). Any answer, a 4xx or a 500 included, shows the
host is reachable and breaks a streak of failures; but only the probe (or a call sent
while every route was open) closes an open breaker: an answer to a call sent before it
opened (a long completion) says nothing about new ones.

A call reads only this process's view of the breakers: a dictionary lookup, without a
thread hop or a round trip. The view changes at once with this process's own outcomes,
and a background thread (one per process) every LLM_BREAKER_REFRESH_SECONDS publishes
those outcomes to the cache and reads what other workers published, for every base URL
this process has called (one `get_many`). So another worker's breaker opening reaches
this one within that interval. Round trips on a call's path are rare: the first call of
a worker to a base URL reads its shared state (so a worker that just started does not
send calls to a proxy every other worker knows is down), and claiming the half-open
probe is an atomic add in the cache, at most once per cooldown and per worker that
wants to probe.

When the cache does not answer, each process keeps its own breakers (said once in the
log) and calls go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from django.conf import settings
from django.core.cache import cache

from llm import metrics
from platform_site import shared_cache

log = logging.getLogger(__name__)

State = Literal["closed", "open", "half-open"]
PREFIX = "keyroute:breaker:"
# A failure streak older than this is forgotten: "in a row" means within these seconds.
STREAK_SECONDS = 300
# When every route is open, a call still tries the one that closes first: at most once
# per this many seconds across all workers (Ticket.forced).
FORCED_EVERY = 1.0


class Ask:
    """`admit`'s answer when only the cache can tell: ask it (`ask` / `aask`)."""

    def __repr__(self) -> str:
        return "ASK"


ASK = Ask()


@dataclass(frozen=True, slots=True)
class Ticket:
    """Leave to send one call to `base_url`; hand it back with the outcome (`done`).

    `probe`: the half-open probe (its outcome closes or reopens the breaker).
    `forced`: sent although the breaker is open, since every route was (`force`).
    """

    base_url: str
    probe: bool = False
    forced: bool = False


@dataclass(frozen=True)
class Status:
    state: State
    failures: int
    retry_in: float  # seconds until a probe may try it (0 unless open)


class _View:
    """What this process knows of one base URL's breaker."""

    __slots__ = ("failures", "known", "next_claim", "open_until", "probing", "state", "unwritten")

    def __init__(self) -> None:
        self.known = False  # the shared state was read once (or the cache failed)
        self.failures = 0  # connection failures in a row
        self.open_until = 0.0  # wall clock (shared across processes); 0: closed
        self.probing = False  # this process holds the half-open probe
        self.next_claim = 0.0  # after losing a claim, when to try claiming again
        self.state: State = "closed"  # as last reported (logs, metrics)
        self.unwritten = 0  # local changes the thread has not written to the cache yet


def _keys(base_url: str) -> tuple[str, str, str]:
    digest = hashlib.blake2b(base_url.encode(), digest_size=12).hexdigest()
    base = PREFIX + digest
    return f"{base}:failures", f"{base}:open-until", f"{base}:probe"


def _host(base_url: str) -> str:
    return urlsplit(base_url).netloc


class Breakers:
    def __init__(self) -> None:
        self._views: dict[str, _View] = {}
        self._lock = threading.Lock()
        self._events: queue.SimpleQueue[tuple[str, _View, str]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._shared = True  # the cache answered last time we asked

    # ---- settings ---------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return settings.LLM_BREAKER_FAILURES > 0

    @staticmethod
    def _cooldown() -> float:
        return float(settings.LLM_BREAKER_COOLDOWN_SECONDS)

    @staticmethod
    def _probe_ttl() -> float:
        # Held while the probe is in flight; a worker that dies mid-probe frees it then.
        return float(settings.LLM_TIMEOUT_SECONDS + settings.LLM_CONNECT_TIMEOUT_SECONDS + 5)

    # ---- the call path ----------------------------------------------------------------

    def admit(self, base_url: str) -> Ticket | Ask | None:
        """May a call go to `base_url`? A Ticket, None (open: go elsewhere) or ASK.

        No I/O. ASK: the caller should `ask` (sync) or `aask` (async) the cache, because
        this process has not read the base URL's shared state yet, or because the
        cooldown is over and the half-open probe may be claimed.
        """
        if not self.enabled:
            return Ticket(base_url)
        view = self._views.get(base_url) or self._watch(base_url)
        if not view.known:
            return ASK
        until = view.open_until
        if not until:
            return Ticket(base_url)
        now = time.time()
        if now < until or view.probing or now < view.next_claim:
            return None
        return ASK

    def ask(self, base_url: str) -> Ticket | None:
        """`admit`, asking the cache what only it can tell (from sync code)."""
        view = self._views[base_url]
        if not view.known:
            try:
                found: dict[str, Any] | None = cache.get_many(_keys(base_url)[:2])
            except Exception as error:
                self._cache_failed(error)
                found = None
            self._learn(base_url, view, found)
        admitted = self.admit(base_url)
        if isinstance(admitted, Ask):
            return self._claimed(base_url, self._try_add(base_url, "probe"), "probe")
        return admitted

    async def aask(self, base_url: str) -> Ticket | None:
        """`ask` on the event loop: the cache's async client, no thread hop."""
        view = self._views[base_url]
        if not view.known:
            self._learn(base_url, view, await shared_cache.aget_many(list(_keys(base_url)[:2])))
        admitted = self.admit(base_url)
        if not isinstance(admitted, Ask):
            return admitted
        if not self._start_claim(base_url):
            return None
        key, ttl = _keys(base_url)[2], self._probe_ttl()
        won = await shared_cache.atry_add(key, os.getpid(), ttl)
        return self._claimed(base_url, won, "probe")

    def force(self, base_url: str) -> Ticket | None:
        """Every route is open: may a call try `base_url` anyway (at most once a second)?"""
        return self._claimed(base_url, self._try_add(base_url, "forced"), "forced")

    async def aforce(self, base_url: str) -> Ticket | None:
        if not self._start_claim(base_url, forced=True):
            return None
        key = _keys(base_url)[2] + ":forced"
        won = await shared_cache.atry_add(key, os.getpid(), FORCED_EVERY)
        return self._claimed(base_url, won, "forced")

    def open_until(self, base_url: str) -> float:
        view = self._views.get(base_url)
        return view.open_until if view else 0.0

    def done(self, ticket: Ticket, error: BaseException | None) -> None:
        """A call sent with `ticket` ended: answered (error None, or an LLMError that is
        not connection-level), failed to connect, or went away (cancelled)."""
        if not self.enabled:
            return
        view = self._views.get(ticket.base_url) or self._watch(ticket.base_url)
        if error is not None and not getattr(error, "sent", False):
            # Cancelled, a bug of ours, or never sent: says nothing about the host.
            if ticket.probe:
                with self._lock:
                    view.probing = False
                    self._publish(ticket.base_url, view, "release")
            return
        failed = error is not None and bool(getattr(error, "connection_level", False))
        if failed:
            self._failed(ticket, view)
        elif ticket.probe or ticket.forced:
            # Only a call sent after the breaker opened says the host is back: an answer
            # to a call sent before (a long completion) closes nothing.
            with self._lock:
                view.failures, view.open_until, view.probing = 0, 0.0, False
                self._publish(ticket.base_url, view, "closed")
            self._changed(ticket.base_url, view, "closed")
        elif view.failures and not view.open_until:
            with self._lock:
                view.failures = 0  # the streak is broken
                self._publish(ticket.base_url, view, "answered")

    def _failed(self, ticket: Ticket, view: _View) -> None:
        with self._lock:
            view.failures += 1
            reopen = ticket.probe or (
                not view.open_until and view.failures >= settings.LLM_BREAKER_FAILURES
            )
            if reopen:
                view.open_until = time.time() + self._cooldown()  # a fresh deadline
            view.probing = False if ticket.probe else view.probing
            self._publish(ticket.base_url, view, "probe-failed" if ticket.probe else "failed")
        if reopen:
            self._changed(ticket.base_url, view, "open")

    # ---- claims -----------------------------------------------------------------------

    def _start_claim(self, base_url: str, *, forced: bool = False) -> bool:
        """Mark this process as claiming (one claim per process at a time)."""
        view = self._views.get(base_url) or self._watch(base_url)
        with self._lock:
            if view.probing or (not forced and time.time() < view.next_claim):
                return False
            view.probing = True
            return True

    def _try_add(self, base_url: str, kind: str) -> bool | None:
        if not self._start_claim(base_url, forced=kind == "forced"):
            return False
        key = _keys(base_url)[2] + (":forced" if kind == "forced" else "")
        ttl = FORCED_EVERY if kind == "forced" else self._probe_ttl()
        try:
            return bool(cache.add(key, os.getpid(), ttl))
        except Exception as error:
            self._cache_failed(error)
            return None

    def _learn(self, base_url: str, view: _View, found: dict[str, Any] | None) -> None:
        """The shared state as read on a first call (None: the cache failed)."""
        failures_key, open_key, _ = _keys(base_url)
        with self._lock:
            if found is not None and not view.known:
                view.failures = int(found.get(failures_key) or 0)
                view.open_until = float(found.get(open_key) or 0)
            view.known = True
        self._changed(base_url, view, _state(view.open_until, time.time()))

    def _claimed(self, base_url: str, won: bool | None, kind: str) -> Ticket | None:
        """`won` None: the cache failed, so this process decides alone (it won)."""
        view = self._views[base_url]
        if won is False:
            with self._lock:
                view.probing = False
                view.next_claim = time.time() + settings.LLM_BREAKER_REFRESH_SECONDS
            return None
        if kind == "forced":
            with self._lock:
                view.probing = False  # a forced try holds nothing but its second
            return Ticket(base_url, forced=True)
        self._changed(base_url, view, "half-open")
        return Ticket(base_url, probe=True)

    # ---- status (the admin, the doctor, metrics) --------------------------------------

    def state(self, base_url: str) -> State:
        """This process's view, without I/O."""
        view = self._views.get(base_url)
        return _state(view.open_until, time.time()) if view else "closed"

    def status(self, base_url: str) -> Status:
        """The shared state (a cache read; this process's view if the cache fails)."""
        failures_key, open_key, _ = _keys(base_url)
        try:
            found = cache.get_many([failures_key, open_key])
            failures, until = int(found.get(failures_key) or 0), float(found.get(open_key) or 0)
        except Exception as error:
            self._cache_failed(error)
            view = self._views.get(base_url) or _View()
            failures, until = view.failures, view.open_until
        now = time.time()
        return Status(_state(until, now), failures, max(0.0, until - now) if until else 0.0)

    def reset(self) -> None:
        """Forget every breaker, here and in the cache (tests)."""
        with self._lock:
            urls = list(self._views)
            self._views.clear()
        with contextlib.suppress(Exception):
            cache.delete_many([key for url in urls for key in _keys(url)])

    # ---- the shared state -------------------------------------------------------------

    def _watch(self, base_url: str) -> _View:
        with self._lock:
            view = self._views.setdefault(base_url, _View())
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="breakers", daemon=True)
                self._thread.start()
        return view

    def _publish(self, base_url: str, view: _View, event: str) -> None:
        """Queue a local change for the thread to write: no I/O on a call's path. The
        caller holds the lock, so no refresh can read the cache between the change and
        its count in `unwritten`."""
        view.unwritten += 1
        self._events.put((base_url, view, event))

    def _written(self, events: list[tuple[str, _View, str]]) -> None:
        with self._lock:
            for _, view, _ in events:
                view.unwritten -= 1

    def _run(self) -> None:
        next_refresh = time.monotonic()
        while True:
            timeout = max(0.0, next_refresh - time.monotonic())
            try:
                events = [self._events.get(timeout=timeout)]
                while not self._events.empty():
                    events.append(self._events.get_nowait())
            except queue.Empty:
                events = []
            try:
                try:
                    for base_url, _, event in events:
                        self._write(base_url, event)
                finally:
                    self._written(events)  # or given up on: a later refresh tells
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + float(settings.LLM_BREAKER_REFRESH_SECONDS)
                    self._refresh()
                self._cache_answered()
            except Exception as error:
                self._cache_failed(error)

    def _write(self, base_url: str, event: str) -> None:
        failures_key, open_key, probe_key = _keys(base_url)
        if event == "closed":
            cache.delete_many([failures_key, open_key, probe_key])
        elif event == "answered":
            cache.delete(failures_key)
        elif event == "release":
            cache.delete(probe_key)
        else:
            try:
                failures = cache.incr(failures_key)
            except ValueError:  # no streak yet
                failures = (
                    1 if cache.add(failures_key, 1, STREAK_SECONDS) else cache.incr(failures_key)
                )
            deadline = time.time() + self._cooldown()
            keep = self._cooldown() + STREAK_SECONDS
            if event == "probe-failed":
                cache.set(open_key, deadline, keep)
                # Held until the new deadline: workers that have not read it yet (until
                # their next refresh) must not take the old one's passing for leave to
                # probe again.
                cache.set(probe_key, os.getpid(), self._cooldown())
            elif failures >= settings.LLM_BREAKER_FAILURES:
                cache.add(open_key, deadline, keep)  # already open: keep its deadline

    def _refresh(self) -> None:
        with self._lock:
            views = list(self._views.items())
        if not views:
            return
        found = cache.get_many([key for url, _ in views for key in _keys(url)[:2]])
        now = time.time()
        for url, view in views:
            failures_key, open_key, _ = _keys(url)
            with self._lock:
                if view.unwritten:
                    # Changed here and not written yet (only this thread writes, and it
                    # is here): the cache is behind this process, not ahead of it.
                    continue
                view.failures = int(found.get(failures_key) or 0)
                view.open_until = float(found.get(open_key) or 0)
                view.known = True
            self._changed(url, view, _state(view.open_until, now))

    def _changed(self, base_url: str, view: _View, state: State) -> None:
        if view.state == state:
            return
        before, view.state = view.state, state
        host = _host(base_url)
        if state == "open":
            log.warning(
                "The circuit breaker of %s is open after %d connection failures in a row: "
                "calls go to fallbacks until %s.",
                host,
                view.failures,
                time.strftime("%H:%M:%S", time.localtime(view.open_until)),
            )
        elif state == "closed" and before != "closed":
            log.info("The circuit breaker of %s is closed: %s answers again.", host, host)
        metrics.breaker_changed(host=host, state=state)

    def _cache_failed(self, error: Exception) -> None:
        if self._shared:
            self._shared = False
            log.warning(
                "The cache does not answer (%s): each worker keeps its own circuit breakers "
                "until it does. Calls go on.",
                type(error).__name__,
            )

    def _cache_answered(self) -> None:
        if not self._shared:
            self._shared = True
            log.info("The cache answers again: the circuit breakers are shared again.")


def _state(open_until: float, now: float) -> State:
    if not open_until:
        return "closed"
    return "open" if now < open_until else "half-open"


breakers = Breakers()


def status(base_url: str) -> Status:
    return breakers.status(base_url)


def state(base_url: str) -> State:
    return breakers.state(base_url)


__all__ = ["ASK", "Breakers", "Status", "Ticket", "breakers", "state", "status"]
