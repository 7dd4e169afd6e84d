"""When the proxy is down: the circuit breaker, the fallback chain and the failover route.

Dead proxies are real ports: closed ones refuse, a DeadPort accepts and hangs up at once
(and counts every knock, so a test can tell that nothing is sent to an open breaker).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.checks import run_checks
from django.test import Client

from credentials.models import PLATFORM, APIKeyCredentials
from llm import services
from llm.breaker import Ticket, breakers
from llm.errors import CredentialRejected, LLMError, ProxyUnreachable, RateLimited, UpstreamError
from llm.models import UsageRecord
from tests.conftest import FAKE_KEY
from tests.llm.test_api import events, stream
from tests.upstream import DeadPort, Upstream, free_port

MESSAGES = [{"role": "user", "content": "hello there"}]
BACKUP_KEY = "sk-test-fake-backup-7777"
FAILOVER_KEY = "sk-test-fake-failover-route-8888"


@pytest.fixture
def dead():
    with DeadPort() as port:
        yield port


@pytest.fixture
def backup(start_upstream):
    return start_upstream(cost="0.0042")


@pytest.fixture
def pair(credential_factory, alice, dead, backup):
    """Alice's credential on a dead proxy, backed by a shared credential on a live one."""
    fallback = credential_factory(title="Backup", base_url=backup.base_url, api_key=BACKUP_KEY)
    primary = credential_factory(
        title="Main", owner=alice, base_url=dead.base_url, fallback=fallback
    )
    return primary, fallback


def chat(credential, user, **kwargs):
    return services.chat(
        messages=MESSAGES, model="gpt-test-mini", credential=credential, user=user, **kwargs
    )


def achat(credential, user):
    async def run():
        return await services.achat(
            messages=MESSAGES, model="gpt-test-mini", credential=credential, user=user
        )

    return async_to_sync(run)()


# ---- failover --------------------------------------------------------------------------


@pytest.mark.parametrize("call", [chat, achat], ids=["sync", "async"])
def test_a_dead_proxy_fails_over_to_the_fallback_and_the_record_says_who_paid(
    call, pair, alice, dead, backup
):
    primary, fallback = pair

    result = call(primary, alice)

    assert result.text == "echo: hello there"
    assert result.route.source == "failover"
    assert (result.route.host, result.route.credential_title) == (
        f"127.0.0.1:{backup.port}",
        "Backup",
    )
    passed = result.route.failed_over_from
    assert passed is not None
    assert (passed.host, passed.credential_title) == (f"127.0.0.1:{dead.port}", "Main")
    assert passed.reason == "connection dropped"
    assert backup.requests[0].authorization == f"Bearer {BACKUP_KEY}"
    record = UsageRecord.objects.get()
    assert record.failed_over is True
    assert record.credential_id == primary.pk  # chosen by the user
    assert record.serving_credential_id == fallback.pk  # paid by the fallback's account
    assert record.route_source == "failover"
    assert record.route_host == f"127.0.0.1:{backup.port}"
    assert str(record.cost_usd) == "0.00420000"


def test_an_inactive_fallback_is_skipped_for_the_next_in_its_chain(
    credential_factory, alice, dead, backup
):
    last = credential_factory(title="Last", base_url=backup.base_url)
    retired = credential_factory(
        title="Retired", base_url=backup.base_url, fallback=last, is_active=False
    )
    primary = credential_factory(owner=alice, base_url=dead.base_url, fallback=retired)

    result = chat(primary, alice)

    assert result.route.credential_title == "Last"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, UpstreamError),
        (401, CredentialRejected),
        (403, CredentialRejected),
        (404, LLMError),
        (422, UpstreamError),
        (429, RateLimited),
    ],
)
def test_an_answer_from_the_primary_never_fails_over(
    status, kind, credential_factory, alice, start_upstream, backup
):
    primary_proxy = start_upstream()
    primary_proxy.respond(status=status)
    fallback = credential_factory(title="Backup", base_url=backup.base_url)
    primary = credential_factory(owner=alice, base_url=primary_proxy.base_url, fallback=fallback)

    with pytest.raises(kind):
        chat(primary, alice)

    assert backup.requests == []
    assert UsageRecord.objects.get().failed_over is False
    assert breakers.state(primary_proxy.base_url) == "closed"


