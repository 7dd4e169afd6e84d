"""The JSON API and the playground's endpoint, as a client program or the page sees them.

Every call reaches a real OpenAI-compatible server on loopback (tests/upstream.py).
Streamed answers are read with Django's AsyncClient on the same event loop as the view.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client

from llm.models import PlaygroundChoice
from tests.conftest import FAKE_KEY, GLOBAL_KEY
from tests.upstream import free_port

MODEL = "gpt-test-mini"
HELLO = [{"role": "user", "content": "hello there"}]
HELLO_USAGE = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


# ---- helpers ---------------------------------------------------------------------------


def post_json(client, url: str, body: Any):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def events(raw: bytes) -> list[tuple[str, Any]]:
    """Server-sent events as (event name, decoded data), in order."""
    parsed = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
        parsed.append((name, data))
    return parsed


def stream(user, url: str, body: dict[str, Any]) -> tuple[Any, bytes]:
    """POST `body` with an AsyncClient and read the whole (streamed) answer."""

    async def main() -> tuple[Any, bytes]:
        async_client = AsyncClient()
        await async_client.aforce_login(user)
        response: Any = await async_client.post(
            url, data=json.dumps(body), content_type="application/json"
        )
        if response.streaming:
            content = b"".join([c async for c in response.streaming_content])
        else:
            content = response.content
        return response, content

    return async_to_sync(main)()


def assert_no_key(response, content: bytes | None = None) -> None:
    text = (content if content is not None else response.content).decode()
    headers = json.dumps(dict(response.items()))
    for key in (FAKE_KEY, GLOBAL_KEY):
        assert key not in text
        assert key not in headers


class Form(HTMLParser):
    """The playground form's state: selected options per <select>, values of <input>s."""

    def __init__(self) -> None:
        super().__init__()
        self.select: str | None = None
        self.selected: dict[str, list[str]] = {}
        self.values: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        found = dict(attrs)
        if tag == "select":
            self.select = found.get("id")
            self.selected.setdefault(self.select or "", [])
        elif tag == "option" and self.select and "selected" in found:
            self.selected[self.select].append(found.get("value") or "")
        elif tag == "input":
            self.values[found.get("id") or ""] = found.get("value") or ""

    def handle_endtag(self, tag):
        if tag == "select":
            self.select = None


def form_state(html: str) -> Form:
    form = Form()
    form.feed(html)
    return form


# ---- fixtures --------------------------------------------------------------------------


