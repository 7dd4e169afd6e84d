"""Where a call goes and with which key: credentials, the global and internal defaults.

Every call here reaches a real OpenAI-compatible server on loopback (tests/upstream.py),
which records the path, the Authorization header and the JSON body it was sent.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from credentials.models import PLATFORM, APIKeyCredentials
from llm import usage
from llm.errors import LLMError
from llm.models import UsageRecord
from llm.routes import Route, resolve_route
from llm.services import CODE_INSTRUCTIONS, chat, embed, generate_code
from tests.conftest import FAKE_KEY, GLOBAL_KEY, run_manage, subprocess_env

KEY_A = "sk-test-fake-route-aaaa-1111"
KEY_B = "sk-test-fake-route-bbbb-2222"
PUBLIC_KEY = "sk-test-fake-public-3333"
INTERNAL_KEY = "sk-test-fake-internal-4444"
MODEL = "gpt-test-mini"
HELLO = [{"role": "user", "content": "hello there"}]


def bearer(key: str) -> str:
    return f"Bearer {key}"


@pytest.fixture
def two_defaults(settings, start_upstream):
    """The public default on one server and the internal default on another."""
    public, internal = start_upstream(), start_upstream()
    settings.OPENAI_BASE_URL = public.base_url
    settings.OPENAI_API_KEY = PUBLIC_KEY
    settings.OPENAI_INTERNAL_BASE_URL = internal.base_url
    settings.OPENAI_INTERNAL_API_KEY = INTERNAL_KEY
    return public, internal


# ---- credentials with their own base URL ----------------------------------------------


def test_it_sends_each_credential_to_its_own_server_with_its_own_key(
    credential_factory, start_upstream
):
    server_a, server_b = start_upstream(), start_upstream()
    first = credential_factory(title="A", base_url=server_a.base_url, api_key=KEY_A)
    second = credential_factory(title="B", base_url=server_b.base_url, api_key=KEY_B)

    chat(
        messages=[{"role": "user", "content": "to a"}], model=MODEL, credential=first, user=PLATFORM
    )
    chat(
        messages=[{"role": "user", "content": "to b"}],
        model=MODEL,
        credential=second,
        user=PLATFORM,
    )
    chat(
        messages=[{"role": "user", "content": "to a again"}],
        model=MODEL,
        credential=first,
        user=PLATFORM,
    )

    assert [r.body["messages"][0]["content"] for r in server_a.requests] == ["to a", "to a again"]
    assert [r.body["messages"][0]["content"] for r in server_b.requests] == ["to b"]
    assert {r.authorization for r in server_a.requests} == {bearer(KEY_A)}
    assert {r.authorization for r in server_b.requests} == {bearer(KEY_B)}
    assert {r.path for r in server_a.requests + server_b.requests} == {"/v1/chat/completions"}


# ---- credentials without a base URL ---------------------------------------------------


def test_it_sends_a_credential_without_base_url_to_the_global_default_with_its_own_key(
    credential_factory, two_defaults
):
    public, internal = two_defaults
    credential = credential_factory(base_url="", api_key=KEY_A)

    result = chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)

    assert result.text == "echo: hello there"
    assert [r.authorization for r in public.requests] == [bearer(KEY_A)]
    assert internal.requests == []
    assert result.route.source == "credential"
    assert result.route.host == f"127.0.0.1:{public.port}"


def test_it_sends_embeddings_of_a_credential_without_base_url_to_the_internal_default(
    credential_factory, two_defaults
):
    public, internal = two_defaults
    credential = credential_factory(base_url="", api_key=KEY_A)

    result = embed(texts=["one"], model="embed-test", credential=credential, user=PLATFORM)

    assert [(r.path, r.authorization) for r in internal.requests] == [
        ("/v1/embeddings", bearer(KEY_A))
    ]
    assert public.requests == []
    assert result.route.host == f"127.0.0.1:{internal.port}"


def test_it_never_sends_the_global_key_when_a_credential_was_chosen(
    credential_factory, global_route
):
    credential = credential_factory(base_url="", api_key=KEY_B)

    chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)
    embed(texts=["one"], model="embed-test", credential=credential, user=PLATFORM)

    assert [r.authorization for r in global_route.requests] == [bearer(KEY_B)] * 2
    assert all(GLOBAL_KEY not in json.dumps(r.headers) for r in global_route.requests)


# ---- no credential: the defaults ------------------------------------------------------


def test_it_sends_chat_and_code_without_credential_to_openai_base_url_with_openai_api_key(
    db, two_defaults
):
    public, internal = two_defaults

    chat(messages=HELLO, model=MODEL)
    generate_code(prompt="fizzbuzz", model=MODEL)

    assert [(r.path, r.authorization) for r in public.requests] == [
        ("/v1/chat/completions", bearer(PUBLIC_KEY)),
        ("/v1/chat/completions", bearer(PUBLIC_KEY)),
    ]
    assert internal.requests == []


def test_it_sends_embeddings_without_credential_to_the_internal_url_with_the_internal_key(
    db, two_defaults
):
    public, internal = two_defaults

    result = embed(texts=["one", "two"], model="embed-test")

    assert [(r.path, r.authorization) for r in internal.requests] == [
        ("/v1/embeddings", bearer(INTERNAL_KEY))
    ]
    assert public.requests == []
    assert result.route.source == "internal"


def test_it_sends_embeddings_to_the_public_server_when_internal_equals_public(
    db, settings, upstream
):
    settings.OPENAI_BASE_URL = settings.OPENAI_INTERNAL_BASE_URL = upstream.base_url
    settings.OPENAI_API_KEY = settings.OPENAI_INTERNAL_API_KEY = PUBLIC_KEY

    result = embed(texts=["one"], model="embed-test")

    assert [(r.path, r.authorization) for r in upstream.requests] == [
        ("/v1/embeddings", bearer(PUBLIC_KEY))
    ]
    assert result.route.host == f"127.0.0.1:{upstream.port}"


def test_it_makes_the_internal_defaults_follow_the_public_ones_when_unset():
    code = (
        "import json; from django.conf import settings; print(json.dumps([settings.OPENAI_BASE_URL,"
        " settings.OPENAI_API_KEY, settings.OPENAI_INTERNAL_BASE_URL,"
        " settings.OPENAI_INTERNAL_API_KEY]))"
    )
    env = subprocess_env(OPENAI_BASE_URL="http://litellm:4000/v1", OPENAI_API_KEY=FAKE_KEY)

    result = run_manage("shell", "-c", code, env=env)

    assert result.returncode == 0, result.stderr
    public_url, public_key, internal_url, internal_key = json.loads(
        result.stdout.strip().splitlines()[-1]
    )
    assert (public_url, public_key) == ("http://litellm:4000/v1", FAKE_KEY)
    assert (internal_url, internal_key) == (public_url, public_key)


# ---- resolve_route --------------------------------------------------------------------


def test_it_resolves_a_credential_route(credential_factory, upstream):
    credential = credential_factory(title="Team", base_url=upstream.base_url, api_key=KEY_A)

    route = resolve_route("chat", credential, user=PLATFORM)

    assert isinstance(route, Route)
    assert route.source == "credential"
    assert route.credential_id == credential.pk
    assert route.credential_title == "Team"
    assert route.base_url == upstream.base_url
    assert route.api_key.get_secret_value() == KEY_A
    assert route.host == f"127.0.0.1:{upstream.port}"
    assert KEY_A not in repr(route)
    assert KEY_A not in str(route)


def test_it_resolves_the_global_and_internal_routes(db, two_defaults):
    public, internal = two_defaults

    chat_route = resolve_route("chat", user=None)
    code_route = resolve_route("code", user=None)
    embeddings_route = resolve_route("embeddings", user=None)

    assert (chat_route.source, chat_route.host) == ("global", f"127.0.0.1:{public.port}")
    assert (code_route.source, code_route.host) == ("global", f"127.0.0.1:{public.port}")
    assert (embeddings_route.source, embeddings_route.host) == (
        "internal",
        f"127.0.0.1:{internal.port}",
    )
    assert chat_route.credential_id is None
    assert embeddings_route.credential_id is None
    assert PUBLIC_KEY not in repr(chat_route)
    assert INTERNAL_KEY not in repr(embeddings_route)


def test_it_returns_a_frozen_route(db, two_defaults):
    route = resolve_route("chat", user=None)

    with pytest.raises(dataclasses.FrozenInstanceError):
        route.base_url = "http://elsewhere:4000/v1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.credential_id = uuid.uuid4()  # type: ignore[misc]


# ---- results --------------------------------------------------------------------------


def test_it_returns_the_chat_text_model_usage_and_route(credential_factory, upstream):
    credential = credential_factory(base_url=upstream.base_url, api_key=KEY_A)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "say hi twice"},
    ]

    result = chat(messages=messages, model="gpt-test-large", credential=credential, user=PLATFORM)

    assert result.text == "echo: say hi twice"
    assert result.model == "gpt-test-large"
    # The server counts words: 2 + 3 in, 4 out.
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 4)
    assert result.usage.total_tokens == 9
    assert dataclasses.asdict(result.route) == {
        "source": "credential",
        "host": f"127.0.0.1:{upstream.port}",
        "credential_id": str(credential.pk),
        "credential_title": credential.title,
        "failed_over_from": None,
    }
    assert result.cost_usd is None
    assert KEY_A not in repr(result)
    assert upstream.requests[0].body["messages"] == messages


def test_it_returns_embeddings_in_input_order(credential_factory, upstream):
    credential = credential_factory(base_url=upstream.base_url, api_key=KEY_A)
    texts = ["a", "three", "twelve chars"]

    result = embed(texts=texts, model="embed-test", credential=credential, user=PLATFORM)

    # The server's vector for text i is [len(text), i, 0.5].
    assert result.vectors == [[1.0, 0.0, 0.5], [5.0, 1.0, 0.5], [12.0, 2.0, 0.5]]
    assert result.model == "embed-test"
    assert result.usage.prompt_tokens == 4
    assert dataclasses.asdict(result.route) == {
        "source": "credential",
        "host": f"127.0.0.1:{upstream.port}",
        "credential_id": str(credential.pk),
        "credential_title": credential.title,
        "failed_over_from": None,
    }
    assert upstream.requests[0].body["input"] == texts


def test_it_sends_generate_code_as_a_system_message_and_the_prompt(credential_factory, upstream):
    credential = credential_factory(base_url=upstream.base_url, api_key=KEY_A)

    result = generate_code(
        prompt="write fizzbuzz", model=MODEL, credential=credential, user=PLATFORM
    )

    assert upstream.requests[0].body["messages"] == [
        {"role": "system", "content": CODE_INSTRUCTIONS},
        {"role": "user", "content": "write fizzbuzz"},
    ]
    assert CODE_INSTRUCTIONS.strip()
    assert result.text == "echo: write fizzbuzz"
    assert result.model == MODEL
    assert result.usage.prompt_tokens == len(CODE_INSTRUCTIONS.split()) + 2


def test_it_passes_options_to_the_upstream(credential_factory, upstream):
    credential = credential_factory(base_url=upstream.base_url, api_key=KEY_A)

    chat(
        messages=HELLO,
        model=MODEL,
        credential=credential,
        temperature=0.2,
        max_tokens=5,
        user=PLATFORM,
    )
    generate_code(
        prompt="x", model=MODEL, credential=credential, temperature=0.0, top_p=0.5, user=PLATFORM
    )

    chat_body, code_body = (r.body for r in upstream.requests)
    assert (chat_body["temperature"], chat_body["max_tokens"]) == (0.2, 5)
    assert (code_body["temperature"], code_body["top_p"]) == (0.0, 0.5)
    assert chat_body["model"] == MODEL


def test_it_reports_the_cost_the_proxy_sends(credential_factory, start_upstream):
    server = start_upstream(cost="0.00042")
    credential = credential_factory(base_url=server.base_url, api_key=KEY_A)

    result = chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)

    assert result.cost_usd == 0.00042


# ---- last_used_at ---------------------------------------------------------------------


def test_it_records_when_a_credential_was_last_used(credential_factory, upstream):
    credential = credential_factory(base_url=upstream.base_url, api_key=KEY_A)
    assert APIKeyCredentials.objects.get(pk=credential.pk).last_used_at is None

    chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)

    assert APIKeyCredentials.objects.get(pk=credential.pk).last_used_at is not None


def test_a_failed_call_does_not_count_as_a_use(credential_factory, upstream):
    credential = credential_factory(base_url=upstream.base_url, api_key=KEY_A)
    upstream.respond(status=500)

    with pytest.raises(LLMError):
        chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)

    assert APIKeyCredentials.objects.get(pk=credential.pk).last_used_at is None


def test_calls_write_nothing_and_each_flush_writes_last_used_at_once(
    transactional_db, credential_factory, upstream, settings, monkeypatch
):
    settings.LLM_USAGE_FLUSH_SECONDS = 3600
    # A buffer of the test's own, whose flusher thread sleeps: the test flushes by hand.
    monkeypatch.setattr(usage, "_buffer", usage.UsageBuffer(maxsize=100, interval=3600))
    credential = credential_factory(base_url=upstream.base_url, api_key=KEY_A)

    with CaptureQueriesContext(connection) as during_calls:
        for _ in range(21):
            chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)
    with CaptureQueriesContext(connection) as flushing:
        assert usage.flush() == 21

    assert len(upstream.requests) == 21
    # The calls write nothing; the first reads the price table (the answers carry no cost).
    reads = [q["sql"] for q in during_calls if q["sql"].lstrip().upper().startswith("SELECT")]
    assert len(reads) == len(during_calls) <= 1
    assert all("llm_modelprice" in sql for sql in reads)
    updates = [q["sql"] for q in flushing if q["sql"].lstrip().upper().startswith("UPDATE")]
    assert len(updates) == 1
    assert APIKeyCredentials._meta.db_table in updates[0]
    assert UsageRecord.objects.filter(credential=credential, outcome="ok").count() == 21
    last = APIKeyCredentials.objects.get(pk=credential.pk).last_used_at
    assert last == UsageRecord.objects.filter(credential=credential).latest("created_at").created_at
