"""No budget or limit check ever sends a request upstream first (llm/limits.py).

For each refusal (a model off the allow-list, the credential's budget, the user's cap,
requests and tokens per minute, the credential's and the user's), calls are made until
the limit is reached, then one more: it is refused with its sentence, and the loopback
upstream received nothing for it. Sync, async and streamed calls, with the counters in this
process's own cache and in Redis. The clock stands at 12:00:05 on 10 November 2026 (it
ticks): a minute's tokens do not start afresh during a test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import time_machine
from asgiref.sync import async_to_sync

from credentials.models import APIKeyCredentials
from llm import services
from llm.errors import BudgetExceeded, LLMError, ModelNotAllowed, RateLimited
from tests.conftest import TEST_REDIS_URL
from tests.llm.conftest import forget_counters
from tests.upstream import Upstream

MODEL = "gpt-test-mini"
HI = [{"role": "user", "content": "hi"}]  # 3 tokens a call: "hi", then "echo: hi"
NOW = datetime(2026, 11, 10, 12, 0, 5, tzinfo=UTC)
RESETS = "for November 2026; it resets on 1 December 2026 at 00:00 UTC."
WAIT = r"try again in (?P<wait>\d+) s\."


@dataclass(frozen=True)
class Case:
    fields: dict[str, Any]
    admitted: int  # calls of MODEL before the refusal
    error: type[LLMError]
    status: int
    message: str  # a regex
    per_user: bool = False  # another user is still admitted
    allowed: list[str] = field(default_factory=list)  # models that are admitted first


CASES = {
    "model": Case(
        {"allowed_models": ["gpt-test-large", "embed-*"]},
        0,
        ModelNotAllowed,
        403,
        re.escape(
            "Credential 'Alice proxy' may not use the model 'gpt-test-mini': it allows "
            "gpt-test-large, embed-*. Choose one of those, or ask an admin to add the model "
            "to the credential's allowed models."
        ),
        allowed=["gpt-test-large"],
    ),
    "budget": Case(
        {"monthly_budget_usd": Decimal("0.0001")},
        4,
        BudgetExceeded,
        402,
        re.escape(
            f"Credential 'Alice proxy' has spent $0.00012 of its $0.0001 budget {RESETS} "
            "Choose another credential, or ask an admin to raise the budget."
        ),
    ),
    "user cap": Case(
        {"user_monthly_budget_usd": Decimal("0.00005")},
        2,
        BudgetExceeded,
        402,
        re.escape(
            "You have spent $0.00006 of your $0.00005 monthly cap on credential 'Alice proxy' "
            f"{RESETS} Choose another credential, or ask an admin to raise the cap."
        ),
        per_user=True,
    ),
    "requests": Case(
        {"requests_per_minute": 3},
        3,
        RateLimited,
        429,
        "Credential 'Alice proxy' allows 3 requests per minute, and its share of this "
        f"minute is used up: {WAIT}",
    ),
    "tokens": Case(
        {"tokens_per_minute": 5},
        2,
        RateLimited,
        429,
        "Credential 'Alice proxy' allows 5 tokens per minute, and its share of this minute "
        f"is used up: {WAIT}",
    ),
    "user requests": Case(
        {"user_requests_per_minute": 2},
        2,
        RateLimited,
        429,
        "Credential 'Alice proxy' allows 2 requests per minute per user, and your share of "
        f"this minute is used up: {WAIT}",
        per_user=True,
    ),
    "user tokens": Case(
        {"user_tokens_per_minute": 4},
        2,
        RateLimited,
        429,
        "Credential 'Alice proxy' allows 4 tokens per minute per user, and your share of "
        f"this minute is used up: {WAIT}",
        per_user=True,
    ),
}


async def astreamed(**arguments: Any) -> services.ChatResult:
    """services.astream_chat read to its end: its ChatResult."""
    results = [
        item
        async for item in services.astream_chat(**arguments)
        if isinstance(item, services.ChatResult)
    ]
    assert len(results) == 1
    return results[0]


@pytest.fixture(params=["sync", "async", "stream"])
def call(request: pytest.FixtureRequest) -> Callable[..., services.ChatResult]:
    """services.chat, services.achat, or services.astream_chat, from an event loop."""
    if request.param == "sync":
        return services.chat
    return async_to_sync(services.achat if request.param == "async" else astreamed)


@pytest.fixture
def made() -> Iterator[list[APIKeyCredentials]]:
    """The credentials a test makes; their counters leave the shared Redis after it."""
    credentials: list[APIKeyCredentials] = []
    yield credentials
    forget_counters(credentials)


@pytest.mark.parametrize("kind", CASES)
def test_a_refused_call_sends_nothing_upstream(
    kind: str,
    counters: str,
    call: Callable[..., services.ChatResult],
    made: list[APIKeyCredentials],
    alice: Any,
    django_user_model: Any,
    credential_factory: Callable[..., APIKeyCredentials],
    start_upstream: Callable[..., Upstream],
) -> None:
    case = CASES[kind]
    upstream = start_upstream(cost="0.00003")
    credential = credential_factory(
        title="Alice proxy",
        owner=None if case.per_user else alice,  # shared: the limit is alice's alone
        base_url=upstream.base_url,
        **case.fields,
    )
    made.append(credential)

    def chat(model: str = MODEL, user: Any = alice) -> services.ChatResult:
        return call(messages=HI, model=model, credential=credential, user=user)

    with time_machine.travel(NOW, tick=True):
        for model in case.allowed:
            assert chat(model).text == "echo: hi"
        for _ in range(case.admitted):
            assert chat().text == "echo: hi"
        sent = len(upstream.requests)
        assert sent == len(case.allowed) + case.admitted

        for _ in range(2):
            with pytest.raises(case.error) as refused:
                chat()
            assert len(upstream.requests) == sent
            error = refused.value
            assert error.status == case.status
            matched = re.fullmatch(case.message, error.message)
            assert matched is not None, error.message
            if case.error is RateLimited:
                assert error.retry_after == int(matched["wait"])
                assert 1 <= error.retry_after <= 60
            else:
                assert error.retry_after is None

        if case.per_user:
            bob = django_user_model.objects.create_user("bob")
            assert chat(user=bob).text == "echo: hi"
            assert len(upstream.requests) == sent + 1


def test_retry_after_is_within_the_minute_when_the_workers_clocks_differ(
    made: list[APIKeyCredentials],
    alice: Any,
    credential_factory: Callable[..., APIKeyCredentials],
    start_upstream: Callable[..., Upstream],
    settings: Any,
) -> None:
    """Workers on two hosts, one's clock 2 s behind the other's, share Redis."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": TEST_REDIS_URL,
        }
    }
    settings.LLM_SPEND_RECONCILE_SECONDS = 0
    upstream = start_upstream()
    credential = credential_factory(
        title="Alice proxy", owner=alice, base_url=upstream.base_url, requests_per_minute=1
    )
    made.append(credential)

    def chat() -> services.ChatResult:
        return services.chat(messages=HI, model=MODEL, credential=credential, user=alice)

    with time_machine.travel(NOW, tick=False) as clock:
        clock.shift(2)  # the host ahead
        assert chat().text == "echo: hi"
        clock.shift(-2)  # the host behind, at the same moment
        with pytest.raises(RateLimited) as refused:
            chat()

    assert len(upstream.requests) == 1
    assert refused.value.retry_after is not None
    assert 1 <= refused.value.retry_after <= 60, refused.value.message
