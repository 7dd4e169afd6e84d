"""Spend control: a credential's allowed models, monthly budgets and rate limits.

Every call with a credential is checked before anything is sent (`admit`), in this
order, and refused with a sentence:

- a model off the credential's allow-list: 403 ModelNotAllowed;
- the credential's monthly budget, or the user's monthly cap on it, reached: 402
  BudgetExceeded (the spend, the budget and when it resets: the 1st, 00:00 UTC);
- tokens per minute used up (the credential's, or the user's on it): 429 RateLimited;
- requests per minute used up: 429 RateLimited.

A refusal is not a failure of the route: it never fails over. Once the call ended,
its cost and tokens are counted (`charge`). Limits are the chosen credential's: a call
that failed over counts against the credential the user chose.

The counters live in the shared cache, so every worker sees the same ones:

- with Redis, `admit` is one Lua script (one round trip), which checks every counter
  and only then takes a request from each requests-per-minute window, atomically: of a
  burst of any size from any number of workers, exactly the limit is admitted. Requests
  per minute is a sliding window (at most N in any 60 s, on Redis's clock); tokens per
  minute counts the tokens of the calls that ended in the current clock minute.
  `charge` adds a call's cost and tokens to this process's `Charges`, which a thread
  sends in one script: at once when it was idle, then at most every
  LLM_CHARGE_FLUSH_SECONDS (0.1 s; 0: each call sends its own, in the call). This
  process's admits count what it has not sent yet; the other workers see it once sent.
  A send that fails is kept and sent again (numbered, so that it counts once);
- with another cache (local memory), the counters are this process's own: each worker
  admits its own N (documented; `check --deploy` warns about several workers on a
  local cache);
- when Redis does not answer, each process counts alone until it does (logged once a
  minute); the charges of the calls it admits meanwhile are kept for Redis all the same.

Spend counts in units of 1e-8 USD, the usage column's precision. A spend counter that
is missing (a new month, a new budget, Redis wiped) is seeded from the usage records
(one query per credential, coalesced, not per call), and a serving process raises every
counter to its usage records every LLM_SPEND_RECONCILE_SECONDS (one worker per interval):
`reconcile`, and `manage.py reconcile_spend`. Records reach the database within
LLM_USAGE_FLUSH_SECONDS, so a counter seeded from them may lack the last seconds' calls.

Overshoot: a budget is checked before a call and charged after it, so the calls in
flight when the spend crosses the budget all complete: the spend can exceed the budget
by at most the cost of the calls in flight at that moment (with max_tokens, each is at
most max_tokens times the output price), and of the calls other workers admit in the
LLM_CHARGE_FLUSH_SECONDS before the last charges reach Redis. Tokens per minute overshoot
alike.
"""

from __future__ import annotations

import asyncio
import atexit
import calendar
import functools
import hashlib
import logging
import math
import os
import secrets
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache
from django.db.models import Q, Sum
from django.utils import timezone
from redis.exceptions import NoScriptError

from credentials.models import APIKeyCredentials
from llm import errors, metrics
from platform_site import shared_cache
from platform_site.signals import worker_stopping

log = logging.getLogger(__name__)

UNIT = Decimal("0.00000001")  # USD per counter unit
WINDOW_MS = 60_000
SPEND_TTL = 40 * 86400  # a month's counter outlives its month
RECONCILE_LOCK = "keyroute:spend:reconcile"


def units(cost: float | Decimal | None) -> int:
    return 0 if not cost else int((Decimal(str(cost)) / UNIT).to_integral_value())


def usd(amount: int | Decimal) -> Decimal:
    return amount * UNIT if isinstance(amount, int) else amount


def dollars(amount: Decimal) -> str:
    """$1,234.56, with more digits where they count ($0.0001, $0.00012)."""
    if amount >= 1 or amount == 0:
        return f"${amount:,.2f}"
    return f"${decimal_text(amount)}"


def decimal_text(amount: Decimal) -> str:
    """USD as a decimal string: cents at least, then every digit that counts ("0.003")."""
    whole, _, cents = f"{amount.quantize(UNIT):f}".partition(".")
    return f"{whole}.{cents.rstrip('0').ljust(2, '0')}"


# ---- months ---------------------------------------------------------------------------


def month_of(now: datetime) -> tuple[datetime, datetime]:
    """The calendar month (UTC) holding `now`: its start and the next month's start."""
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(start.year, start.month)[1]
    return start, start + timedelta(days=days)


def _resets(end: datetime) -> str:
    return f"{end.day} {end:%B %Y} at 00:00 UTC"


# ---- what a call is checked against -----------------------------------------------------


class Counter(NamedTuple):
    key: str
    limit: int  # -1: counted, not limited
    per_user: bool


