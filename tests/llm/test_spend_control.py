"""Spend control in one process: allowed models, what a call costs, budgets and rates.

Calls reach a real loopback upstream; `Upstream(cost=...)` sends LiteLLM's cost header.
The cross-process behaviour (two workers sharing Redis, rollover) is in
test_limits_workers.py and test_budget_month.py.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from credentials.fields import ModelListFormField
from llm import limits, services, usage
from llm.errors import BudgetExceeded, ModelNotAllowed, RateLimited
from llm.models import ModelPrice, UsageRecord
from tests.conftest import TEST_REDIS_URL
from tests.llm.conftest import forget_counters
from tests.upstream import free_port

HELLO = [{"role": "user", "content": "hello there"}]  # 2 tokens in, 3 out


@pytest.fixture
def user(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("carol", password="not-used-Pw-4u8e")


@pytest.fixture
def record_now(settings: Any) -> None:
    settings.LLM_USAGE_FLUSH_SECONDS = 0  # each call's record is written as it ends


def chat(credential: Any, user: Any, model: str = "gpt-test-mini") -> services.ChatResult:
    return services.chat(messages=HELLO, model=model, credential=credential, user=user)


def achat(credential: Any, user: Any, model: str = "gpt-test-mini") -> services.ChatResult:
    return async_to_sync(services.achat)(
        messages=HELLO, model=model, credential=credential, user=user
    )


def stream(credential: Any, user: Any, model: str = "gpt-test-mini") -> services.ChatResult:
    async def run() -> services.ChatResult:
        items = services.astream_chat(messages=HELLO, model=model, credential=credential, user=user)
        return [item async for item in items][-1]  # type: ignore[return-value]

    return async_to_sync(run)()


# ---- allowed models ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "model", "allows"),
    [
        ([], "anything-at-all", True),
        (["gpt-4o-mini"], "gpt-4o-mini", True),
        (["gpt-4o-mini"], "gpt-4o", False),
        (["gpt-4o-mini"], "GPT-4o-mini", False),  # names are compared as LiteLLM does
        (["gpt-4o*"], "gpt-4o", True),
        (["gpt-4o*"], "gpt-4o-2024-08-06", True),
        (["gpt-4o*"], "gpt-4", False),
        (["*-mini"], "o3-mini", True),
        (["openai/*"], "openai/gpt-4o", True),
        (["openai/*"], "anthropic/claude", False),
        (["gpt-4.1"], "gpt-481", False),  # a dot is a dot, not "any character"
        (["claude-*-sonnet*"], "claude-3-5-sonnet-latest", True),
        (["a", "b*"], "bee", True),
    ],
)
def test_it_matches_names_and_patterns(
    credential_factory: Any, allowed: list[str], model: str, allows: bool
) -> None:
    assert credential_factory(allowed_models=allowed).allows_model(model) is allows


def test_the_admin_field_reads_one_name_per_line_or_commas() -> None:
    field = ModelListFormField(required=False)
    assert field.clean("gpt-4o-mini\n  embed-*  ,o3-mini\n\ngpt-4o-mini") == [
        "gpt-4o-mini",
        "embed-*",
        "o3-mini",
    ]
    assert field.clean("") == []
    with pytest.raises(ValidationError) as refused:
        field.clean("gpt 4o")
    assert refused.value.messages == [
        "Not a model name: 'gpt 4o'. Write one name or pattern per line, without spaces or "
        "control characters."
    ]


def test_a_model_off_the_list_is_refused_before_anything_is_sent(
    credential_factory: Any, upstream: Any, user: Any, record_now: None
) -> None:
    credential = credential_factory(
        title="Team", base_url=upstream.base_url, allowed_models=["gpt-test-mini", "embed-*"]
    )

    with pytest.raises(ModelNotAllowed) as refused:
        chat(credential, user, model="gpt-test-large")

    assert refused.value.status == 403
    assert str(refused.value) == (
        "Credential 'Team' may not use the model 'gpt-test-large': it allows gpt-test-mini, "
        "embed-*. Choose one of those, or ask an admin to add the model to the credential's "
        "allowed models."
    )
    assert upstream.requests == []
    assert UsageRecord.objects.get().outcome == "ModelNotAllowed"
    assert chat(credential, user).text == "echo: hello there"
    embedded = services.embed(texts=["hi"], model="embed-test", credential=credential, user=user)
    assert len(embedded.vectors) == 1


def test_the_model_list_is_filtered_by_the_allow_list(
    credential_factory: Any, upstream: Any, user: Any
) -> None:
    credential = credential_factory(base_url=upstream.base_url, allowed_models=["embed-*"])
    assert services.list_models(credential=credential, user=user).models == ["embed-test"]
    listed = async_to_sync(services.alist_models)(credential=credential, user=user)
    assert listed.models == ["embed-test"]
    # The admin's connection test shows everything the key can reach.
    assert services.probe([credential])[0].models == (
        "embed-test",
        "gpt-test-large",
        "gpt-test-mini",
    )


# ---- every call has a cost ---------------------------------------------------------------


@pytest.mark.parametrize("call", [chat, achat, stream])
def test_the_answers_cost_wins_over_the_price_table(
    call: Any, credential_factory: Any, start_upstream: Any, user: Any, record_now: None
) -> None:
    upstream = start_upstream(cost="0.0042")
    ModelPrice.objects.create(
        model="gpt-test-mini", input_usd_per_million=1000, output_usd_per_million=1000
    )
    credential = credential_factory(base_url=upstream.base_url)

    result = call(credential, user)

    assert (result.cost_usd, result.cost_source) == (0.0042, "header")
    record = UsageRecord.objects.get()
    assert (record.cost_usd, record.cost_source) == (Decimal("0.0042"), "header")


@pytest.mark.parametrize("call", [chat, achat, stream])
def test_the_price_table_prices_answers_without_a_cost(
    call: Any, credential_factory: Any, upstream: Any, user: Any, record_now: None
) -> None:
    ModelPrice.objects.create(
        model="gpt-test-*", input_usd_per_million=Decimal("2.5"), output_usd_per_million=10
    )
    credential = credential_factory(base_url=upstream.base_url)

    result = call(credential, user)

    # 2 prompt tokens at $2.50 per million, 3 completion tokens at $10 per million.
    assert (result.cost_usd, result.cost_source) == (0.000035, "price_table")
    record = UsageRecord.objects.get()
    assert (record.cost_usd, record.cost_source) == (Decimal("0.000035"), "price_table")


def test_a_zero_cost_for_a_call_that_used_tokens_is_priced_by_the_table(
    credential_factory: Any, start_upstream: Any, user: Any
) -> None:
    upstream = start_upstream(cost="0.0")  # what LiteLLM sends for a model it cannot price
    ModelPrice.objects.create(
        model="gpt-test-mini", input_usd_per_million=1_000_000, output_usd_per_million=0
    )
    credential = credential_factory(base_url=upstream.base_url)
    assert chat(credential, user).cost_usd == 2.0


def test_the_most_specific_row_and_the_providers_own_price_win(
    credential_factory: Any, upstream: Any, user: Any
) -> None:
    for model, provider, price in [
        ("*", "", 1),
        ("gpt-*", "", 2),
        ("gpt-test-*", "", 3),
        ("gpt-test-*", "openrouter", 4),
        ("gpt-test-large", "", 5),
    ]:
        ModelPrice.objects.create(
            model=model,
            provider=provider,
            input_usd_per_million=price * 1_000_000,
            output_usd_per_million=0,
        )
    litellm = credential_factory(base_url=upstream.base_url, provider="litellm")
    openrouter = credential_factory(base_url=upstream.base_url, provider="openrouter")

    assert chat(litellm, user).cost_usd == 2 * 3  # 2 prompt tokens
    assert chat(openrouter, user).cost_usd == 2 * 4
    assert chat(openrouter, user, model="gpt-test-large").cost_usd == 2 * 5
    assert chat(litellm, user, model="other").cost_usd == 2 * 1


def test_a_new_price_is_used_by_the_next_call(
    credential_factory: Any, upstream: Any, user: Any
) -> None:
    credential = credential_factory(base_url=upstream.base_url)
    assert chat(credential, user).cost_source == "none"
    ModelPrice.objects.create(
        model="gpt-test-mini", input_usd_per_million=500_000, output_usd_per_million=0
    )
    assert chat(credential, user).cost_usd == 1.0


def test_an_unpriced_call_is_flagged_and_warned_about_once_per_model(
    credential_factory: Any, upstream: Any, user: Any, record_now: None, caplog: Any
) -> None:
    credential = credential_factory(base_url=upstream.base_url)
    model = f"unpriced-{uuid.uuid4().hex[:8]}"

    with caplog.at_level(logging.WARNING, logger="llm.prices"):
        for _ in range(3):
            chat(credential, user, model=model)

    assert {(r.cost_usd, r.cost_source) for r in UsageRecord.objects.all()} == {(None, "none")}
    warnings = [r.getMessage() for r in caplog.records if model in r.getMessage()]
    assert len(warnings) == 1
    assert "the price table has no row for it" in warnings[0]
    assert "manage.py import_model_prices" in warnings[0]


def test_the_migration_says_existing_costs_came_from_the_upstream(transactional_db: None) -> None:
    before, after = (
        [("llm", "0003_usage_outlives_credentials")],
        [("llm", "0004_prices_and_cost_source")],
    )
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps.get_model("llm", "UsageRecord")
    old.objects.create(purpose="chat", model="costly", cost_usd=Decimal("0.5"))
    old.objects.create(purpose="chat", model="free")
    executor = MigrationExecutor(connection)
    executor.migrate(after)
    migrated = executor.loader.project_state(after).apps.get_model("llm", "UsageRecord")
    sources = dict(migrated.objects.values_list("model", "cost_source"))
    MigrationExecutor(connection).migrate(executor.loader.graph.leaf_nodes())

    assert sources == {"costly": "header", "free": "none"}


# ---- budgets -----------------------------------------------------------------------------


def test_a_budget_refuses_calls_once_the_spend_reaches_it(
    credential_factory: Any, start_upstream: Any, user: Any
) -> None:
    upstream = start_upstream(cost="0.00003")
    credential = credential_factory(
        title="Team", base_url=upstream.base_url, monthly_budget_usd=Decimal("0.0001")
    )

    for _ in range(4):  # 0, 0.00003, 0.00006, 0.00009: each below the budget
        chat(credential, user)
    with pytest.raises(BudgetExceeded) as refused:
        chat(credential, user)

    assert refused.value.status == 402
    assert str(refused.value).startswith(
        "Credential 'Team' has spent $0.00012 of its $0.0001 budget for "
    )
    assert "; it resets on 1 " in str(refused.value)
    assert "at 00:00 UTC. Choose another credential, or ask an admin to raise the budget." in str(
        refused.value
    )
    assert len(upstream.requests) == 4


def test_a_users_cap_stops_that_user_only(
    credential_factory: Any, start_upstream: Any, user: Any, django_user_model: Any
) -> None:
    upstream = start_upstream(cost="0.5")
    other = django_user_model.objects.create_user("dave", password="not-used-Pw-4u8e")
    credential = credential_factory(
        title="Shared", base_url=upstream.base_url, user_monthly_budget_usd=Decimal("1")
    )

    chat(credential, user)
    chat(credential, user)
    with pytest.raises(BudgetExceeded) as refused:
        chat(credential, user)

    assert str(refused.value).startswith(
        "You have spent $1.00 of your $1.00 monthly cap on credential 'Shared' for "
    )
    assert chat(credential, other).text == "echo: hello there"


def test_a_streamed_call_is_counted_before_its_reader_gets_the_result(
    counters: str, credential_factory: Any, start_upstream: Any, user: Any
) -> None:
    """A reader that sends its next call as soon as it has the result (the playground
    does, on "done") finds the streamed call already counted."""
    upstream = start_upstream(cost="1")
    credential = credential_factory(base_url=upstream.base_url, monthly_budget_usd=Decimal("1"))

    async def next_call_on_the_result() -> BudgetExceeded | None:
        refused = None
        items = services.astream_chat(
            messages=HELLO, model="gpt-test-mini", credential=credential, user=user
        )
        async for item in items:
            if isinstance(item, services.ChatResult):  # the stream is still open
                try:
                    await services.achat(
                        messages=HELLO, model="gpt-test-mini", credential=credential, user=user
                    )
                except BudgetExceeded as error:
                    refused = error
        return refused

    refused = async_to_sync(next_call_on_the_result)()
    forget_counters([credential])

    assert refused is not None, "the next call was admitted: the stream was not counted yet"
    assert "spent $1.00 of its $1.00 budget" in refused.message
    assert len([r for r in upstream.requests if r.path.endswith("/chat/completions")]) == 1


def test_a_missing_counter_is_seeded_from_the_usage_records(
    credential_factory: Any, start_upstream: Any, user: Any, record_now: None
) -> None:
    upstream = start_upstream(cost="0.4")
    credential = credential_factory(base_url=upstream.base_url)
    chat(credential, user)
    chat(credential, user)  # $0.80 spent before the budget was set
    credential.monthly_budget_usd = Decimal("1")
    credential.save()

    chat(credential, user)  # the counter is read from the records: 0.80 < 1
    with pytest.raises(BudgetExceeded, match=r"spent \$1.20 of its \$1.00 budget"):
        chat(credential, user)


def test_the_soft_limit_warns_once_when_the_spend_crosses_it(
    credential_factory: Any, start_upstream: Any, user: Any, caplog: Any
) -> None:
    upstream = start_upstream(cost="0.3")
    credential = credential_factory(
        title="Team", base_url=upstream.base_url, monthly_budget_usd=Decimal("1")
    )

    with caplog.at_level(logging.WARNING, logger="llm.limits"):
        for _ in range(3):  # 0.30, 0.60, 0.90: the third crosses 80%
            chat(credential, user)

    warnings = [r.getMessage() for r in caplog.records if r.name == "llm.limits"]
    assert warnings == [
        "Spend warning: credential 'Team' has spent $0.90 of its $1.00 monthly budget (90%)."
    ]


def test_a_platform_call_counts_against_the_credentials_budget(
    credential_factory: Any, start_upstream: Any
) -> None:
    upstream = start_upstream(cost="2")
    credential = credential_factory(
        base_url=upstream.base_url,
        monthly_budget_usd=Decimal("1"),
        user_monthly_budget_usd=Decimal("0.5"),
    )
    chat(credential, services.PLATFORM)  # no user: no cap, but the credential's budget
    with pytest.raises(BudgetExceeded):
        chat(credential, services.PLATFORM)


# ---- rate limits -------------------------------------------------------------------------


def test_requests_per_minute_refuse_the_next_call_with_a_retry_after(
    credential_factory: Any, upstream: Any, user: Any, record_now: None
) -> None:
    credential = credential_factory(title="Team", base_url=upstream.base_url, requests_per_minute=3)
    for _ in range(3):
        chat(credential, user)

    with pytest.raises(RateLimited) as refused:
        chat(credential, user)

    assert refused.value.status == 429
    assert refused.value.retry_after is not None
    assert 1 <= refused.value.retry_after <= 60
    assert str(refused.value) == (
        "Credential 'Team' allows 3 requests per minute, and its share of this minute is "
        f"used up: try again in {refused.value.retry_after} s."
    )
    assert len(upstream.requests) == 3
    assert UsageRecord.objects.filter(outcome="RateLimited").count() == 1


def test_a_users_requests_per_minute_leave_other_users_alone(
    credential_factory: Any, upstream: Any, user: Any, django_user_model: Any
) -> None:
    other = django_user_model.objects.create_user("erin", password="not-used-Pw-4u8e")
    credential = credential_factory(base_url=upstream.base_url, user_requests_per_minute=1)
    chat(credential, user)
    with pytest.raises(RateLimited, match="1 request per minute per user, and your share"):
        chat(credential, user)
    chat(credential, other)


def test_tokens_per_minute_refuse_once_the_minutes_tokens_are_used(
    credential_factory: Any, upstream: Any, user: Any
) -> None:
    credential = credential_factory(base_url=upstream.base_url, tokens_per_minute=9)
    chat(credential, user)  # 5 tokens
    chat(credential, user)  # 10: the next is refused
    with pytest.raises(RateLimited, match="allows 9 tokens per minute") as refused:
        chat(credential, user)
    assert refused.value.retry_after is not None
    assert 1 <= refused.value.retry_after <= 60
    assert len(upstream.requests) == 2


def test_a_refused_call_takes_nothing_from_the_other_limits(
    credential_factory: Any, upstream: Any, user: Any
) -> None:
    credential = credential_factory(
        base_url=upstream.base_url, requests_per_minute=2, user_requests_per_minute=1
    )
    chat(credential, user)
    for _ in range(5):  # refused by the user's limit: the credential's is not spent
        with pytest.raises(RateLimited):
            chat(credential, user)
    chat(credential, services.PLATFORM)


def test_a_rate_refusal_never_fails_over(
    credential_factory: Any, start_upstream: Any, user: Any
) -> None:
    main, backup = start_upstream(), start_upstream()
    fallback = credential_factory(title="Backup", base_url=backup.base_url)
    credential = credential_factory(
        base_url=main.base_url, fallback=fallback, requests_per_minute=1
    )
    chat(credential, user)
    with pytest.raises(RateLimited):
        chat(credential, user)
    assert (len(main.requests), len(backup.requests)) == (1, 0)


# ---- the shared counters -----------------------------------------------------------------


@pytest.fixture
def redis_cache(settings: Any) -> None:
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": TEST_REDIS_URL,
        }
    }


def test_a_concurrent_burst_on_redis_admits_exactly_the_limit(
    credential_factory: Any, upstream: Any, user: Any, redis_cache: None
) -> None:
    credential = credential_factory(base_url=upstream.base_url, requests_per_minute=25)

    async def burst() -> list[Any]:
        calls = [
            services.achat(messages=HELLO, model="gpt-test-mini", credential=credential, user=user)
            for _ in range(80)
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = async_to_sync(burst)()

    assert sum(isinstance(o, services.ChatResult) for o in outcomes) == 25
    assert sum(isinstance(o, RateLimited) for o in outcomes) == 55
    assert len(upstream.requests) == 25


def test_the_limits_hold_per_process_while_redis_does_not_answer(
    credential_factory: Any, upstream: Any, user: Any, settings: Any, caplog: Any
) -> None:
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
            "OPTIONS": {"socket_connect_timeout": 0.2},
        }
    }
    credential = credential_factory(base_url=upstream.base_url, requests_per_minute=2)
    chat(credential, user)
    achat(credential, user)
    with pytest.raises(RateLimited):
        chat(credential, user)


def test_reconcile_raises_a_counter_to_the_records_or_sets_it(
    credential_factory: Any, start_upstream: Any, user: Any, record_now: None
) -> None:
    upstream = start_upstream(cost="0.25")
    credential = credential_factory(base_url=upstream.base_url, monthly_budget_usd=Decimal("10"))
    chat(credential, user)
    chat(credential, user)
    store = limits.counters()
    month = limits.month_of(UsageRecord.objects.latest("created_at").created_at)[0]
    key = limits.spend_key(month, credential.pk)
    store.set(key, 0)  # wiped

    [raised] = [r for r in limits.reconcile(exact=False) if r.credential == credential]
    assert (raised.was, raised.now) == (0, limits.units(Decimal("0.5")))
    store.set(key, limits.units(Decimal("3")))
    [kept] = [r for r in limits.reconcile(exact=False) if r.credential == credential]
    assert kept.now == limits.units(Decimal("3"))  # records lag: a higher counter stays
    [exact] = [r for r in limits.reconcile(exact=True) if r.credential == credential]
    assert exact.now == limits.units(Decimal("0.5"))
    assert usage.flush() == 0