def test_a_chain_of_three_dead_hops_ends_in_the_failover_route(
    settings, credential_factory, alice, start_upstream
):
    last_resort = start_upstream()
    settings.LLM_FAILOVER_BASE_URL = last_resort.base_url
    settings.LLM_FAILOVER_API_KEY = FAILOVER_KEY
    dead_urls = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(4)]
    hop3 = credential_factory(title="Hop 3", base_url=dead_urls[3])
    hop2 = credential_factory(title="Hop 2", base_url=dead_urls[2], fallback=hop3)
    hop1 = credential_factory(title="Hop 1", base_url=dead_urls[1], fallback=hop2)
    primary = credential_factory(owner=alice, base_url=dead_urls[0], fallback=hop1)

    result = chat(primary, alice)

    assert result.route.source == "failover"
    assert result.route.credential_id is None
    assert result.route.host == f"127.0.0.1:{last_resort.port}"
    assert result.route.failed_over_from.reason == "connection refused"
    assert last_resort.requests[0].authorization == f"Bearer {FAILOVER_KEY}"
    record = UsageRecord.objects.get()
    assert (record.failed_over, record.serving_credential_id) == (True, None)


def test_the_chain_stops_after_three_hops(credential_factory, alice, backup):
    dead_urls = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(4)]
    alive = credential_factory(title="Hop 4", base_url=backup.base_url)
    chain = alive
    for number in (3, 2, 1):
        chain = credential_factory(
            title=f"Hop {number}", base_url=dead_urls[number], fallback=chain
        )
    primary = credential_factory(title="Main", owner=alice, base_url=dead_urls[0], fallback=chain)

    with pytest.raises(ProxyUnreachable) as caught:
        chat(primary, alice)

    assert backup.requests == []
    message = caught.value.message
    assert message.startswith("Could not connect to the LLM proxy at ")
    assert "Its failover routes are down too: credential 'Hop 1'" in message
    assert "credential 'Hop 3'" in message
    assert "Hop 4" not in message


def test_a_fallback_loop_made_behind_the_admins_back_ends(credential_factory, alice, dead):
    first = credential_factory(title="First", owner=alice, base_url=dead.base_url)
    second = credential_factory(title="Second", base_url=f"http://127.0.0.1:{free_port()}/v1")
    # clean() refuses loops; an update() does not ask it.
    APIKeyCredentials.objects.filter(pk=first.pk).update(fallback=second)
    APIKeyCredentials.objects.filter(pk=second.pk).update(fallback=first)
    first.refresh_from_db()

    with pytest.raises(LLMError) as caught:
        chat(first, alice)

    assert "credential 'Second'" in caught.value.message


def test_a_failover_is_visible_in_the_api_and_its_header(pair, alice, dead, backup):
    primary, fallback = pair
    client = Client()
    client.force_login(alice)

    response = client.post(
        "/api/llm/chat",
        data=json.dumps({"credential": str(primary.pk), "model": "m", "messages": MESSAGES}),
        content_type="application/json",
    )

    assert response.status_code == 200, response.content
    assert response.json()["route"] == {
        "source": "failover",
        "host": f"127.0.0.1:{backup.port}",
        "credential": {"id": str(fallback.pk), "title": "Backup"},
        "failed_over_from": {
            "source": "credential",
            "host": f"127.0.0.1:{dead.port}",
            "credential": {"id": str(primary.pk), "title": "Main"},
            "reason": "connection dropped",
        },
    }
    assert response["X-Keyroute-Route"] == (
        f"source=failover; host=127.0.0.1:{backup.port}; credential={fallback.pk}; "
        f"from=127.0.0.1:{dead.port}"
    )
    assert FAKE_KEY not in response.content.decode()
    assert BACKUP_KEY not in response.content.decode()


# ---- streaming -------------------------------------------------------------------------