@dataclass
class Plan:
    """The counters of one call, by kind; spend: the credential's first."""

    credential: APIKeyCredentials
    user_id: int | None
    month: tuple[datetime, datetime]
    now_ms: int
    member: str  # this call's entry in the requests windows
    spend: tuple[Counter, ...] = ()
    tokens: tuple[Counter, ...] = ()
    requests: tuple[Counter, ...] = ()

    def token_keys(self, minute: int) -> list[str]:
        """The tokens counters of the clock minute `minute`."""
        return [f"{c.key}:{minute}" for c in self.tokens]

    def admit_keys(self) -> list[str]:
        """What `admit` reads: spend, the tokens of this minute, the requests windows."""
        spend, requests = [c.key for c in self.spend], [c.key for c in self.requests]
        return spend + self.token_keys(self.minute) + requests

    @property
    def limits(self) -> list[int]:
        return [c.limit for c in self.spend + self.tokens + self.requests]

    @property
    def minute(self) -> int:
        return self.now_ms // WINDOW_MS


def _plan(credential: APIKeyCredentials, user: Any) -> Plan:
    now = timezone.now()
    user_id = user.pk if getattr(user, "is_authenticated", False) else None
    month = _month(now.year, now.month) if now.tzinfo is UTC else month_of(now)
    c = credential
    spend, tokens, requests = _counters(
        c.pk,
        user_id,
        month[0],
        (c.monthly_budget_usd, c.user_monthly_budget_usd) if c.has_budget else None,
        (c.tokens_per_minute, c.user_tokens_per_minute),
        (c.requests_per_minute, c.user_requests_per_minute),
    )
    member = secrets.token_hex(8)
    return Plan(c, user_id, month, int(now.timestamp() * 1000), member, spend, tokens, requests)


@functools.lru_cache(maxsize=256)
def _month(year: int, month: int) -> tuple[datetime, datetime]:
    return month_of(datetime(year, month, 1, tzinfo=UTC))


@functools.lru_cache(maxsize=4096)
def _counters(
    credential_id: uuid.UUID,
    user_id: int | None,
    month: datetime,
    budgets: tuple[Decimal | None, Decimal | None] | None,
    tokens: tuple[int | None, int | None],
    requests: tuple[int | None, int | None],
) -> tuple[tuple[Counter, ...], tuple[Counter, ...], tuple[Counter, ...]]:
    """A call's counters: the same for every call of a user with a credential in a month
    (so kept, not built per call)."""
    spend = []
    if budgets is not None:
        budget, cap = budgets
        spend.append(Counter(spend_key(month, credential_id), _limit(budget), False))
        if cap is not None and user_id is not None:
            spend.append(Counter(spend_key(month, credential_id, user_id), _limit(cap), True))
    windows: dict[str, list[Counter]] = {"tpm": [], "rpm": []}
    for kind, (overall, per_user) in (("tpm", tokens), ("rpm", requests)):
        if overall is not None:
            windows[kind].append(Counter(f"keyroute:{kind}:{credential_id.hex}", overall, False))
        if per_user is not None and user_id is not None:
            key = f"keyroute:{kind}:{credential_id.hex}:{user_id}"
            windows[kind].append(Counter(key, per_user, True))
    return tuple(spend), tuple(windows["tpm"]), tuple(windows["rpm"])


def _minute_now() -> int:
    """The clock minute a call ends in: where its tokens count."""
    return int(timezone.now().timestamp() * 1000) // WINDOW_MS


def spend_key(month: datetime, credential_id: uuid.UUID, user_id: int | None = None) -> str:
    owner = "" if user_id is None else f":{user_id}"
    return f"keyroute:spend:{month:%Y-%m}:{credential_id.hex}{owner}"


def _limit(budget: Decimal | None) -> int:
    return -1 if budget is None else units(budget)


@dataclass(frozen=True)
class Verdict:
    """`code`: 0 admitted, 1 spend reached, 2 tokens used up, 3 requests used up, 4 a
    spend counter is missing; `index` of the counter (in its kind), its `value`, and
    for requests the milliseconds until one frees."""

    code: int
    index: int = 0
    value: int = 0
    wait_ms: int = 0


ADMITTED = Verdict(0)
MISSING = 4
# How often a call seeds missing spend counters before it goes on unchecked.
SEED_TRIES = 3

