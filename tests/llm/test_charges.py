"""Charges on their way to Redis (llm.limits.Charges): sent in batches by a thread of the
process, counted by the process's own admits until then, never dropped.

The tests' environment sends each charge in its call (LLM_CHARGE_FLUSH_SECONDS=0); here
the default batching is on. Redis is real: the tests' own, or one of a test's own (a
redis-server on a free port, with its data on disk) that a test stops and starts again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from asgiref.sync import async_to_sync, sync_to_async

from llm import limits, services
from llm.errors import BudgetExceeded
from llm.models import UsageRecord
from tests.conftest import TEST_REDIS_URL, Site, signed_in
from tests.llm.conftest import forget_counters
from tests.redis_server import RedisServer
from tests.upstream import Upstream

HI = [{"role": "user", "content": "hi"}]
MODEL = "gpt-test-mini"
COST = "0.00003"  # per call: a budget of $0.0001 allows four


def use_redis(settings: Any, url: str) -> None:
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}
    }


def in_redis(url: str, credential: Any) -> int | None:
    """The credential's spend counter as Redis holds it (not as this process counts it)."""
    from django.core.cache import cache
    from django.utils import timezone

    key = cache.make_and_validate_key(
        limits.spend_key(limits.month_of(timezone.now())[0], credential.pk)
    )
    client = redis.Redis.from_url(url)
    try:
        value = client.get(key)
    finally:
        client.close()
    return None if value is None else int(value)


