"""Usage records: one per call, successful or not, with what it cost and never the key.

The calls reach real loopback servers; `Upstream(cost=...)` sends the LiteLLM cost header.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core import serializers
from django.test import AsyncClient
from django.utils import timezone

import llm.usage
from credentials.models import PLATFORM
from llm import services
from llm.errors import CredentialUnavailable, LLMError
from llm.models import UsageRecord
from llm.usage import UsageBuffer
from tests.conftest import (
    FAKE_KEY,
    GLOBAL_KEY,
    database_url,
    run_manage,
    signed_in,
    subprocess_env,
)
from tests.upstream import free_port

MODEL = "gpt-test-mini"
HELLO = [{"role": "user", "content": "hello there"}]
# The loopback upstream counts words: "hello there" in, "echo: hello there" out.
HELLO_TOKENS = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
NO_TOKENS = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def host(upstream) -> str:
    return f"127.0.0.1:{upstream.port}"


def the_record() -> UsageRecord:
    records = list(UsageRecord.objects.all())
    assert len(records) == 1, [str(r) for r in records]
    return records[0]


def assert_record(record: UsageRecord, **expected: Any) -> None:
    actual = {name: getattr(record, name) for name in expected}
    assert actual == expected
    assert record.latency_ms > 0
    assert record.failed_over is False


def run_async(call):
    """Run an async service on its own loop, as a command would."""

    async def main():
        return await call()

    return async_to_sync(main)()


def assert_no_key_in_any_record() -> None:
    dumped = serializers.serialize("json", UsageRecord.objects.all())
    assert json.loads(dumped)  # something was serialized
    assert FAKE_KEY not in dumped
    assert GLOBAL_KEY not in dumped


# ---- successes -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_chat_is_recorded_with_tokens_and_cost(credential, costly, alice, mode):
    call(mode, "chat", messages=HELLO, model=MODEL, credential=credential, user=alice)

    assert_record(
        the_record(),
        credential=credential,
        user=alice,
        purpose="chat",
        model=MODEL,
        route_source="credential",
        route_host=host(costly),
        cost_usd=Decimal("0.0042"),
        outcome="ok",
        **HELLO_TOKENS,
    )
    assert_no_key_in_any_record()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_code_is_recorded_as_code(credential, costly, alice, mode):
    kwargs = {"prompt": "fizz buzz", "model": MODEL, "credential": credential, "user": alice}
    call(mode, "generate_code", **kwargs)

    record = the_record()
    sent_words = sum(len(m["content"].split()) for m in costly.requests[0].body["messages"])
    assert_record(
        record,
        purpose="code",
        credential=credential,
        user=alice,
        outcome="ok",
        cost_usd=Decimal("0.0042"),
        prompt_tokens=sent_words,
        completion_tokens=3,
        total_tokens=sent_words + 3,
    )


def test_a_chat_without_a_cost_header_records_no_cost(credential_factory, upstream, alice):
    credential = credential_factory(owner=alice, base_url=upstream.base_url)

    services.chat(messages=HELLO, model=MODEL, credential=credential, user=alice)

    assert_record(the_record(), cost_usd=None, outcome="ok", **HELLO_TOKENS)


@pytest.mark.parametrize("header", ["nan", "inf", "-0.5", "free", "1e999"])
def test_a_cost_header_that_is_not_a_price_records_no_cost(
    credential_factory, start_upstream, alice, header
):
    odd = start_upstream(cost=header)
    credential = credential_factory(owner=alice, base_url=odd.base_url)

    result = services.chat(messages=HELLO, model=MODEL, credential=credential, user=alice)

    assert result.cost_usd is None
    assert_record(the_record(), cost_usd=None, outcome="ok", **HELLO_TOKENS)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_embeddings_through_the_internal_default_are_recorded(global_route, alice, mode):
    texts = ["one two", "three"]
    call(mode, "embed", texts=texts, model="embed-test", user=alice)

    assert_record(
        the_record(),
        credential=None,
        user=alice,
        purpose="embeddings",
        model="embed-test",
        route_source="internal",
        route_host=host(global_route),
        prompt_tokens=3,
        completion_tokens=0,
        total_tokens=3,
        cost_usd=None,
        outcome="ok",
    )
    assert_no_key_in_any_record()


def test_embeddings_record_the_cost_the_proxy_reported(credential, alice):
    services.embed(texts=["hi"], model="embed-test", credential=credential, user=alice)

    assert the_record().cost_usd == Decimal("0.0042")


def test_a_platform_call_records_no_user(credential):
    services.chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)

    assert_record(the_record(), user=None, credential=credential, outcome="ok")


def test_a_call_for_nobody_may_not_use_a_credential_and_is_recorded(credential, costly):
    error = fail(lambda: services.chat(messages=HELLO, model=MODEL, credential=credential))

    assert isinstance(error, CredentialUnavailable)
    assert error.status == 404
    assert costly.requests == []
    assert_record(the_record(), user=None, credential=credential, outcome="CredentialUnavailable")


# ---- failures --------------------------------------------------------------------------


def call(mode: str, service: str, **kwargs):
    """services.<service>(...) in "sync" mode, services.a<service>(...) in "async" mode."""
    if mode == "sync":
        return getattr(services, service)(**kwargs)
    return run_async(lambda: getattr(services, f"a{service}")(**kwargs))


def fail(call) -> LLMError:
    with pytest.raises(LLMError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rejected_key_is_recorded(credential, costly, alice, mode):
    costly.respond(status=401, body={"error": {"message": f"bad key {FAKE_KEY}"}})
    fail(lambda: call(mode, "chat", messages=HELLO, model=MODEL, credential=credential, user=alice))

    assert_record(
        the_record(),
        credential=credential,
        user=alice,
        purpose="chat",
        model=MODEL,
        route_source="credential",
        route_host=host(costly),
        cost_usd=None,
        outcome="CredentialRejected",
        **NO_TOKENS,
    )
    assert_no_key_in_any_record()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_unreachable_proxy_is_recorded(credential_factory, alice, mode):
    closed = f"127.0.0.1:{free_port()}"
    credential = credential_factory(owner=alice, base_url=f"http://{closed}/v1")
    fail(lambda: call(mode, "embed", texts=["x"], model="e", credential=credential, user=alice))

    assert_record(
        the_record(),
        credential=credential,
        purpose="embeddings",
        route_source="credential",
        route_host=closed,
        outcome="ProxyUnreachable",
        **NO_TOKENS,
    )


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_inactive_credential_is_recorded_without_a_route(
    credential_factory, costly, alice, mode
):
    credential = credential_factory(owner=alice, base_url=costly.base_url, is_active=False)
    fail(lambda: call(mode, "chat", messages=HELLO, model=MODEL, credential=credential, user=alice))

    assert_record(
        the_record(),
        credential=credential,
        user=alice,
        route_source="",
        route_host="",
        outcome="CredentialUnavailable",
        cost_usd=None,
        **NO_TOKENS,
    )
    assert costly.requests == []


def test_a_missing_global_key_is_recorded(settings, upstream, alice):
    settings.OPENAI_BASE_URL = upstream.base_url
    settings.OPENAI_API_KEY = ""

    fail(lambda: services.generate_code(prompt="x", model=MODEL, user=alice))

    assert_record(
        the_record(),
        credential=None,
        purpose="code",
        route_source="",
        outcome="CredentialUnavailable",
    )


# ---- through the API -------------------------------------------------------------------


def post_json(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def test_the_api_records_each_call_with_its_user(client, alice, credential, costly):
    client.force_login(alice)
    body = {"credential": str(credential.pk), "model": MODEL, "messages": HELLO}

    assert post_json(client, "/api/llm/chat", body).status_code == 200
    costly.respond(status=429, headers={"Retry-After": "7"})
    assert post_json(client, "/api/llm/chat", body).status_code == 429

    ok, limited = UsageRecord.objects.order_by("created_at", "id")
    assert_record(
        ok,
        credential=credential,
        user=alice,
        purpose="chat",
        route_source="credential",
        outcome="ok",
        cost_usd=Decimal("0.0042"),
        **HELLO_TOKENS,
    )
    assert_record(limited, credential=credential, user=alice, outcome="RateLimited", **NO_TOKENS)
    assert_no_key_in_any_record()


def test_a_streamed_chat_is_recorded_with_the_final_chunks_usage(alice, credential, costly):
    body = {
        "credential": str(credential.pk),
        "model": MODEL,
        "messages": [{"role": "user", "content": "one two three four"}],
        "stream": True,
    }

    async def main():
        async_client = AsyncClient()
        await async_client.aforce_login(alice)
        response: Any = await async_client.post(
            "/api/llm/chat", data=json.dumps(body), content_type="application/json"
        )
        return response, b"".join([c async for c in response.streaming_content])

    response, content = async_to_sync(main)()

    assert response.status_code == 200
    assert b"event: done" in content
    assert_record(
        the_record(),
        credential=credential,
        user=alice,
        purpose="chat",
        model=MODEL,
        route_source="credential",
        route_host=host(costly),
        prompt_tokens=4,
        completion_tokens=5,
        total_tokens=9,
        cost_usd=Decimal("0.0042"),
        outcome="ok",
    )
    assert_no_key_in_any_record()


def test_the_playground_records_its_calls(client, alice, credential, global_route):
    client.force_login(alice)
    body = {"credential": str(credential.pk), "purpose": "code", "model": MODEL, "prompt": "x"}
    assert post_json(client, "/llm/send", body).status_code == 200
    body = {"purpose": "embeddings", "model": "embed-test", "prompt": "a b"}
    assert post_json(client, "/llm/send", body).status_code == 200

    code, embeddings = UsageRecord.objects.order_by("created_at", "id")
    assert_record(code, purpose="code", credential=credential, user=alice, outcome="ok")
    assert_record(
        embeddings,
        purpose="embeddings",
        credential=None,
        user=alice,
        route_source="internal",
        total_tokens=2,
        outcome="ok",
    )
    assert_no_key_in_any_record()


# ---- the buffer ------------------------------------------------------------------------


def test_a_full_buffer_drops_the_oldest_and_says_so(transactional_db, caplog):
    buffer = UsageBuffer(maxsize=3, interval=60)
    for number in range(5):
        buffer.add({"purpose": "chat", "model": "m", "latency_ms": float(number)})

    assert len(buffer) == 3
    assert buffer.dropped == 2
    assert not UsageRecord.objects.exists()

    with caplog.at_level(logging.WARNING, logger="llm.usage"):
        assert buffer.flush() == 3

    assert sorted(UsageRecord.objects.values_list("latency_ms", flat=True)) == [2, 3, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["Usage buffer full: 2 usage records were dropped."]
    assert len(buffer) == 0
    assert buffer.dropped == 0
    assert buffer.flush() == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_buffered_records_are_written_on_flush(
    transactional_db, settings, credential, costly, alice, mode
):
    settings.LLM_USAGE_FLUSH_SECONDS = 5
    before = timezone.now()
    # The process's flusher thread must not write the record while the test looks: hold
    # its flush lock until the "nothing written yet" check is done.
    with llm.usage._buffer._flush_lock:
        call(mode, "chat", messages=HELLO, model=MODEL, credential=credential, user=alice)
        assert not UsageRecord.objects.exists()

    llm.usage.flush()

    record = the_record()
    assert_record(
        record,
        credential=credential,
        user=alice,
        purpose="chat",
        model=MODEL,
        route_source="credential",
        route_host=host(costly),
        cost_usd=Decimal("0.0042"),
        outcome="ok",
        **HELLO_TOKENS,
    )
    assert before <= record.created_at <= timezone.now()
    assert_no_key_in_any_record()


def test_a_normal_exit_writes_what_the_buffer_holds(transactional_db):
    # A process that buffers records (flush far away) and exits normally (a management
    # command, a WSGI server's worker): the records are written at exit, not lost.
    script = (
        "from llm import usage\n"
        "for n in range(3): usage.record(purpose='chat', model=f'exit-{n}', latency_ms=1.0)\n"
    )
    env = subprocess_env(DATABASE_URL=database_url(), LLM_USAGE_FLUSH_SECONDS="600")

    result = run_manage("shell", "-c", script, env=env)

    assert result.returncode == 0, result.stderr
    models = set(UsageRecord.objects.values_list("model", flat=True))
    assert models == {"exit-0", "exit-1", "exit-2"}


def test_a_uvicorn_worker_stopped_by_sigterm_writes_what_the_buffer_holds(
    start_site, django_user_model, credential_factory, costly
):
    # uvicorn ends a worker with the very signal that stopped it, after its graceful
    # shutdown: atexit never runs there. The lifespan's shutdown writes the buffer.
    alice = django_user_model.objects.create_user("alice")
    credential = credential_factory(owner=alice, base_url=costly.base_url)
    site = start_site(LLM_USAGE_FLUSH_SECONDS="600")
    body = {"credential": str(credential.pk), "model": "sigterm-test", "messages": HELLO}

    answer = site.request("POST", "/api/llm/chat", headers=signed_in(alice), body=body)
    assert answer.status == 200, answer.content
    assert not UsageRecord.objects.exists()  # buffered, the next flush is minutes away

    site.process.terminate()
    site.process.wait(15)

    record = UsageRecord.objects.get()
    assert (record.model, record.credential_id, record.cost_usd) == (
        "sigterm-test",
        credential.pk,
        Decimal("0.0042"),
    )