# KEYS: spend, tokens, requests counters. ARGV: how many of each, the window (ms), this
# call's member, the limits in KEYS' order, then what this process charged to each spend
# and tokens counter and has not sent yet (`Charges`). The requests windows run on
# Redis's clock, which every worker shares (theirs may differ).
ADMIT = """
local ns, nt, nr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window, member = tonumber(ARGV[4]), ARGV[5]
local unsent = 5 + ns + nt + nr
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for i = 1, ns do
  local value = redis.call('GET', KEYS[i])
  if not value then return {4, i, 0, 0} end
  value = tonumber(value) + tonumber(ARGV[unsent + i])
  local limit = tonumber(ARGV[5 + i])
  if limit >= 0 and value >= limit then return {1, i, value, 0} end
end
for i = ns + 1, ns + nt do
  local value = tonumber(redis.call('GET', KEYS[i]) or '0') + tonumber(ARGV[unsent + i])
  if value >= tonumber(ARGV[5 + i]) then return {2, i - ns, value, 0} end
end
for i = ns + nt + 1, ns + nt + nr do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[5 + i]) then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    return {3, i - ns - nt, 0, tonumber(oldest[2]) + window - now}
  end
end
for i = ns + nt + 1, ns + nt + nr do
  redis.call('ZADD', KEYS[i], now, member)
  redis.call('PEXPIRE', KEYS[i], window)
end
return {0, 0, 0, 0}
"""

# KEYS: the sender's last batch number, spend counters, then tokens counters. ARGV: this
# batch's number (0: a call's own charge, not numbered), how many spend counters, the
# tokens counters' life (ms), then the amount for each counter. A numbered batch runs
# once: sent again after its answer was lost, it changes nothing. Returns each spend
# counter after the charge (-1: missing; it is seeded from the usage records, which
# hold the calls charged).
CHARGE = """
local batch, ns = tonumber(ARGV[1]), tonumber(ARGV[2])
if batch > 0 then
  if batch <= tonumber(redis.call('GET', KEYS[1]) or '0') then return false end
  redis.call('SET', KEYS[1], batch, 'EX', 86400)
end
local spent = {}
for i = 2, ns + 1 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    spent[i - 1] = redis.call('INCRBY', KEYS[i], ARGV[2 + i])
  else
    spent[i - 1] = -1
  end
end
for i = ns + 2, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[2 + i])
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
return spent
"""

# KEYS: one spend counter. ARGV: the value, its life (s), 1 to set it whatever it holds
# (else only raise it). Returns what it held before (-1: nothing).
RAISE = """
local held = tonumber(redis.call('GET', KEYS[1]) or '-1')
local value = tonumber(ARGV[1])
if ARGV[3] == '1' or value > held then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return held
"""


