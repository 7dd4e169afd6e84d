"""A monthly budget resets on the 1st at 00:00 UTC (llm/limits.py), on a driven clock.

The calls are real (a loopback upstream that prices each one), in this process, with
the counters in a local-memory cache or in Redis; time_machine moves the clock (of this
process and of its upstream thread) across the end of November 2026.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis
import time_machine
from asgiref.sync import async_to_sync

from credentials.models import APIKeyCredentials
from llm import limits, services
from llm.errors import BudgetExceeded
from llm.models import UsageRecord
from tests.conftest import TEST_REDIS_URL
from tests.upstream import Upstream

MODEL = "gpt-test-mini"
HI = [{"role": "user", "content": "hi"}]
NOVEMBER_LAST_MINUTE = datetime(2026, 11, 30, 23, 59, tzinfo=UTC)
DECEMBER_FIRST = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture(params=["sync", "async"])
def call(request: pytest.FixtureRequest) -> Callable[..., services.ChatResult]:
    """services.chat, or services.achat from an event loop."""
    if request.param == "sync":
        return services.chat
    return async_to_sync(services.achat)


@pytest.fixture
def budgeted(
    counters: str,
    alice: Any,
    credential_factory: Callable[..., APIKeyCredentials],
    start_upstream: Callable[..., Upstream],
) -> Iterator[tuple[APIKeyCredentials, Upstream]]:
    """Alice's credential with a $0.0001 budget; each call costs $0.00003."""
    upstream = start_upstream(cost="0.00003")
    credential = credential_factory(
        title="Alice proxy",
        owner=alice,
        base_url=upstream.base_url,
        monthly_budget_usd=Decimal("0.0001"),
    )
    yield credential, upstream
    forget(counters, credential)


def forget(counters: str, credential: APIKeyCredentials) -> None:
    """Drop the credential's counters, as a restarted worker or an emptied Redis would."""
    if counters == "local":
        limits.local.clear()
        return
    client = redis.Redis.from_url(TEST_REDIS_URL)
    keys = list(client.scan_iter(f"*keyroute:*{credential.pk.hex}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def refusal(spent: str, month: str, resets: str) -> str:
    return (
        f"Credential 'Alice proxy' has spent {spent} of its $0.0001 budget for {month}; it "
        f"resets on {resets} at 00:00 UTC. Choose another credential, or ask an admin to "
        "raise the budget."
    )


def test_a_budget_spent_in_november_is_there_again_on_1_december(
    budgeted: tuple[APIKeyCredentials, Upstream],
    call: Callable[..., services.ChatResult],
    counters: str,
    alice: Any,
) -> None:
    credential, upstream = budgeted

    def chat() -> services.ChatResult:
        return call(messages=HI, model=MODEL, credential=credential, user=alice)

    with time_machine.travel(NOVEMBER_LAST_MINUTE, tick=True) as clock:
        for _ in range(4):  # $0.00009 before the fourth: still under the budget
            assert chat().text == "echo: hi"
        with pytest.raises(BudgetExceeded) as november:
            chat()
        assert november.value.message == refusal("$0.00012", "November 2026", "1 December 2026")
        assert november.value.status == 402
        assert len(upstream.requests) == 4

        clock.move_to(DECEMBER_FIRST)
        # December's counter starts from December's usage records: none yet.
        for _ in range(4):
            assert chat().text == "echo: hi"
        with pytest.raises(BudgetExceeded) as december:
            chat()
        assert december.value.message == refusal("$0.00012", "December 2026", "1 January 2027")

        # A counter seeded again counts December's records alone, not November's too.
        forget(counters, credential)
        with pytest.raises(BudgetExceeded) as seeded:
            chat()
        assert seeded.value.message == december.value.message

    assert len(upstream.requests) == 8
    records = UsageRecord.objects.filter(credential=credential, outcome="ok")
    costs = records.values_list("cost_usd", flat=True)
    before = list(costs.filter(created_at__lt=DECEMBER_FIRST))
    after = list(costs.filter(created_at__gte=DECEMBER_FIRST))
    assert before == after == [Decimal("0.00003")] * 4