def stream_items(credential, user):
    async def run():
        items: list[Any] = []
        try:
            async for item in services.astream_chat(
                messages=MESSAGES, model="gpt-test-mini", credential=credential, user=user
            ):
                items.append(item)
        except LLMError as error:
            items.append(error)
        return items

    return async_to_sync(run)()


def test_a_stream_fails_over_before_its_first_chunk(pair, alice, backup):
    primary, _ = pair

    route, *pieces, result = stream_items(primary, alice)

    assert route.source == "failover"
    assert route.failed_over_from.credential_title == "Main"
    assert "".join(pieces) == "echo: hello there"
    assert result.route == route
    assert UsageRecord.objects.get().failed_over is True


def test_a_stream_dropped_after_its_first_chunk_is_an_error_not_a_switch(
    credential_factory, alice, start_upstream, backup
):
    flaky = start_upstream()
    flaky.respond(mode="drop-mid-stream")
    fallback = credential_factory(title="Backup", base_url=backup.base_url)
    primary = credential_factory(owner=alice, base_url=flaky.base_url, fallback=fallback)

    route, first, error = stream_items(primary, alice)

    assert route.source == "credential"
    assert first == "echo:"
    assert isinstance(error, UpstreamError)
    assert "closed the connection" in error.message
    assert backup.requests == []
    record = UsageRecord.objects.get()
    assert (record.outcome, record.failed_over) == ("UpstreamError", False)


# ---- the breaker -----------------------------------------------------------------------


def test_an_open_breaker_without_a_fallback_fails_fast_and_says_when_to_retry(
    credential_factory, alice, dead
):
    credential = credential_factory(owner=alice, base_url=dead.base_url)
    for _ in range(3):
        with pytest.raises(UpstreamError):
            chat(credential, alice)
    assert breakers.state(dead.base_url) == "open"
    knocks = dead.attempts

    errors = []
    for _ in range(5):
        with pytest.raises(LLMError) as caught:
            chat(credential, alice)
        errors.append(caught.value)

    # At most one try a second goes to the only route there is, to see if it is back.
    assert dead.attempts - knocks <= 1
    refused = [e for e in errors if e.fault == "circuit_open"]
    assert len(refused) >= 4
    assert refused[0].status == 503
    assert refused[0].retry_after is not None
    assert 25 <= refused[0].retry_after <= 30
    assert "is down for credential" in refused[0].message
    assert "check_llm_routes" in refused[0].message


def test_when_every_route_is_open_the_one_closing_first_is_tried(credential_factory, alice):
    with DeadPort() as first_dead, DeadPort() as second_dead:
        backup = credential_factory(title="Backup", base_url=second_dead.base_url)
        primary = credential_factory(
            title="Main", owner=alice, base_url=first_dead.base_url, fallback=backup
        )
        for _ in range(3):  # the backup's breaker opens first...
            with pytest.raises(LLMError):
                chat(backup, PLATFORM)
        time.sleep(0.05)
        for _ in range(3):  # ...then the primary's (its fallback is open: not tried)
            with pytest.raises(LLMError):
                chat(primary, alice)
        assert breakers.state(first_dead.base_url) == "open"
        assert breakers.open_until(second_dead.base_url) < breakers.open_until(first_dead.base_url)
        knocks = (first_dead.attempts, second_dead.attempts)

        with pytest.raises(LLMError) as caught:
            chat(primary, alice)

        assert (first_dead.attempts, second_dead.attempts) == (knocks[0], knocks[1] + 1)
        assert "credential 'Main'" in caught.value.message