def eventually(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


SYNC_AND_ASYNC = pytest.mark.parametrize(
    "call", [services.chat, async_to_sync(services.achat)], ids=["sync", "async"]
)


@pytest.fixture
def made() -> Iterator[list[Any]]:
    """Credentials whose counters leave the tests' Redis after the test."""
    credentials: list[Any] = []
    yield credentials
    limits.flush()
    forget_counters(credentials)


@pytest.fixture
def held_back(
    settings: Any,
    credential_factory: Any,
    start_upstream: Callable[..., Upstream],
    alice: Any,
    made: list[Any],
) -> Callable[..., tuple[Upstream, Any]]:
    """Alice's credential with a monthly budget on an upstream answering `cost` a call,
    counted in the tests' Redis by a process whose charges are held back: one send at
    once, then none for a minute."""
    use_redis(settings, TEST_REDIS_URL)
    settings.LLM_CHARGE_FLUSH_SECONDS = 60

    def make(cost: str, budget: str, **fields: Any) -> tuple[Upstream, Any]:
        upstream = start_upstream(cost=cost)
        credential = credential_factory(
            owner=alice, base_url=upstream.base_url, monthly_budget_usd=Decimal(budget), **fields
        )
        made.append(credential)
        return upstream, credential

    return make


@SYNC_AND_ASYNC
def test_charges_not_sent_yet_count_in_this_processs_own_admits(
    held_back: Callable[..., tuple[Upstream, Any]],
    alice: Any,
    call: Callable[..., services.ChatResult],
) -> None:
    upstream, credential = held_back(COST, "0.0001")

    for _ in range(4):
        assert call(messages=HI, model=MODEL, credential=credential, user=alice).text == "echo: hi"
    with pytest.raises(BudgetExceeded) as refused:
        call(messages=HI, model=MODEL, credential=credential, user=alice)

    assert "has spent $0.00012 of its $0.0001 budget" in refused.value.message
    assert len(upstream.requests) == 4
    assert (in_redis(TEST_REDIS_URL, credential) or 0) < 12_000  # the last ones wait their turn
    limits.flush()
    assert in_redis(TEST_REDIS_URL, credential) == 12_000


def test_the_budget_a_user_sees_counts_the_charges_not_sent_yet(
    held_back: Callable[..., tuple[Upstream, Any]], client: Any, alice: Any
) -> None:
    _, credential = held_back("0.25", "10")
    for _ in range(3):
        services.chat(messages=HI, model=MODEL, credential=credential, user=alice)
    client.force_login(alice)

    answer = client.get("/api/llm/budget", {"credential": str(credential.pk)})

    assert answer.status_code == 200, answer.content
    assert answer.json()["credential"]["spent"] == "0.75"
    assert (in_redis(TEST_REDIS_URL, credential) or 0) < 75_000_000


def test_a_batch_that_crosses_the_soft_limit_warns_once(
    held_back: Callable[..., tuple[Upstream, Any]], alice: Any, caplog: Any
) -> None:
    _, credential = held_back("0.3", "1", title="Team")

    with caplog.at_level(logging.WARNING, logger="llm.limits"):
        for _ in range(3):  # 0.30, 0.60, 0.90: sent at once, then together
            services.chat(messages=HI, model=MODEL, credential=credential, user=alice)
        limits.flush()
        limits.flush()  # nothing left: no second warning

    warnings = [r.getMessage() for r in caplog.records if r.name == "llm.limits"]
    assert warnings == [
        "Spend warning: credential 'Team' has spent $0.90 of its $1.00 monthly budget (90%)."
    ]


def test_a_batch_sent_again_after_its_answer_was_lost_counts_once(
    settings: Any, credential_factory: Any, alice: Any, made: list[Any]
) -> None:
    use_redis(settings, TEST_REDIS_URL)
    credential = credential_factory(owner=alice, monthly_budget_usd=Decimal("10"))
    made.append(credential)
    store = limits.counters()
    assert isinstance(store, limits.RedisCounters)
    plan = limits._plan(credential, alice)
    store.set(plan.spend[0].key, 0)
    batch = store.batch(plan, limits.units(Decimal("0.25")), 0)

    sender = f"test-{uuid.uuid4().hex}"

    assert store.send(batch, 7, sender) == [25_000_000]
    assert store.send(batch, 7, sender) is None  # a retry of batch 7: Redis ran it already
    assert store.send(batch, 8, sender) == [50_000_000]
    assert in_redis(TEST_REDIS_URL, credential) == 50_000_000


# ---- a Redis that goes away --------------------------------------------------------------


@pytest.fixture(params=[0, 0.1], ids=["in the call", "batched"])
def charged_once(
    request: pytest.FixtureRequest,
    settings: Any,
    own_redis: RedisServer,
    credential_factory: Any,
    start_upstream: Callable[..., Upstream],
    alice: Any,
) -> tuple[Upstream, Any]:
    """A credential on `own_redis` with one $0.25 call charged, each charge sent in its
    call or batched."""
    use_redis(settings, own_redis.url)
    settings.LLM_CHARGE_FLUSH_SECONDS = request.param
    upstream = start_upstream(cost="0.25")
    credential = credential_factory(
        owner=alice, base_url=upstream.base_url, monthly_budget_usd=Decimal("10")
    )
    assert services.chat(messages=HI, model=MODEL, credential=credential, user=alice)
    eventually(lambda: in_redis(own_redis.url, credential) == 25_000_000, 5, "not charged")
    return upstream, credential


def charged_once_more(own_redis: RedisServer, credential: Any) -> None:
    """The second $0.25 reaches Redis once it is back, and only once."""
    eventually(
        lambda: in_redis(own_redis.url, credential) == 50_000_000,
        5,
        "the second call's charge never reached Redis",
    )
    time.sleep(1.5)  # a retry comes a second after a failed send: none counts it twice
    assert in_redis(own_redis.url, credential) == 50_000_000


def test_a_charge_redis_could_not_take_is_sent_when_it_answers_again(
    charged_once: tuple[Upstream, Any], own_redis: RedisServer, alice: Any
) -> None:
    """Redis stops while a call is in flight: the call's charge is kept, not dropped,
    and reaches the counter once Redis is back with its data."""
    upstream, credential = charged_once
    upstream.respond(delay=1.0)

    async def stopped_in_flight() -> services.ChatResult:
        call = asyncio.create_task(
            services.achat(messages=HI, model=MODEL, credential=credential, user=alice)
        )
        while not upstream.in_flight:  # admitted by Redis, and sent
            await asyncio.sleep(0.01)
        await sync_to_async(own_redis.stop, thread_sensitive=False)()
        return await call  # ends with Redis gone

    assert async_to_sync(stopped_in_flight)().text == "echo: hi"
    own_redis.start()
    charged_once_more(own_redis, credential)
    costs = UsageRecord.objects.filter(credential=credential).values_list("cost_usd", flat=True)
    assert list(costs) == [Decimal("0.25"), Decimal("0.25")]  # what the counter holds


def test_a_call_admitted_while_redis_was_down_is_charged_to_it_when_it_is_back(
    charged_once: tuple[Upstream, Any], own_redis: RedisServer, alice: Any
) -> None:
    """Without Redis the process counts alone (and admits the call); the spend is kept
    for Redis all the same, so the shared counter does not fall behind the records."""
    _, credential = charged_once
    own_redis.stop()
    chat = services.chat
    assert chat(messages=HI, model=MODEL, credential=credential, user=alice).text == "echo: hi"
    own_redis.start()

    charged_once_more(own_redis, credential)


def test_a_redis_that_stops_answering_holds_the_sender_a_second_not_for_good(
    charged_once: tuple[Upstream, Any], own_redis: RedisServer, alice: Any
) -> None:
    """A Redis frozen (not refusing: SIGSTOP, as a network that drops packets) times
    the send out; its batch is kept, and once Redis answers again it counts once, even
    though Redis may run the first try too when it wakes."""
    _, credential = charged_once
    own_redis.freeze()
    try:
        answer = async_to_sync(services.achat)(  # admitted by this process's counters
            messages=HI, model=MODEL, credential=credential, user=alice
        )
        assert answer.text == "echo: hi"
        flushing = threading.Thread(target=limits.flush)
        flushing.start()
        flushing.join(10)  # what a stopping worker does
        assert not flushing.is_alive(), "the send waits for a frozen Redis"
    finally:
        own_redis.thaw()

    charged_once_more(own_redis, credential)


# ---- a worker that stops -----------------------------------------------------------------


def test_a_worker_that_stops_sends_the_charges_it_still_holds(
    held_back: Callable[..., tuple[Upstream, Any]],
    alice: Any,
    start_site: Callable[..., Site],
) -> None:
    _, credential = held_back(COST, "10")
    # Held back in the worker too: the rest waits there.
    site = start_site(CACHE_URL=TEST_REDIS_URL, LLM_CHARGE_FLUSH_SECONDS="60")
    headers = signed_in(alice)
    body = {"credential": str(credential.pk), "model": MODEL, "messages": HI}
    for _ in range(5):
        answer = site.request("POST", "/api/llm/chat", headers=headers, body=body)
        assert answer.status == 200, answer.content
    assert (in_redis(TEST_REDIS_URL, credential) or 0) < 15_000

    site.process.terminate()  # SIGTERM, as a deploy stops a worker
    site.process.communicate(timeout=10)

    assert in_redis(TEST_REDIS_URL, credential) == 15_000
