"""Calls through the real LiteLLM Proxy: each credential is one of its virtual keys.

The proxy runs deploy/litellm/config.yaml: key A may use only the proxy's own mock model,
key B only the chat model it forwards (priced) to the loopback upstream, the internal key
only the embedding model. The site's services and views sit in front, as in production.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync

from llm import services
from llm.errors import CredentialRejected, ModelNotAllowed
from llm.models import UsageRecord
from tests.litellm.proxy import (
    CHAT_MODEL,
    CHAT_PRICE,
    EMBEDDING_MODEL,
    KEY_A,
    KEY_B,
    KEY_INTERNAL,
    MOCK_ANSWER,
    MOCK_MODEL,
    UPSTREAM_KEY,
)
from tests.llm.test_api import events, post_json, stream

MESSAGES = [{"role": "user", "content": "one two three four"}]
UNKNOWN_KEY = "sk-test-fake-virtual-unknown-4444"
VIRTUAL_KEYS = (KEY_A, KEY_B, KEY_INTERNAL, UNKNOWN_KEY)


def no_virtual_key_in(text: str) -> None:
    for key in VIRTUAL_KEYS:
        assert key not in text


def test_a_credential_without_v1_reaches_the_proxys_own_model(proxy, credential_factory, alice):
    proxy.require_own("key A and the mock model")
    team_a = credential_factory(title="Team A", owner=alice, api_key=KEY_A, base_url=proxy.root)

    result = services.chat(messages=MESSAGES, model=MOCK_MODEL, credential=team_a, user=alice)

    assert result.text == MOCK_ANSWER
    assert result.route.source == "credential"
    assert result.route.credential_id == str(team_a.pk)
    assert proxy.upstream is not None
    assert proxy.upstream.requests == []  # the proxy answered itself


def test_a_credential_with_v1_reaches_the_forwarded_model_with_the_proxys_upstream_key(
    proxy, credential_factory, alice
):
    _, upstream = proxy.require_own("key B and the forwarded model")
    team_b = credential_factory(title="Team B", owner=alice, api_key=KEY_B, base_url=proxy.base_url)

    result = services.chat(messages=MESSAGES, model=CHAT_MODEL, credential=team_b, user=alice)

    assert result.text == "echo: one two three four"
    (sent,) = upstream.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.authorization == f"Bearer {UPSTREAM_KEY}"
    assert KEY_B not in json.dumps(sent.headers)
    assert KEY_B not in json.dumps(sent.body)


def test_a_key_asking_for_a_model_it_may_not_use_gets_the_proxys_refusal(
    proxy, credential_factory, alice, api
):
    _, upstream = proxy.require_own("key A, which may not use the forwarded model")
    team_a = credential_factory(title="Team A", owner=alice, api_key=KEY_A, base_url=proxy.root)

    with pytest.raises(ModelNotAllowed) as refused:
        services.chat(messages=MESSAGES, model=CHAT_MODEL, credential=team_a, user=alice)
    response = post_json(
        api,
        "/api/llm/chat",
        {"credential": str(team_a.pk), "model": CHAT_MODEL, "messages": MESSAGES},
    )

    sentence = str(refused.value)
    assert sentence.startswith(
        f"The LLM proxy at 127.0.0.1:{proxy.own.port} does not let credential 'Team A' use "
        f"the model '{CHAT_MODEL}' (403): its key may use other models only."
    )
    assert response.status_code == 403
    assert response.json()["error"] == {"type": "ModelNotAllowed", "message": sentence}
    assert upstream.requests == []  # refused by the proxy, never forwarded
    no_virtual_key_in(response.content.decode())


def test_an_unknown_virtual_key_is_rejected_naming_the_credential(
    proxy, credential_factory, alice, api
):
    stranger = credential_factory(
        title="Stale key", owner=alice, api_key=UNKNOWN_KEY, base_url=proxy.base_url
    )

    with pytest.raises(CredentialRejected) as rejected:
        services.chat(messages=MESSAGES, model=proxy.model, credential=stranger, user=alice)
    response = post_json(
        api,
        "/api/llm/chat",
        {"credential": str(stranger.pk), "model": proxy.model, "messages": MESSAGES},
    )

    sentence = str(rejected.value)
    assert "rejected the key of credential 'Stale key' (401)" in sentence
    assert "Enter the right key in the admin." in sentence
    assert response.status_code == 403
    assert response.json()["error"] == {"type": "CredentialRejected", "message": sentence}
    no_virtual_key_in(sentence + response.content.decode())
    assert UNKNOWN_KEY[-4:] not in sentence  # LiteLLM's own words may quote a key's end


def test_embeddings_without_a_credential_take_the_internal_route(proxy, settings, alice):
    _, upstream = proxy.require_own("the internal key and the embedding model")
    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"  # user-facing calls: not this test's
    settings.OPENAI_API_KEY = KEY_A
    settings.OPENAI_INTERNAL_BASE_URL = proxy.base_url
    settings.OPENAI_INTERNAL_API_KEY = KEY_INTERNAL

    result = services.embed(texts=["a b c", "d e"], model=EMBEDDING_MODEL, user=alice)

    assert result.vectors == [[5.0, 0.0, 0.5], [3.0, 1.0, 0.5]]
    assert result.route.source == "internal"
    assert result.route.host == f"127.0.0.1:{proxy.own.port}"
    (sent,) = upstream.requests
    assert sent.path == "/v1/embeddings"
    assert sent.authorization == f"Bearer {UPSTREAM_KEY}"
    record = UsageRecord.objects.get()
    assert (record.purpose, record.route_source, record.prompt_tokens) == (
        "embeddings",
        "internal",
        5,
    )


def test_a_forwarded_call_is_recorded_with_the_proxys_cost_and_the_tokens(
    proxy, credential_factory, alice, api
):
    proxy.require_own("the priced forwarded model")
    team_b = credential_factory(title="Team B", owner=alice, api_key=KEY_B, base_url=proxy.base_url)

    response = post_json(
        api,
        "/api/llm/chat",
        {"credential": str(team_b.pk), "model": CHAT_MODEL, "messages": MESSAGES},
    )

    assert response.status_code == 200
    record = UsageRecord.objects.get()
    # The upstream counts words: 4 in, "echo: one two three four" is 5 out.
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (4, 5, 9)
    expected = Decimal(str(4 * CHAT_PRICE[0] + 5 * CHAT_PRICE[1])).quantize(Decimal("1e-8"))
    assert record.cost_usd == expected
    assert record.cost_usd > 0
    assert response.json()["cost"] == pytest.approx(float(expected))
    assert (record.credential_id, record.outcome, record.model) == (team_b.pk, "ok", CHAT_MODEL)


def test_a_streamed_answer_comes_in_order_and_is_recorded_with_tokens_and_cost(
    proxy, credential_factory, alice
):
    _, upstream = proxy.require_own("the priced forwarded model")
    team_b = credential_factory(title="Team B", owner=alice, api_key=KEY_B, base_url=proxy.base_url)
    body = {"credential": str(team_b.pk), "model": CHAT_MODEL, "messages": MESSAGES, "stream": True}

    response, content = stream(alice, "/api/llm/chat", body)

    assert response.status_code == 200
    got = events(content)
    pieces = [data["delta"] for name, data in got if name == "message"]
    assert "".join(pieces) == "echo: one two three four"
    assert len(pieces) >= 5  # word by word, as the upstream sent them: not one lump
    assert got[-1][0] == "done"
    assert got[-1][1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    record = UsageRecord.objects.get()
    assert (record.prompt_tokens, record.completion_tokens, record.outcome) == (4, 5, "ok")
    # No cost header on a streamed answer: the cost comes from the last chunk's usage.
    assert record.cost_usd is not None
    assert record.cost_usd > 0
    (sent,) = upstream.requests
    assert sent.body["stream"] is True


def test_a_call_through_the_proxy_with_the_async_service(proxy, credential_factory, alice):
    """Against any proxy (LITELLM_PROXY_URL too): a real answer, and its tokens recorded."""
    credential = credential_factory(
        title="Proxy key", owner=alice, api_key=proxy.key, base_url=proxy.base_url
    )

    async def call():
        return await services.achat(
            messages=MESSAGES, model=proxy.model, credential=credential, user=alice, max_tokens=16
        )

    result = async_to_sync(call)()

    assert result.text
    assert result.usage.total_tokens > 0
    record = UsageRecord.objects.get()
    assert (record.outcome, record.total_tokens) == ("ok", result.usage.total_tokens)


def test_a_streamed_answer_through_any_proxy_is_whole_and_recorded(
    proxy, credential_factory, alice
):
    """Against any proxy (LITELLM_PROXY_URL too): the pieces make the answer, and the
    record has the tokens the answer reported."""
    credential = credential_factory(
        title="Proxy key", owner=alice, api_key=proxy.key, base_url=proxy.base_url
    )
    body = {
        "credential": str(credential.pk),
        "model": proxy.model,
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 16,
    }

    response, content = stream(alice, "/api/llm/chat", body)

    assert response.status_code == 200
    got = events(content)
    name, done = got[-1]
    assert name == "done"
    assert "".join(data["delta"] for name, data in got if name == "message") == done["text"]
    record = UsageRecord.objects.get()
    assert record.outcome == "ok"
    assert record.total_tokens == done["usage"]["total_tokens"] > 0
