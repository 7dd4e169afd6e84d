"""The real LiteLLM Proxy killed under load: calls fail over to a credential that goes
straight to the provider, none fails, and traffic returns once the proxy is back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
from asgiref.sync import async_to_sync

from llm import services
from llm.errors import LLMError
from llm.models import UsageRecord
from tests.litellm.proxy import CHAT_MODEL, KEY_B, UPSTREAM_KEY

MESSAGES = [{"role": "user", "content": "are you there"}]
IN_FLIGHT = 8
COOLDOWN = 2.0


@dataclass
class Outcome:
    started: float
    ended: float
    served_by: str  # "proxy", "direct", or the error's class


async def run_calls(credential, user, until, outcomes, labels) -> None:
    """IN_FLIGHT callers, each calling again as soon as its answer came, until `until()`."""

    async def caller() -> None:
        while not until():
            started = time.monotonic()
            try:
                result = await services.achat(
                    messages=MESSAGES, model=CHAT_MODEL, credential=credential, user=user
                )
                served_by = labels[result.route.credential_id]
            except LLMError as error:
                served_by = type(error).__name__
            outcomes.append(Outcome(started, time.monotonic(), served_by))

    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))


@pytest.mark.django_db(transaction=True)
def test_a_killed_proxy_fails_over_without_a_failed_call_and_traffic_returns(
    killable_proxy, credential_factory, django_user_model, settings
):
    proxy, upstream = killable_proxy
    settings.LLM_BREAKER_COOLDOWN_SECONDS = COOLDOWN
    settings.LLM_USAGE_FLUSH_SECONDS = 0
    alice = django_user_model.objects.create_user("alice")
    direct = credential_factory(title="Direct", api_key=UPSTREAM_KEY, base_url=upstream.base_url)
    main = credential_factory(
        title="Proxy", owner=alice, api_key=KEY_B, base_url=proxy.base_url, fallback=direct
    )
    labels = {str(main.pk): "proxy", str(direct.pk): "direct"}
    upstream.respond(delay=0.05)  # calls are in flight, inside the proxy, when it dies
    outcomes: list[Outcome] = []
    marks: dict[str, float] = {}

    async def scenario() -> None:
        def until_done() -> bool:
            return "done" in marks

        async def kill_then_restart() -> None:
            # Killed once calls are going through it (a first call through a cold proxy
            # can take seconds on a busy machine), and a little more.
            while not any(o.served_by == "proxy" for o in outcomes):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            marks["killed"] = time.monotonic()
            proxy.kill()
            await asyncio.sleep(2.0)
            await asyncio.to_thread(proxy.start)  # the same port; returns once alive
            marks["alive"] = time.monotonic()
            deadline = marks["alive"] + 10 * COOLDOWN
            while time.monotonic() < deadline:
                recent = [o for o in outcomes[-IN_FLIGHT:] if o.started > marks["alive"]]
                if len(recent) == IN_FLIGHT and all(o.served_by == "proxy" for o in recent):
                    break
                await asyncio.sleep(0.1)
            marks["back"] = time.monotonic()
            await asyncio.sleep(0.5)
            marks["done"] = time.monotonic()

        await asyncio.gather(
            run_calls(main, alice, until_done, outcomes, labels),
            kill_then_restart(),
        )

    async_to_sync(scenario)()

    failed = [o.served_by for o in outcomes if o.served_by not in ("proxy", "direct")]
    assert failed == [], f"{len(failed)} of {len(outcomes)} calls failed"
    before = [o for o in outcomes if o.ended < marks["killed"]]
    down = [o for o in outcomes if marks["killed"] < o.started and o.ended < marks["alive"]]
    after = [o for o in outcomes if o.started > marks["back"]]
    assert before
    assert {o.served_by for o in before} == {"proxy"}
    assert down
    assert {o.served_by for o in down} == {"direct"}
    first_back = min(
        (o.ended for o in outcomes if o.started > marks["alive"] and o.served_by == "proxy"),
        default=None,
    )
    assert first_back is not None, "no call reached the proxy after it came back"
    assert after
    assert {o.served_by for o in after} == {"proxy"}
    # Within a few cooldowns of the proxy answering again (not a benchmark: a bound).
    assert first_back - marks["alive"] < 5 * COOLDOWN
    # Every call, failed over or not, has its usage record.
    assert UsageRecord.objects.filter(outcome="ok").count() == len(outcomes)
    assert UsageRecord.objects.filter(failed_over=True).count() == sum(
        o.served_by == "direct" for o in outcomes
    )