class LocalCounters:
    """The counters of this process (a local-memory cache, or Redis down)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, tuple[int, float]] = {}  # key -> (value, expires at)
        self._windows: dict[str, deque[int]] = {}

    def admit(self, plan: Plan) -> Verdict:
        with self._lock:
            now = int(timezone.now().timestamp() * 1000)  # in the lock: windows stay in order
            for index, (key, limit, _) in enumerate(plan.spend, 1):
                value = self._get(key)
                if value is None:
                    return Verdict(4, index)
                if 0 <= limit <= value:
                    return Verdict(1, index, value)
            tokens = zip(plan.token_keys(plan.minute), plan.tokens, strict=True)
            for index, (key, (_, limit, _)) in enumerate(tokens, 1):
                value = self._get(key) or 0
                if value >= limit:
                    return Verdict(2, index, value)
            windows = []
            for index, (key, limit, _) in enumerate(plan.requests, 1):
                window = self._windows.setdefault(key, deque())
                while window and window[0] <= now - WINDOW_MS:
                    window.popleft()
                if len(window) >= limit:
                    return Verdict(3, index, wait_ms=window[0] + WINDOW_MS - now)
                windows.append(window)
            for window in windows:
                window.append(now)
        return ADMITTED

    def charge(self, plan: Plan, cost: int, tokens: int) -> list[int]:
        with self._lock:
            spent = []
            for key, _, _ in plan.spend:
                value = self._get(key)
                if value is not None:
                    value += cost
                    self._values[key] = (value, time.monotonic() + SPEND_TTL)
                spent.append(-1 if value is None else value)
            if tokens:
                for key in plan.token_keys(_minute_now()):
                    self._values[key] = (
                        (self._get(key) or 0) + tokens,
                        time.monotonic() + WINDOW_MS / 1000,
                    )
            if len(self._values) > 100_000:
                self._prune()
        return spent

    def set(self, key: str, value: int, *, exact: bool = True) -> int:
        with self._lock:
            held = self._get(key)
            if exact or held is None or value > held:
                self._values[key] = (value, time.monotonic() + SPEND_TTL)
        return -1 if held is None else held

    def get(self, key: str) -> int | None:
        with self._lock:
            return self._get(key)

    def _get(self, key: str) -> int | None:
        kept = self._values.get(key)
        if kept is None or kept[1] <= time.monotonic():
            return None
        return kept[0]

    def _prune(self) -> None:
        now = time.monotonic()
        self._values = {k: v for k, v in self._values.items() if v[1] > now}
        self._windows = {k: w for k, w in self._windows.items() if w}

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._windows.clear()


local = LocalCounters()


# How many made key names a RedisCounters keeps (then it starts again).
MADE_KEYS = 10_000


class RedisCounters:
    """The counters in Redis (the cache's primary), through the scripts above."""

    def __init__(self, backend: RedisCache) -> None:
        self.backend = backend
        self._sync: Any = None
        self._made: dict[str, str] = {}
        self.charges = _charges(self)

    def _keys(self, keys: list[str]) -> list[str]:
        """The cache's own name of each key, made once: a call names the same few keys
        (validating one costs ~4 us), the minutes' tokens keys the only new ones."""
        return [self._made.get(key) or self._make(key) for key in keys]

    def _make(self, key: str) -> str:
        if len(self._made) >= MADE_KEYS:
            self._made.clear()
        made = self._made[key] = self.backend.make_and_validate_key(key)
        return made

    def _admit_args(self, plan: Plan) -> tuple[list[str], list[Any]]:
        counts = [len(plan.spend), len(plan.tokens), len(plan.requests)]
        keys = self._keys(plan.admit_keys())
        unsent = self.charges.unsent(keys[: counts[0] + counts[1]])
        return keys, [*counts, WINDOW_MS, plan.member, *plan.limits, *unsent]

    def batch(self, plan: Plan, cost: int, tokens: int) -> Batch:
        """One call's charge: its cost to the spend counters, its tokens to this minute's."""
        batch = Batch()
        if cost:
            keys = self._keys([c.key for c in plan.spend])
            for key, counter in zip(keys, plan.spend, strict=True):
                batch.spend[key] = cost
                batch.owners[key] = (plan.credential, plan.user_id, counter)
        if tokens:
            batch.tokens = dict.fromkeys(self._keys(plan.token_keys(_minute_now())), tokens)
        return batch

    def _send_args(self, batch: Batch, number: int, sender: str) -> tuple[list[str], list[Any]]:
        amounts = [*batch.spend.values(), *batch.tokens.values()]
        keys = [*self._keys([f"keyroute:charges:{sender}"]), *batch.spend, *batch.tokens]
        return keys, [number, len(batch.spend), WINDOW_MS, *amounts]

    def _client(self) -> Any:
        """One client over the cache's own pool (building one per command costs more than
        the round trip)."""
        if self._sync is None:
            self._sync = self.backend._cache.get_client(write=True)  # type: ignore[attr-defined]
        return self._sync

    def admit(self, plan: Plan) -> Verdict:
        return Verdict(*_run(self._client(), ADMIT, *self._admit_args(plan)))

    async def aadmit(self, plan: Plan) -> Verdict:
        client = await shared_cache.aclient(self.backend)
        return Verdict(*await _arun(client, ADMIT, *self._admit_args(plan)))

    def send(
        self, batch: Batch, number: int = 0, sender: str = "", client: Any = None
    ) -> list[int] | None:
        """Add `batch` to the counters; each spend counter after. `number`: the batch's
        among `sender`'s, so that sent again it counts once (None: it was, already)."""
        args = self._send_args(batch, number, sender)
        after: list[int] | None = _run(client or self._client(), CHARGE, *args)
        return after

    async def asend(self, batch: Batch) -> list[int] | None:
        client = await shared_cache.aclient(self.backend)
        after: list[int] | None = await _arun(client, CHARGE, *self._send_args(batch, 0, ""))
        return after

    def set(self, key: str, value: int, *, exact: bool = True) -> int:
        args = [value, SPEND_TTL, 1 if exact else 0]
        return int(_run(self._client(), RAISE, self._keys([key]), args))

    def get(self, key: str) -> int | None:
        """A counter as this process counts it: Redis's, and what it has not sent yet."""
        [made] = self._keys([key])
        return self._counted(made, self._client().get(made))

    async def aget(self, key: str) -> int | None:
        client = await shared_cache.aclient(self.backend)
        [made] = self._keys([key])
        return self._counted(made, await client.get(made))

    def _counted(self, made: str, value: Any) -> int | None:
        return None if value is None else int(value) + self.charges.unsent([made])[0]


Owner = tuple[APIKeyCredentials, "int | None", Counter]  # whose a spend counter is


@dataclass
class Batch:
    """Charges for the Redis counters (made keys): units to spend counters, tokens to
    minutes' counters, and whose each spend counter is (for the gauges and the warning)."""

    spend: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    owners: dict[str, Owner] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.spend or self.tokens)

    def add(self, other: Batch) -> None:
        for mine, theirs in ((self.spend, other.spend), (self.tokens, other.tokens)):
            for key, amount in theirs.items():
                mine[key] = mine.get(key, 0) + amount
        self.owners.update(other.owners)

    def amount(self, key: str) -> int:
        return self.spend.get(key) or self.tokens.get(key) or 0


