"""Spend control across worker processes (llm/limits.py).

Uvicorn processes on the test database stand for `uvicorn --workers N`, as in
tests/site/test_shared_state.py: with CACHE_URL on one Redis they share every counter, so
a budget spent through one worker is spent for all, and a burst spread over the workers
is admitted exactly up to the limit. The upstream is a loopback server that prices each
call (x-litellm-response-cost), and records what reached it: a refused call never does.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from django.core.cache import cache
from django.utils import timezone

from credentials.models import APIKeyCredentials
from llm import limits
from tests.conftest import (
    TEST_REDIS_URL,
    Answer,
    Site,
    database_url,
    run_manage,
    signed_in,
    subprocess_env,
)
from tests.llm.conftest import forget_counters
from tests.upstream import Upstream

MODEL = "gpt-test-mini"
HI = [{"role": "user", "content": "hi"}]
COST = "0.00003"  # per call, so a budget of $0.0001 allows four calls
BUDGET = Decimal("0.0001")
SHARED = {"CACHE_URL": TEST_REDIS_URL}
BURST = 200
PER_MINUTE = 60


@dataclass(frozen=True)
class Reply:
    site: int  # which worker answered
    status: int
    body: Any
    retry_after: str | None


@dataclass
class Setup:
    upstream: Upstream
    credential: APIKeyCredentials
    headers: dict[str, str]

    @property
    def body(self) -> dict[str, Any]:
        return {"credential": str(self.credential.pk), "model": MODEL, "messages": HI}

    @property
    def chats(self) -> int:
        """Chat requests that reached the upstream."""
        return sum(r.path.endswith("/chat/completions") for r in self.upstream.requests)

    def chat(self, site: Site) -> Answer:
        return site.request("POST", "/api/llm/chat", headers=self.headers, body=self.body)


@pytest.fixture
def redis_cache(settings: Any) -> None:
    """This process reads and writes the workers' counters in their Redis."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": TEST_REDIS_URL,
        }
    }


@pytest.fixture
def make_setup(
    transactional_db: None,
    django_user_model: Any,
    credential_factory: Callable[..., APIKeyCredentials],
    start_upstream: Callable[..., Upstream],
) -> Iterator[Callable[..., Setup]]:
    """Alice's credential with `fields` (its limits) on an upstream that prices each call."""
    made: list[APIKeyCredentials] = []

    def make(**fields: Any) -> Setup:
        alice = django_user_model.objects.create_user("alice")
        upstream = start_upstream(cost=COST)
        credential = credential_factory(
            title="Budget proxy", owner=alice, base_url=upstream.base_url, **fields
        )
        made.append(credential)
        return Setup(upstream, credential, signed_in(alice))

    yield make
    forget_counters(made)


def workers(start_site: Callable[..., Site], **env: str) -> list[Site]:
    """Two sites started at once (each takes seconds to import Django)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: start_site(**env), range(2)))


def burst(sites: list[Site], setup: Setup, calls: int) -> list[Reply]:
    """`calls` chats at once, spread evenly over `sites`."""

    async def main() -> list[Reply]:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:

            async def one(index: int) -> Reply:
                site = index % len(sites)
                url = sites[site].base_url + "/api/llm/chat"
                async with session.post(url, json=setup.body, headers=setup.headers) as answer:
                    body = await answer.json()
                    return Reply(site, answer.status, body, answer.headers.get("Retry-After"))

            return await asyncio.gather(*(one(index) for index in range(calls)))

    return asyncio.run(main())


def month() -> tuple[str, str]:
    """This month's name and its reset, as refusals word them."""
    start, end = limits.month_of(timezone.now())
    return f"{start:%B %Y}", f"{end.day} {end:%B %Y} at 00:00 UTC"


def over_budget(spent: str, title: str = "Budget proxy", budget: str = "$0.0001") -> str:
    name, resets = month()
    return (
        f"Credential {title!r} has spent {spent} of its {budget} budget for {name}; it resets "
        f"on {resets}. Choose another credential, or ask an admin to raise the budget."
    )


def assert_answered(answer: Answer) -> None:
    assert answer.status == 200, answer.content
    assert answer.json()["text"] == "echo: hi"


def assert_over_budget(answer: Answer, spent: str) -> None:
    assert answer.status == 402, answer.content
    assert answer.json() == {"error": {"type": "BudgetExceeded", "message": over_budget(spent)}}


def spend_counter(setup: Setup) -> int | None:
    """The credential's spend counter this month in Redis, in units of 1e-8 USD."""
    value = cache.get(spend_key(setup))
    return None if value is None else int(value)


def sent_within(seconds: float, setup: Setup, expected: int) -> None:
    """The workers' charges reach Redis in time (the default: 0.1 s, batched)."""
    deadline = time.monotonic() + seconds
    while (counter := spend_counter(setup)) != expected:
        assert time.monotonic() < deadline, f"the spend counter stays at {counter}"
        time.sleep(0.01)


def spend_key(setup: Setup) -> str:
    return limits.spend_key(limits.month_of(timezone.now())[0], setup.credential.pk)


# ---- a budget -------------------------------------------------------------------------