def test_a_killed_proxy_under_load_is_left_alone_until_one_probe_brings_it_back(
    settings, private_cache, transactional_db, credential_factory, alice, backup
):
    """The issue's acceptance scenario, in one worker: calls keep succeeding through the
    fallback, the dead port hears nothing while the breaker is open, and after the
    cooldown one probe closes it and traffic returns."""
    settings.LLM_BREAKER_COOLDOWN_SECONDS = 2
    settings.LLM_USAGE_FLUSH_SECONDS = 0
    primary_proxy = Upstream().start()
    port = primary_proxy.port
    fallback = credential_factory(title="Backup", base_url=backup.base_url)
    primary = credential_factory(
        title="Main", owner=alice, base_url=primary_proxy.base_url, fallback=fallback
    )
    failures: list[BaseException] = []
    sources: list[str] = []

    async def caller(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                result = await services.achat(
                    messages=MESSAGES, model="m", credential=primary, user=alice
                )
                sources.append(result.route.source)
            except LLMError as error:
                failures.append(error)
            await asyncio.sleep(0.01)

    async def scenario() -> dict[str, Any]:
        stop = asyncio.Event()
        callers = [asyncio.create_task(caller(stop)) for _ in range(8)]
        await asyncio.sleep(0.3)
        served_before = len(primary_proxy.requests)
        await asyncio.to_thread(primary_proxy.stop)  # the proxy dies...
        dead = DeadPort(port)  # ...and its port hangs up on whoever knocks
        deadline = time.monotonic() + 5
        while breakers.state(primary_proxy.base_url) != "open":
            assert time.monotonic() < deadline, "the breaker never opened"
            await asyncio.sleep(0.01)
        opened_at = time.monotonic()
        knocks_when_open = dead.attempts
        await asyncio.sleep(1.5)  # within the 2 s cooldown
        knocks_while_open = dead.attempts - knocks_when_open
        failovers_while_open = sources.count("failover")
        await asyncio.to_thread(dead.close)
        revived = Upstream()
        await asyncio.to_thread(revived.start, port)  # the proxy is back
        revived.respond(delay=0.6)  # the probe takes a while: others keep failing over
        while not revived.requests:
            assert time.monotonic() < deadline + 5, "no probe came"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the probe is still being answered
        probes = len(revived.requests)
        while breakers.state(primary_proxy.base_url) != "closed":
            assert time.monotonic() < deadline + 5, "the breaker never closed"
            await asyncio.sleep(0.01)
        closed_after = time.monotonic() - opened_at
        sources.clear()
        await asyncio.sleep(0.8)
        stop.set()
        await asyncio.gather(*callers)
        await asyncio.to_thread(revived.stop)
        return {
            "served_before": served_before,
            "knocks_while_open": knocks_while_open,
            "failovers_while_open": failovers_while_open,
            "closed_after": closed_after,
            "probes": probes,
            "served_after": sources.count("credential"),
        }

    seen = async_to_sync(scenario)()

    assert seen["served_before"] > 0
    assert failures == []  # no user saw a failure
    assert seen["failovers_while_open"] > 0
    assert seen["knocks_while_open"] == 0
    assert 2 <= seen["closed_after"] < 4
    assert seen["probes"] == 1  # one half-open probe, while eight callers ran
    assert seen["served_after"] > 0
    records = UsageRecord.objects.filter(failed_over=True)
    assert records.exists()
    assert set(records.values_list("serving_credential_id", flat=True)) == {fallback.pk}


def test_the_api_ends_a_stream_dropped_midway_with_an_error_event(
    credential_factory, alice, start_upstream, backup
):
    flaky = start_upstream()
    flaky.respond(mode="drop-mid-stream")
    fallback = credential_factory(title="Backup", base_url=backup.base_url)
    primary = credential_factory(owner=alice, base_url=flaky.base_url, fallback=fallback)
    body = {"credential": str(primary.pk), "model": "m", "messages": MESSAGES, "stream": True}

    response, content = stream(alice, "/api/llm/chat", body)

    assert response.status_code == 200
    assert response["X-Keyroute-Route"].startswith("source=credential; ")
    received = events(content)
    assert received[0] == ("message", {"delta": "echo:"})
    name, data = received[-1]
    assert name == "error"
    assert data["error"]["type"] == "UpstreamError"
    assert "closed the connection" in data["error"]["message"]
    assert backup.requests == []


# ---- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "key", "named"),
    [
        ("http://failover.example/v1", "", "LLM_FAILOVER_API_KEY"),
        ("", FAILOVER_KEY, "LLM_FAILOVER_BASE_URL"),
    ],
)
def test_a_half_set_failover_route_is_a_warning_that_names_what_is_missing(
    settings, url, key, named
):
    settings.LLM_FAILOVER_BASE_URL, settings.LLM_FAILOVER_API_KEY = url, key

    (warning,) = [m for m in run_checks() if m.id == "llm.W001"]

    assert warning.msg.startswith(f"{named} is empty, so there is no failover route")
    assert FAILOVER_KEY not in warning.msg + str(warning.hint)