def chat_body(credential=None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": HELLO, **extra}
    if credential is not None:
        body["credential"] = str(credential.pk)
    return body


# ---- signing in ------------------------------------------------------------------------

ENDPOINTS = [
    ("get", "/api/llm/credentials"),
    ("post", "/api/llm/chat"),
    ("post", "/api/llm/embeddings"),
    ("get", "/api/llm/models"),
    ("get", "/api/llm/budget"),
    ("post", "/llm/send"),
]


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_it_answers_401_json_when_signed_out(client, db, method, url):
    response = post_json(client, url, chat_body()) if method == "post" else client.get(url)

    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["type"] == "NotAuthenticated"
    assert "Sign in" in response.json()["error"]["message"]


def test_the_playground_sends_signed_out_visitors_to_the_login_page(client, db):
    response = client.get("/llm/")

    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/llm/"


def route_json(source, server, credential=None):
    """The "route" of an answer that went where it was meant to."""
    return {
        "source": source,
        "host": f"127.0.0.1:{server.port}",
        "credential": {"id": str(credential.pk), "title": credential.title} if credential else None,
        "failed_over_from": None,
    }


# ---- chat ------------------------------------------------------------------------------


def test_it_answers_a_chat_with_text_usage_cost_and_route(api, credential, costly):
    response = post_json(api, "/api/llm/chat", chat_body(credential))

    assert response.status_code == 200, response.content
    assert response.json() == {
        "text": "echo: hello there",
        "model": MODEL,
        "usage": HELLO_USAGE,
        "cost": 0.0042,
        "route": route_json("credential", costly, credential),
    }
    assert response["X-Keyroute-Route"] == (
        f"source=credential; host=127.0.0.1:{costly.port}; credential={credential.pk}"
    )
    assert costly.requests[0].authorization == f"Bearer {FAKE_KEY}"
    assert_no_key(response)


def test_the_cost_is_null_when_the_upstream_does_not_tell_it(
    api, credential_factory, alice, upstream
):
    credential = credential_factory(owner=alice, base_url=upstream.base_url)

    response = post_json(api, "/api/llm/chat", chat_body(credential))

    assert response.status_code == 200
    assert response.json()["cost"] is None


def test_temperature_and_max_tokens_reach_the_upstream(api, credential, costly):
    body = chat_body(credential, temperature=0.3, max_tokens=42)

    assert post_json(api, "/api/llm/chat", body).status_code == 200

    sent = costly.requests[0].body
    assert sent["temperature"] == 0.3
    assert sent["max_tokens"] == 42
    assert sent["model"] == MODEL
    assert sent["messages"] == HELLO


@pytest.mark.parametrize("omitted", [True, False])
def test_without_a_credential_it_uses_the_global_default(api, global_route, omitted):
    body = chat_body() if omitted else chat_body(credential=None) | {"credential": None}

    response = post_json(api, "/api/llm/chat", body)

    assert response.status_code == 200, response.content
    assert response.json()["route"] == route_json("global", global_route)
    assert response["X-Keyroute-Route"] == f"source=global; host=127.0.0.1:{global_route.port}"
    assert global_route.requests[0].authorization == f"Bearer {GLOBAL_KEY}"
    assert_no_key(response)


# ---- embeddings ------------------------------------------------------------------------


def test_it_embeds_a_string(api, credential, costly):
    body = {"credential": str(credential.pk), "model": "embed-test", "input": "one two three"}

    response = post_json(api, "/api/llm/embeddings", body)

    assert response.status_code == 200, response.content
    assert response.json() == {
        "vectors": [[13.0, 0.0, 0.5]],
        "model": "embed-test",
        "usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3},
        "route": route_json("credential", costly, credential),
        "cost": 0.0042,
    }
    assert costly.requests[0].body["input"] == ["one two three"]


def test_it_embeds_a_list_through_the_internal_default(api, global_route):
    body = {"model": "embed-test", "input": ["a", "bb cc"]}

    response = post_json(api, "/api/llm/embeddings", body)

    assert response.status_code == 200, response.content
    answer = response.json()
    assert answer["vectors"] == [[1.0, 0.0, 0.5], [5.0, 1.0, 0.5]]
    assert answer["usage"]["total_tokens"] == 3
    assert answer["route"] == route_json("internal", global_route)
    assert global_route.requests[0].body["input"] == ["a", "bb cc"]


# ---- streaming -------------------------------------------------------------------------


def test_it_streams_deltas_in_order_then_the_whole_result(alice, credential, costly):
    body = chat_body(credential, stream=True)
    body["messages"] = [{"role": "user", "content": "one two three four"}]

    response, content = stream(alice, "/api/llm/chat", body)

    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    received = events(content)
    deltas = [data["delta"] for name, data in received if name == "message"]
    assert deltas == ["echo:", " one", " two", " three", " four"]
    assert "".join(deltas) == "echo: one two three four"
    assert [name for name, _ in received][-1] == "done"
    assert received[-1][1] == {
        "text": "echo: one two three four",
        "model": MODEL,
        "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
        "cost": 0.0042,
        "route": route_json("credential", costly, credential),
    }
    assert response["Cache-Control"] == "no-cache"
    assert response["X-Keyroute-Route"].startswith("source=credential; ")
    assert costly.requests[0].body["stream"] is True
    assert_no_key(response, content)


def test_under_wsgi_a_stream_arrives_whole(api, credential, costly):
    response = post_json(api, "/api/llm/chat", chat_body(credential, stream=True))

    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    received = events(response.content)
    assert "".join(d["delta"] for name, d in received if name == "message") == "echo: hello there"
    assert received[-1] == (
        "done",
        {
            "text": "echo: hello there",
            "model": MODEL,
            "usage": HELLO_USAGE,
            "cost": 0.0042,
            "route": route_json("credential", costly, credential),
        },
    )


def test_a_stream_whose_upstream_is_down_answers_with_the_error_status(alice, credential_factory):
    closed = f"http://127.0.0.1:{free_port()}/v1"
    credential = credential_factory(owner=alice, base_url=closed)

    response, content = stream(alice, "/api/llm/chat", chat_body(credential, stream=True))

    assert response.status_code == 502
    assert response["Content-Type"] == "application/json"
    error = json.loads(content)["error"]
    assert error["type"] == "ProxyUnreachable"
    assert "connection refused" in error["message"]
    assert_no_key(response, content)


# ---- bad input -------------------------------------------------------------------------

TOO_MANY = [{"role": "user", "content": "hi"}] * 257

BAD_CHATS: list[Any] = [
    pytest.param({"messages": HELLO}, "model", id="missing model"),
    pytest.param({"model": "", "messages": HELLO}, "model", id="empty model"),
    pytest.param({"model": "   ", "messages": HELLO}, "model", id="blank model"),
    pytest.param({"model": 42, "messages": HELLO}, "model", id="model not a string"),
    pytest.param({"model": "m" * 201, "messages": HELLO}, "model", id="model too long"),
    pytest.param({"model": MODEL}, "messages", id="messages missing"),
    pytest.param({"model": MODEL, "messages": []}, "messages", id="no messages"),
    pytest.param({"model": MODEL, "messages": "hello"}, "messages", id="messages a string"),
    pytest.param(
        {"model": MODEL, "messages": [{"content": "hi"}]},
        "messages",
        id="message without role",
    ),
    pytest.param(
        {"model": MODEL, "messages": [{"role": "user"}]},
        "messages",
        id="message without content",
    ),
    pytest.param(
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        "messages",
        id="unknown role",
    ),
    pytest.param(
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
        "messages",
        id="content not a string",
    ),
    pytest.param({"model": MODEL, "messages": ["hi"]}, "messages", id="message not an object"),
    pytest.param({"model": MODEL, "messages": TOO_MANY}, "messages", id="257 messages"),
    pytest.param(chat_body(temperature="hot"), "temperature", id="temperature hot"),
    pytest.param(chat_body(temperature=3), "temperature", id="temperature 3"),
    pytest.param(chat_body(temperature=-1), "temperature", id="temperature -1"),
    pytest.param(chat_body(temperature=True), "temperature", id="temperature true"),
    pytest.param(chat_body(max_tokens=0), "max_tokens", id="max_tokens 0"),
    pytest.param(chat_body(max_tokens="ten"), "max_tokens", id="max_tokens ten"),
    pytest.param(chat_body(max_tokens=1.5), "max_tokens", id="max_tokens 1.5"),
    pytest.param(chat_body(stream="yes"), "stream", id="stream yes"),
    pytest.param(chat_body(top_k=3), "top_k", id="unknown field"),
    pytest.param(chat_body() | {"credential": 7}, "credential", id="credential a number"),
]


@pytest.mark.parametrize(("body", "field"), BAD_CHATS)
def test_a_bad_chat_request_answers_400_naming_the_field(api, global_route, body, field):
    response = post_json(api, "/api/llm/chat", body)

    assert response.status_code == 400, response.content[:300]
    error = response.json()["error"]
    assert error["type"] == "InvalidRequest"
    assert list(error["fields"]) == [field]
    assert all(isinstance(sentence, str) and sentence for sentence in error["fields"][field])
    assert global_route.requests == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"model": "embed-test"}, "input", id="input missing"),
        pytest.param({"model": "embed-test", "input": []}, "input", id="empty list"),
        pytest.param({"model": "embed-test", "input": ["a", 1]}, "input", id="with a number"),
        pytest.param({"model": "embed-test", "input": 5}, "input", id="input a number"),
        pytest.param({"model": "embed-test", "input": ["a"] * 2049}, "input", id="2049 inputs"),
        pytest.param({"input": "hi"}, "model", id="model missing"),
        pytest.param({"model": "embed-test", "input": "hi", "dims": 3}, "dims", id="unknown"),
    ],
)
def test_a_bad_embeddings_request_answers_400_naming_the_field(api, global_route, body, field):
    response = post_json(api, "/api/llm/embeddings", body)

    assert response.status_code == 400, response.content[:300]
    assert list(response.json()["error"]["fields"]) == [field]
    assert global_route.requests == []