@pytest.mark.parametrize("flush", ["0", "default"])
def test_a_budget_spent_through_one_worker_is_spent_on_every_worker(
    redis_cache: None,
    make_setup: Callable[..., Setup],
    start_site: Callable[..., Site],
    flush: str,
) -> None:
    """Usage records are buffered (the default flush interval), the counters are not:
    with LLM_CHARGE_FLUSH_SECONDS=0 each call's charge is in Redis before its answer;
    by default a worker sends its charges within 0.1 s."""
    setup = make_setup(monthly_budget_usd=BUDGET)
    charges = {"LLM_CHARGE_FLUSH_SECONDS": flush} if flush != "default" else {}
    one, two = workers(start_site, **SHARED, **charges)

    for site in (one, two, one, two):  # $0.00003 each: $0.00009 is still under $0.0001
        assert_answered(setup.chat(site))
    assert setup.chats == 4
    if flush == "0":
        assert spend_counter(setup) == 12_000
    else:
        sent_within(1.0, setup, 12_000)

    for site in (one, two, two, one):
        assert_over_budget(setup.chat(site), "$0.00012")
    assert setup.chats == 4  # the refused calls were never sent


# ---- requests per minute ----------------------------------------------------------------


def test_a_burst_over_two_workers_admits_exactly_the_requests_per_minute(
    make_setup: Callable[..., Setup], start_site: Callable[..., Site]
) -> None:
    setup = make_setup(requests_per_minute=PER_MINUTE)
    sites = workers(start_site, **SHARED)

    replies = burst(sites, setup, BURST)

    statuses = [reply.status for reply in replies]
    assert statuses.count(200) == PER_MINUTE, statuses
    assert statuses.count(429) == BURST - PER_MINUTE, statuses
    # Each worker had 100 of the calls: counting alone, each would have admitted 60.
    assert setup.chats == PER_MINUTE
    waits = [assert_rate_limited(reply) for reply in replies if reply.status == 429]
    assert 1 <= min(waits) <= max(waits) <= 60


def assert_rate_limited(reply: Reply) -> int:
    """The refusal's sentence and Retry-After; returns the seconds it says."""
    assert reply.body["error"]["type"] == "RateLimited"
    message = reply.body["error"]["message"]
    waited = re.fullmatch(
        rf"Credential 'Budget proxy' allows {PER_MINUTE} requests per minute, and its share "
        r"of this minute is used up: try again in (\d+) s\.",
        message,
    )
    assert waited is not None, message
    assert reply.retry_after is not None
    assert reply.retry_after == waited.group(1)
    return int(reply.retry_after)


def test_without_redis_each_worker_admits_its_own_requests_per_minute(
    make_setup: Callable[..., Setup], start_site: Callable[..., Site]
) -> None:
    """The documented behaviour of a local-memory cache (no CACHE_URL): every worker
    counts alone, so N workers admit N times the limit (llm/limits.py; `check --deploy`
    warns about several workers on a local cache). Sessions still reach both workers:
    they are in the database too (platform_site/sessions.py)."""
    setup = make_setup(requests_per_minute=PER_MINUTE)
    sites = workers(start_site)  # no CACHE_URL: locmemcache://

    replies = burst(sites, setup, BURST)

    for site in (0, 1):
        mine = [reply.status for reply in replies if reply.site == site]
        assert mine.count(200) == PER_MINUTE, mine
        assert mine.count(429) == BURST // 2 - PER_MINUTE, mine
    assert setup.chats == 2 * PER_MINUTE
    waits = [assert_rate_limited(reply) for reply in replies if reply.status == 429]
    assert 1 <= min(waits) <= max(waits) <= 60


# ---- reconciliation ---------------------------------------------------------------------


def reconcile_spend() -> str:
    env = subprocess_env(DATABASE_URL=database_url(), CACHE_URL=TEST_REDIS_URL)
    done = run_manage("reconcile_spend", env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_reconcile_spend_restores_a_lost_spend_counter_from_the_usage_records(
    redis_cache: None, make_setup: Callable[..., Setup], start_site: Callable[..., Site]
) -> None:
    setup = make_setup(monthly_budget_usd=BUDGET)
    # Each usage record is written as its call ends, and each charge is sent in the call:
    # the counters can be rebuilt at once, and read right after a call.
    site = start_site(**SHARED, LLM_USAGE_FLUSH_SECONDS="0", LLM_CHARGE_FLUSH_SECONDS="0")
    for _ in range(4):
        assert_answered(setup.chat(site))
    assert_over_budget(setup.chat(site), "$0.00012")

    cache.delete(spend_key(setup))  # Redis lost it (flushed, or a new Redis)
    assert spend_counter(setup) is None
    output = reconcile_spend()

    assert output == "credential 'Budget proxy': $0.00012 this month (was missing)\n"
    assert spend_counter(setup) == 12_000
    assert_over_budget(setup.chat(site), "$0.00012")
    assert setup.chats == 4

    # A counter behind the records (Redis restored from an old snapshot) lets calls
    # through until it is reconciled.
    cache.set(spend_key(setup), 3_000, None)
    assert_answered(setup.chat(site))
    assert spend_counter(setup) == 6_000
    output = reconcile_spend()

    assert output == "credential 'Budget proxy': $0.00015 this month (was $0.00006)\n"
    assert spend_counter(setup) == 15_000
    assert_over_budget(setup.chat(site), "$0.00015")
    assert setup.chats == 5

    # Reconciled again, nothing changes; a counter that is missing when a call comes is
    # seeded from the records by the worker itself.
    assert reconcile_spend() == "credential 'Budget proxy': $0.00015 this month (unchanged)\n"
    cache.delete(spend_key(setup))
    assert_over_budget(setup.chat(site), "$0.00015")
    assert spend_counter(setup) == 15_000
    assert setup.chats == 5