@pytest.mark.parametrize("both", [True, False])
def test_a_failover_route_set_whole_or_not_at_all_passes(settings, both):
    settings.LLM_FAILOVER_BASE_URL = "http://failover.example/v1" if both else ""
    settings.LLM_FAILOVER_API_KEY = FAILOVER_KEY if both else ""

    assert [m for m in run_checks() if m.id == "llm.W001"] == []


def test_an_answer_to_a_call_sent_before_the_breaker_opened_does_not_close_it(
    transactional_db, private_cache, credential_factory, alice, start_upstream, backup
):
    """Long completions are nearly always in flight: if their answers closed an open
    breaker, a proxy whose gateway answers 502 to new calls would never be left alone."""
    proxy = start_upstream()
    fallback = credential_factory(title="Backup", base_url=backup.base_url)
    primary = credential_factory(owner=alice, base_url=proxy.base_url, fallback=fallback)

    async def scenario() -> tuple[list[str], str, list[str], int]:
        proxy.respond(delay=1.0)
        slow = [
            asyncio.create_task(
                services.achat(messages=MESSAGES, model="m", credential=primary, user=alice)
            )
            for _ in range(5)
        ]
        await asyncio.sleep(0.3)  # on their way
        proxy.respond(status=502)  # the gateway now turns new calls away
        for _ in range(3):
            await services.achat(messages=MESSAGES, model="m", credential=primary, user=alice)
        opened = breakers.state(proxy.base_url)
        answered = [result.route.source for result in await asyncio.gather(*slow)]
        after = len(proxy.requests)
        later = []
        for _ in range(3):
            result = await services.achat(
                messages=MESSAGES, model="m", credential=primary, user=alice
            )
            passed = result.route.failed_over_from
            later.append(passed.reason if passed else result.route.source)
        return answered, opened, later, len(proxy.requests) - after

    answered, opened, later, knocks = async_to_sync(scenario)()

    assert answered == ["credential"] * 5
    assert opened == "open"
    assert breakers.state(proxy.base_url) == "open"
    assert later == ["circuit breaker open"] * 3
    assert knocks == 0


def test_the_shared_state_read_before_this_process_wrote_its_failure_keeps_the_breaker_open(
    private_cache, settings
):
    """The breaker thread re-reads the shared state once a second. A read that falls
    between the failure that opens the breaker here and the thread's write of it finds
    the cache still closed: the breaker must stay open (CI once saw it close at once)."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    refused = ProxyUnreachable("Connection refused.", fault="refused")

    for _ in range(settings.LLM_BREAKER_FAILURES):
        breakers.done(Ticket(url), refused)
        breakers._refresh()  # the thread's read, at the worst moment it can come
        # (the test's thread holds the GIL, so the thread has seldom written by now)

    assert breakers.state(url) == "open"
    deadline = time.monotonic() + 5
    while breakers.status(url).state != "open":  # then written, for the other workers
        assert time.monotonic() < deadline, "the open breaker never reached the cache"
        time.sleep(0.02)
    breakers._refresh()
    assert breakers.state(url) == "open"


def test_with_the_breaker_off_every_call_tries_the_proxy_and_nothing_says_open(
    settings, credential_factory, alice, dead, caplog
):
    settings.LLM_BREAKER_FAILURES = 0
    credential = credential_factory(owner=alice, base_url=dead.base_url)

    for _ in range(5):
        with pytest.raises(UpstreamError):
            chat(credential, alice)

    assert dead.attempts == 5
    assert breakers.state(dead.base_url) == "closed"
    assert "circuit breaker" not in caplog.text