def test_several_problems_are_named_together(api, global_route):
    response = post_json(api, "/api/llm/chat", {"model": "", "temperature": 9, "stream": 1})

    assert response.status_code == 400
    assert set(response.json()["error"]["fields"]) == {
        "model",
        "messages",
        "temperature",
        "stream",
    }


@pytest.mark.parametrize("url", ["/api/llm/chat", "/api/llm/embeddings", "/llm/send"])
@pytest.mark.parametrize(
    ("raw", "sentence"),
    [
        pytest.param(b'{"model": "x", ', "not valid JSON", id="malformed JSON"),
        pytest.param(b"\xff\xfe not utf-8", "not valid JSON", id="not UTF-8"),
        pytest.param(b"", "must be a JSON object", id="empty body"),
        pytest.param(b'[{"model": "x"}]', "must be a JSON object", id="array"),
        pytest.param(b'"hello"', "must be a JSON object", id="string"),
    ],
)
def test_a_body_that_is_not_a_json_object_answers_400(api, global_route, url, raw, sentence):
    response = api.post(url, data=raw, content_type="application/json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "InvalidRequest"
    assert sentence in error["message"]
    assert global_route.requests == []


def test_a_body_over_1_mb_answers_400_with_a_sentence_about_its_size(api, global_route):
    body = chat_body(messages=[{"role": "user", "content": "x" * (1024 * 1024)}])

    response = post_json(api, "/api/llm/chat", body)

    assert response.status_code == 400
    assert response.json()["error"]["message"] == "The request body is larger than 1024 KB."
    assert global_route.requests == []


def test_a_body_over_the_upload_limit_also_answers_the_json_sentence(api, global_route):
    body = chat_body(messages=[{"role": "user", "content": "x" * (3 * 1024 * 1024)}])

    response = post_json(api, "/api/llm/chat", body)

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert "larger than" in response.json()["error"]["message"]


# ---- upstream failures -----------------------------------------------------------------


def test_a_closed_port_answers_502_connection_refused(api, credential_factory, alice):
    closed = f"http://127.0.0.1:{free_port()}/v1"
    credential = credential_factory(owner=alice, base_url=closed)

    response = post_json(api, "/api/llm/chat", chat_body(credential))

    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "ProxyUnreachable"
    assert "connection refused" in error["message"]
    assert_no_key(response)


@pytest.mark.parametrize(
    ("behaviour", "status", "kind"),
    [
        pytest.param(
            {"status": 401, "body": {"error": {"message": f"bad key {FAKE_KEY}"}}},
            403,
            "CredentialRejected",
            id="401",
        ),
        pytest.param({"status": 500}, 502, "UpstreamError", id="500"),
        pytest.param({"status": 404}, 400, "ModelNotFound", id="404"),
        pytest.param({"mode": "garbage"}, 502, "UpstreamError", id="garbage"),
    ],
)
def test_upstream_failures_answer_with_their_status(
    api, credential, costly, behaviour, status, kind
):
    costly.respond(**behaviour)

    for url, body in [
        ("/api/llm/chat", chat_body(credential)),
        ("/api/llm/embeddings", {"credential": str(credential.pk), "model": "e", "input": "x"}),
    ]:
        response = post_json(api, url, body)

        assert response.status_code == status, (url, response.content)
        assert response.json()["error"]["type"] == kind
        assert "Alice proxy" in response.json()["error"]["message"]
        assert_no_key(response)


def test_a_rate_limit_answers_429_with_retry_after(api, credential, costly):
    costly.respond(status=429, headers={"Retry-After": "7"})

    response = post_json(api, "/api/llm/chat", chat_body(credential))

    assert response.status_code == 429
    assert response["Retry-After"] == "7"
    assert response.json()["error"]["type"] == "RateLimited"
    assert "Try again in 7 s." in response.json()["error"]["message"]
    assert_no_key(response)


def test_without_a_global_key_a_call_without_credential_answers_503(api, settings, upstream):
    settings.OPENAI_BASE_URL = upstream.base_url
    settings.OPENAI_API_KEY = ""

    response = post_json(api, "/api/llm/chat", chat_body())

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == "CredentialUnavailable"
    assert "OPENAI_API_KEY" in error["message"]
    assert upstream.requests == []


# ---- models and probes -----------------------------------------------------------------


def test_it_lists_the_upstreams_models(api, credential, costly):
    response = api.get("/api/llm/models", {"credential": str(credential.pk)})

    assert response.status_code == 200
    assert response.json() == {"models": ["embed-test", "gpt-test-large", "gpt-test-mini"]}
    assert costly.requests[0].path == "/v1/models"
    assert costly.requests[0].authorization == f"Bearer {FAKE_KEY}"
    assert_no_key(response)


def test_the_probes_answer(client, db):
    health = client.get("/healthz")
    ready = client.get("/readyz")

    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok"}


# ---- the playground's endpoint ---------------------------------------------------------


def send_body(credential, purpose: str, prompt: str = "write fizzbuzz", model=MODEL):
    return {"credential": str(credential.pk), "purpose": purpose, "model": model, "prompt": prompt}


def test_the_playground_generates_code(api, credential, costly):
    response = post_json(api, "/llm/send", send_body(credential, "code"))

    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"
    assert response.json()["text"] == "echo: write fizzbuzz"
    assert response.json()["cost"] == 0.0042
    sent = costly.requests[0].body["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]
    assert sent[1]["content"] == "write fizzbuzz"


def test_the_playground_embeds(api, credential, costly):
    response = post_json(
        api, "/llm/send", send_body(credential, "embeddings", "four", "embed-test")
    )

    assert response.status_code == 200, response.content
    assert response.json()["vectors"] == [[4.0, 0.0, 0.5]]
    assert costly.requests[0].path == "/v1/embeddings"


def test_the_playground_streams_a_chat(alice, credential, costly):
    response, content = stream(alice, "/llm/send", send_body(credential, "chat", "hi you"))

    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    received = events(content)
    assert "".join(d["delta"] for name, d in received if name == "message") == "echo: hi you"
    assert received[-1][0] == "done"
    assert received[-1][1]["text"] == "echo: hi you"


def test_the_playground_remembers_the_choice(api, alice, credential, credential_factory, costly):
    other = credential_factory(title="Another", owner=alice, base_url=costly.base_url)
    before = form_state(api.get("/llm/").content.decode())
    assert before.selected["purpose"] == ["chat"]
    assert before.values["model"] == ""

    body = send_body(other, "code", model="gpt-test-large")
    assert post_json(api, "/llm/send", body).status_code == 200

    page = api.get("/llm/").content.decode()
    after = form_state(page)
    assert after.selected["credential"] == [str(other.pk)]
    assert after.selected["purpose"] == ["code"]
    assert after.values["model"] == "gpt-test-large"
    choice = PlaygroundChoice.objects.get(user=alice)
    assert (choice.credential, choice.purpose, choice.model) == (other, "code", "gpt-test-large")

    body = send_body(credential, "embeddings", model="embed-test")
    assert post_json(api, "/llm/send", body).status_code == 200
    after = form_state(api.get("/llm/").content.decode())
    assert after.selected["credential"] == [str(credential.pk)]
    assert after.selected["purpose"] == ["embeddings"]
    assert after.values["model"] == "embed-test"
    assert PlaygroundChoice.objects.count() == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"purpose": "poetry"}, "purpose", id="bad purpose"),
        pytest.param({"purpose": None}, "purpose", id="null purpose"),
        pytest.param({"prompt": ""}, "prompt", id="empty prompt"),
        pytest.param({"prompt": "   \n"}, "prompt", id="blank prompt"),
        pytest.param({"prompt": 5}, "prompt", id="prompt not a string"),
        pytest.param({"model": ""}, "model", id="empty model"),
        pytest.param({"temperature": 7}, "temperature", id="temperature 7"),
    ],
)
def test_a_bad_playground_request_answers_400(api, credential, costly, change, field):
    body = send_body(credential, "code") | change

    response = post_json(api, "/llm/send", body)

    assert response.status_code == 400, response.content[:300]
    assert field in response.json()["error"]["fields"]
    assert costly.requests == []
    assert not PlaygroundChoice.objects.exists()


def test_it_checks_csrf_after_authentication_and_answers_json(db, alice, credential, costly):
    strict = Client(enforce_csrf_checks=True)
    body = json.dumps(chat_body(credential))

    signed_out = strict.post("/api/llm/chat", body, content_type="application/json")
    strict.force_login(alice)
    no_token = strict.post("/api/llm/chat", body, content_type="application/json")
    strict.get("/llm/")  # the page sets the csrftoken cookie
    token = strict.cookies["csrftoken"].value
    with_token = strict.post(
        "/api/llm/chat", body, content_type="application/json", headers={"X-CSRFToken": token}
    )

    assert signed_out.status_code == 401
    assert signed_out.json()["error"]["type"] == "NotAuthenticated"
    assert no_token.status_code == 403
    assert no_token.json()["error"]["type"] == "CSRFFailed"
    assert with_token.status_code == 200, with_token.content
    assert with_token.json()["text"] == "echo: hello there"