# After a send failed, the next try waits this long (Redis may be restarting).
RETRY_SECONDS = 1.0


class Charges:
    """What this process charged to the Redis counters and has not sent yet.

    Calls add their charges here (no I/O) and a thread of the process sends the sums in
    one script: at once when it was idle, then at most every LLM_CHARGE_FLUSH_SECONDS.
    With 0, each call sends its own charge, and only one that failed comes here. A send
    that fails is kept and sent again, under its number, so that it counts once even if
    the answer to the first try was lost: a charge is never dropped. Until its send is
    answered, a charge counts in this process's admits (`unsent`).
    """

    def __init__(self, store: RedisCounters, url: str) -> None:
        self.store = store
        self.url = url
        self.sender = ""  # this process's name among the senders of numbered batches
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._waiting = Batch()
        self._sending = Batch()  # taken by a send that was not answered yet
        self._number = 0
        self._pid = 0
        self._client: Any = None

    def unsent(self, keys: list[str]) -> list[int]:
        """What each of `keys` is owed by this process."""
        if not (self._waiting or self._sending):
            return [0] * len(keys)
        with self._lock:
            return [self._waiting.amount(k) + self._sending.amount(k) for k in keys]

    def add(self, batch: Batch) -> None:
        with self._lock:
            if self._pid != os.getpid():  # first, or a forked worker: a sender of its own
                # (what a parent held is the parent's to send)
                self._pid, self._number, self.sender = os.getpid(), 0, secrets.token_hex(8)
                self._waiting, self._sending, self._client = Batch(), Batch(), None
                threading.Thread(target=self._run, name="charge-sender", daemon=True).start()
            self._waiting.add(batch)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self.flush():
                time.sleep(settings.LLM_CHARGE_FLUSH_SECONDS)
            else:
                self._wake.set()
                time.sleep(RETRY_SECONDS)

    def flush(self) -> bool:
        """Send what a failed send kept, then what waits; False if a send failed (what
        it held is kept for the next)."""
        return self._send() and self._send()

    def _connection(self) -> Any:
        """The sender's own client, with the site's Redis timeouts: Django's has none, and
        a Redis that stopped answering (not refusing) would hold the sender, and a
        stopping worker's last send, for good."""
        if self._client is None:
            timeout = shared_cache.SOCKET_TIMEOUT
            self._client = redis.Redis.from_url(
                self.url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        return self._client

    def _send(self) -> bool:
        """Send one batch: what a failed send kept, else what waits."""
        with self._flushing:
            with self._lock:
                if not self._sending:
                    if not self._waiting:
                        return True
                    self._sending, self._waiting = self._waiting, Batch()
                    self._number += 1
                batch, number = self._sending, self._number
            try:
                after = self.store.send(batch, number, self.sender, self._connection())
            except Exception as error:
                shared_cache.warn(self.store.backend, error)
                return False
            with self._lock:
                self._sending = Batch()
        if after is not None:
            _report(batch, after)
        return True


_shas: dict[str, str] = {}


def _sha(script: str) -> str:
    if script not in _shas:
        _shas[script] = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
    return _shas[script]


def _run(client: Any, script: str, keys: list[str], args: list[Any]) -> Any:
    """Run a script by its hash (sent in full the first time Redis has not seen it)."""
    try:
        return client.evalsha(_sha(script), len(keys), *keys, *args)
    except NoScriptError:
        return client.eval(script, len(keys), *keys, *args)


async def _arun(client: Any, script: str, keys: list[str], args: list[Any]) -> Any:
    try:
        return await client.evalsha(_sha(script), len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script, len(keys), *keys, *args)


_redis: weakref.WeakKeyDictionary[RedisCache, RedisCounters] = weakref.WeakKeyDictionary()


# One per Redis server: Django's caches are per thread, the charges are the process's.
_ledgers: dict[str, Charges] = {}
_ledgers_lock = threading.Lock()


def _charges(store: RedisCounters) -> Charges:
    with _ledgers_lock:
        url = store.backend._servers[0]  # type: ignore[attr-defined]  # the primary
        if url not in _ledgers:
            _ledgers[url] = Charges(store, url)
        return _ledgers[url]


def flush() -> None:
    """Send what this process's calls charged and has not sent yet (at exit; tests)."""
    for charges in list(_ledgers.values()):
        charges.flush()


atexit.register(flush)
# uvicorn workers never reach atexit (they end by the signal that stopped them).
worker_stopping.connect(lambda **kwargs: flush(), weak=False)


def counters() -> RedisCounters | LocalCounters:
    """The shared counters: Redis when the cache is Redis, else this process's."""
    backend = caches["default"]
    if not isinstance(backend, RedisCache):
        return local
    store = _redis.get(backend)
    if store is None:
        store = _redis[backend] = RedisCounters(backend)
    return store


# ---- admission --------------------------------------------------------------------------


@dataclass
class Admission:
    """A call let through: what `charge` counts once it ended."""

    plan: Plan
    counters: RedisCounters | LocalCounters  # what admitted it
    # Redis, when the cache is Redis: it is charged even if the call was admitted by this
    # process's counters because Redis did not answer (the spend is kept for it).
    shared: RedisCounters | None


def check_model(credential: APIKeyCredentials | None, model: str) -> None:
    if credential is not None and not credential.allows_model(model):
        metrics.limit_refused(kind="model")
        raise errors.model_not_allowed(credential.title, model, credential.allowed_models)


def admit(credential: APIKeyCredentials | None, user: Any, model: str) -> Admission | None:
    """Check the call against the credential's limits (sync code); raises the refusal."""
    check_model(credential, model)
    if credential is None or not credential.has_limits:
        return None
    plan = _plan(credential, user)
    store = shared = counters()
    for _ in range(SEED_TRIES):
        try:
            verdict = store.admit(plan)
        except Exception as error:
            store = _unshared(error)
            continue
        if verdict.code != MISSING:
            _admitted(plan, verdict)
            break
        _seed(store, plan)
    return Admission(plan, store, shared if isinstance(shared, RedisCounters) else None)


async def aadmit(credential: APIKeyCredentials | None, user: Any, model: str) -> Admission | None:
    """`admit` for async code: Redis from the event loop; the database only to seed."""
    check_model(credential, model)
    if credential is None or not credential.has_limits:
        return None
    plan = _plan(credential, user)
    store = shared = counters()
    for _ in range(SEED_TRIES):
        try:
            if isinstance(store, RedisCounters):
                verdict = await store.aadmit(plan)
            else:
                verdict = store.admit(plan)
        except Exception as error:
            store = _unshared(error)
            continue
        if verdict.code != MISSING:
            _admitted(plan, verdict)
            break
        await _aseed(store, plan)
    return Admission(plan, store, shared if isinstance(shared, RedisCounters) else None)


def _admitted(plan: Plan, verdict: Verdict) -> None:
    _refuse(plan, verdict)
    _ensure_reconciler()


def _unshared(error: Exception) -> LocalCounters:
    shared_cache.warn(caches["default"], error)
    metrics.limits_unshared()
    return local


def _refuse(plan: Plan, verdict: Verdict) -> None:
    """Raise the refusal `verdict` says, if any."""
    credential, title = plan.credential, plan.credential.title
    if verdict.code == 1:
        start, end = plan.month
        spent = dollars(usd(verdict.value))
        per_user = plan.spend[verdict.index - 1].per_user
        budget = credential.user_monthly_budget_usd if per_user else credential.monthly_budget_usd
        assert budget is not None
        whose = "You have" if per_user else f"Credential {title!r} has"
        of = (
            f"your {dollars(budget)} monthly cap on credential {title!r}"
            if per_user
            else f"its {dollars(budget)} budget"
        )
        metrics.limit_refused(kind="budget")
        raise errors.BudgetExceeded(
            f"{whose} spent {spent} of {of} for {start:%B %Y}; it resets on {_resets(end)}. "
            "Choose another credential, or ask an admin to raise the "
            f"{'cap' if per_user else 'budget'}."
        )
    if verdict.code in (2, 3):
        _, limit, mine = (plan.tokens if verdict.code == 2 else plan.requests)[verdict.index - 1]
        if verdict.code == 2:
            wait_ms = WINDOW_MS - plan.now_ms % WINDOW_MS
            what = f"{limit:,} {'token' if limit == 1 else 'tokens'} per minute"
        else:
            wait_ms = verdict.wait_ms
            what = f"{limit:,} {'request' if limit == 1 else 'requests'} per minute"
        # Within the window whatever the clocks say (a window entry of a worker whose
        # clock is ahead of this one's).
        wait = min(WINDOW_MS // 1000, max(1, math.ceil(wait_ms / 1000)))
        metrics.limit_refused(kind="tokens" if verdict.code == 2 else "requests")
        raise errors.RateLimited(
            f"Credential {title!r} allows {what}{' per user' if mine else ''}, and "
            f"{'your' if mine else 'its'} share of this minute is used up: try again in "
            f"{wait} s.",
            retry_after=wait,
            fault="limited",
        )


# ---- seeding and reconciling the spend counters ---------------------------------------


def _month_spend(plan: Plan) -> tuple[int, int]:
    """The credential's spend this month, and the user's on it, from the usage records."""
    from llm.models import UsageRecord

    start, end = plan.month
    spent = UsageRecord.objects.filter(
        credential_id=plan.credential.pk, created_at__gte=start, created_at__lt=end
    ).aggregate(all=Sum("cost_usd"), mine=Sum("cost_usd", filter=Q(user_id=plan.user_id)))
    return units(spent["all"]), units(spent["mine"])


def _seed(store: RedisCounters | LocalCounters, plan: Plan) -> None:
    """Set the plan's missing spend counters from the usage records. When that fails
    (the database or the cache down), the call goes on unchecked, said in the log."""
    try:
        total, mine = _month_spend(plan)
        for key, _, per_user in plan.spend:
            store.set(key, mine if per_user else total, exact=False)
    except Exception:
        log.exception(
            "Could not read this month's spend of credential %r: its call goes on unchecked.",
            plan.credential.title,
        )


_seeding: dict[tuple[asyncio.AbstractEventLoop, tuple[str, ...]], asyncio.Task[None]] = {}


async def _aseed(store: RedisCounters | LocalCounters, plan: Plan) -> None:
    """`_seed` from async code, once for the calls that miss the same counters at once."""
    loop = asyncio.get_running_loop()
    key = (loop, tuple(c.key for c in plan.spend))
    task = _seeding.get(key)
    if task is None:
        task = _seeding[key] = loop.create_task(sync_to_async(_seed)(store, plan))
        task.add_done_callback(lambda _: _seeding.pop(key, None))
    await asyncio.shield(task)


# ---- after the call ---------------------------------------------------------------------


def charge(admission: Admission | None, cost: float | None, tokens: int) -> None:
    """Count a call that ended (sync code)."""
    if admission is None:
        return
    shared, batch = _charge_here(admission, units(cost), tokens)
    if shared is not None and batch and _sent_now(shared, batch):
        try:
            after = shared.send(batch)
        except Exception as error:
            _kept(shared, batch, error)
            return
        _report(batch, after)


async def acharge(admission: Admission | None, cost: float | None, tokens: int) -> None:
    if admission is None:
        return
    shared, batch = _charge_here(admission, units(cost), tokens)
    if shared is not None and batch and _sent_now(shared, batch):
        try:
            after = await shared.asend(batch)
        except Exception as error:
            _kept(shared, batch, error)
            return
        _report(batch, after)


def _charge_here(
    admission: Admission, cost: int, tokens: int
) -> tuple[RedisCounters | None, Batch]:
    """Charge this process's counters if they admitted the call; the batch for Redis."""
    plan, shared = admission.plan, admission.shared
    if isinstance(admission.counters, LocalCounters):
        _report_local(plan, admission.counters.charge(plan, cost, tokens), cost)
    return shared, shared.batch(plan, cost, tokens) if shared is not None else Batch()


def _sent_now(store: RedisCounters, batch: Batch) -> bool:
    """Send `batch` in the call (LLM_CHARGE_FLUSH_SECONDS=0)? Else it waits its turn."""
    if settings.LLM_CHARGE_FLUSH_SECONDS:
        store.charges.add(batch)
        return False
    return True


def _kept(store: RedisCounters, batch: Batch, error: Exception) -> None:
    shared_cache.warn(store.backend, error)
    store.charges.add(batch)  # sent again by the process's sender


def _report(batch: Batch, after: list[int] | None) -> None:
    for (key, amount), value in zip(batch.spend.items(), after or (), strict=False):
        _counted(*batch.owners[key], value, amount)


def _report_local(plan: Plan, after: list[int], cost: int) -> None:
    for counter, value in zip(plan.spend, after, strict=True):
        _counted(plan.credential, plan.user_id, counter, value, cost)


def _counted(
    credential: APIKeyCredentials, user_id: int | None, counter: Counter, after: int, amount: int
) -> None:
    """A spend counter after a charge of `amount`: the gauges, and the warning when the
    charge crossed LLM_BUDGET_WARNING_PERCENT."""
    _, limit, per_user = counter
    if after < 0:
        return
    if not per_user:
        budget = credential.monthly_budget_usd
        metrics.credential_spend(
            credential_id=str(credential.pk),
            spent=float(usd(after)),
            budget=None if budget is None else float(budget),
        )
    share = settings.LLM_BUDGET_WARNING_PERCENT / 100
    # Exactly one charge crosses the line: the one whose increment passed it.
    if share and amount and limit > 0 and after - amount < limit * share <= after:
        whose = f"user {user_id} on credential" if per_user else "credential"
        metrics.budget_warning(credential_id=str(credential.pk), per_user=per_user)
        log.warning(
            "Spend warning: %s %r has spent %s of its %s monthly %s (%d%%).",
            whose,
            credential.title,
            dollars(usd(after)),
            dollars(usd(limit)),
            "cap" if per_user else "budget",
            round(after * 100 / limit),
        )


# ---- reconciliation ------------------------------------------------------------------


@dataclass(frozen=True)
class Reconciled:
    credential: APIKeyCredentials
    user_id: int | None
    was: int  # the counter before (-1: missing)
    now: int


def reconcile(*, exact: bool, now: datetime | None = None) -> list[Reconciled]:
    """Bring the spend counters of this month to the usage records' sums.

    `exact`: set them (an admin's command); else only raise them (the periodic task:
    the records lag by the flush interval, so a counter above them may be right).
    """
    from llm.models import UsageRecord

    start, end = month_of(now or timezone.now())
    budgeted = list(
        APIKeyCredentials.objects.filter(
            Q(monthly_budget_usd__isnull=False) | Q(user_monthly_budget_usd__isnull=False)
        )
    )
    rows = (
        UsageRecord.objects.filter(
            credential_id__in=[c.pk for c in budgeted], created_at__gte=start, created_at__lt=end
        )
        .values_list("credential_id", "user_id")
        .annotate(spent=Sum("cost_usd"))
    )
    totals: dict[Any, int] = {}
    users: dict[Any, dict[int, int]] = {}
    for credential_id, user_id, spent in rows:
        totals[credential_id] = totals.get(credential_id, 0) + units(spent)
        if user_id is not None:
            users.setdefault(credential_id, {})[user_id] = units(spent)
    store = counters()
    done = []

    def put(credential: APIKeyCredentials, user_id: int | None, value: int) -> Reconciled:
        was = store.set(spend_key(start, credential.pk, user_id), value, exact=exact)
        done.append(Reconciled(credential, user_id, was, value if exact else max(was, value)))
        return done[-1]

    for credential in budgeted:
        total = put(credential, None, totals.get(credential.pk, 0))
        if credential.user_monthly_budget_usd is not None:
            for user_id, spent in users.get(credential.pk, {}).items():
                put(credential, user_id, spent)
        budget = credential.monthly_budget_usd
        metrics.credential_spend(
            credential_id=str(credential.pk),
            spent=float(usd(total.now)),
            budget=None if budget is None else float(budget),
        )
    return done


_reconciler: threading.Thread | None = None


def _ensure_reconciler() -> None:
    """Start this process's periodic reconciliation, once (a serving process calls)."""
    global _reconciler
    if _reconciler is not None or not settings.LLM_SPEND_RECONCILE_SECONDS:
        return
    _reconciler = threading.Thread(target=_reconcile_forever, name="spend-reconciler", daemon=True)
    _reconciler.start()


def _reconcile_forever() -> None:
    from django.db import connections

    while True:
        interval = settings.LLM_SPEND_RECONCILE_SECONDS or 60.0
        time.sleep(interval)
        try:
            # One worker per interval does it.
            if settings.LLM_SPEND_RECONCILE_SECONDS and cache.add(
                RECONCILE_LOCK, 1, max(1, int(interval) - 1)
            ):
                reconcile(exact=False)
            connections.close_all()
        except Exception:
            log.exception("Reconciling spend counters failed; it tries again in %g s.", interval)


# ---- what a user may still spend -------------------------------------------------------


@dataclass(frozen=True)
class Remaining:
    """A budget and what is left of it this month."""

    budget: Decimal
    spent: Decimal
    resets_at: datetime

    @property
    def remaining(self) -> Decimal:
        return max(Decimal(0), self.budget - self.spent)


def _remaining(plan: Plan, values: list[int | None]) -> dict[str, Remaining | None]:
    credential = plan.credential
    found: dict[str, Remaining | None] = {"credential": None, "user": None}
    for (_, _, per_user), value in zip(plan.spend, values, strict=True):
        budget = credential.user_monthly_budget_usd if per_user else credential.monthly_budget_usd
        if budget is not None:
            found["user" if per_user else "credential"] = Remaining(
                budget, usd(value or 0), plan.month[1]
            )
    return found


async def aremaining(credential: APIKeyCredentials, user: Any) -> dict[str, Remaining | None]:
    """The credential's budget and the user's cap on it, with this month's spend."""
    if not credential.has_budget:
        return {"credential": None, "user": None}
    plan = _plan(credential, user)
    try:
        values = await _aspent(counters(), plan)
    except Exception as error:
        values = await _aspent(_unshared(error), plan)
    return _remaining(plan, values)


async def _aspent(store: RedisCounters | LocalCounters, plan: Plan) -> list[int | None]:
    """The plan's spend counters (seeded from the usage records where missing)."""
    values: list[int | None] = []
    for key, _, _ in plan.spend:
        value = await store.aget(key) if isinstance(store, RedisCounters) else store.get(key)
        if value is None:
            await _aseed(store, plan)
            value = await store.aget(key) if isinstance(store, RedisCounters) else store.get(key)
        values.append(value)
    return values
