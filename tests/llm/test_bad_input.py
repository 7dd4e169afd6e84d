"""Bad input never makes a 500: the JSON API and the playground's send answer 400 with
a sentence, and an upstream's answer that is not OpenAI-compatible is the LLM error
sentence for an upstream fault (502 in the API, an error line in the admin).

Each request goes through the real views (alice's signed-in client, which answers a
500 as a page rather than raising it); every call that does go out reaches a real
loopback server (tests/upstream.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from llm.models import PlaygroundChoice

MODEL = "gpt-test-mini"
HELLO = [{"role": "user", "content": "hello there"}]
SURROGATE_SENTENCE = "contains a lone UTF-16 surrogate (\\ud800), which cannot be sent"
DEEP = 5000
LIST_URL = reverse("admin:credentials_apikeycredentials_changelist")
POSTS = ["/api/llm/chat", "/api/llm/embeddings", "/llm/send"]


@pytest.fixture(autouse=True)
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def tracebacks(logs: pytest.LogCaptureFixture) -> list[str]:
    """Log records an operator would read as a crash: a traceback, or an error that is not
    Django's line for a gateway status (a 502 answering an upstream fault is one)."""
    return [
        f"{record.name}: {record.getMessage()}"
        for record in logs.records
        if record.exc_info
        or record.exc_text
        or (record.levelno >= logging.ERROR and getattr(record, "status_code", 500) == 500)
    ]


def loud(logs: pytest.LogCaptureFixture) -> list[str]:
    """Log records above WARNING: bad input deserves a warning at most."""
    return [r.getMessage() for r in logs.records if r.levelno > logging.WARNING]


def post_raw(client: Client, url: str, raw: bytes | str, content_type: str = "application/json"):
    data = raw.encode() if isinstance(raw, str) else raw
    return client.post(url, data=data, content_type=content_type)


def body_for(url: str, credential: Any = None, **fields: Any) -> dict[str, Any]:
    """A valid body for `url`, with `fields` replaced."""
    body: dict[str, Any]
    if url == "/api/llm/chat":
        body = {"model": MODEL, "messages": HELLO}
    elif url == "/api/llm/embeddings":
        body = {"model": "embed-test", "input": "hello"}
    else:
        body = {"purpose": "chat", "model": MODEL, "prompt": "hello there"}
    if credential is not None:
        body["credential"] = str(credential.pk)
    return body | fields


def assert_refused(response, logs, upstream, *, sentence: str, field: str | None = None) -> None:
    assert response.status_code == 400, response.content[:500]
    error = response.json()["error"]
    assert error["type"] == "InvalidRequest"
    if field is None:
        assert sentence in error["message"]
    else:
        assert field in error["fields"], error
        assert any(sentence in text for text in error["fields"][field]), error
    assert upstream.requests == []
    assert tracebacks(logs) == []
    assert loud(logs) == []
    assert not PlaygroundChoice.objects.exists()


# ---- nesting -----------------------------------------------------------------------------


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("url", POSTS)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda url: nested(DEEP, ""), id="a bare array"),
        pytest.param(lambda url: nested_objects(DEEP), id="bare objects"),
        pytest.param(
            lambda url: '{"model": "m", "messages": ' + nested(DEEP) + "}", id="in messages"
        ),
        pytest.param(
            lambda url: (
                json.dumps(body_for(url))[:-1] + ', "options": ' + nested_objects(DEEP) + "}"
            ),
            id="in an extra field",
        ),
        pytest.param(
            lambda url: json.dumps(body_for(url))[:-1] + ', "model": ' + nested(DEEP) + "}",
            id="in the model",
        ),
        pytest.param(lambda url: nested(200), id="200 levels (the parser copes)"),
        pytest.param(
            lambda url: json.dumps(body_for(url))[:-1] + ', "input": ' + nested(40) + "}",
            id="40 levels in a field",
        ),
    ],
)
def test_json_nested_too_deeply_answers_400(api, global_route, logs, url, make):
    response = post_raw(api, url, make(url))

    assert_refused(response, logs, global_route, sentence="nested too deeply")


@pytest.mark.parametrize("url", POSTS)
def test_json_nested_as_deep_as_allowed_is_read(api, global_route, logs, url):
    """32 levels pass the depth check (the fields may still be wrong, but not 'too deep')."""
    raw = json.dumps(body_for(url))[:-1] + ', "extra": ' + nested(31) + "}"

    response = post_raw(api, url, raw)

    assert response.status_code == 400
    assert "nested too deeply" not in response.content.decode()
    assert list(response.json()["error"]["fields"]) == ["extra"]  # an unknown field


@pytest.mark.parametrize("url", POSTS)
@pytest.mark.parametrize(
    "values",
    [
        pytest.param("[" + ",".join(["[]"] * 300_000) + "]", id="a megabyte of empty arrays"),
        pytest.param("[" + ",".join(["1"] * 250_000) + "]", id="a megabyte of numbers"),
        pytest.param("[" + ",".join(['{"a":[1,2]}'] * 7_000) + "]", id="spread over small objects"),
    ],
)
def test_a_body_holding_too_many_values_answers_400(api, global_route, logs, url, values):
    """Every value of a body is checked on the event loop: their number is bounded, so one
    request cannot hold up the others for long."""
    raw = json.dumps(body_for(url))[:-1] + ', "extra": ' + values + "}"

    response = post_raw(api, url, raw)

    assert_refused(response, logs, global_route, sentence="too many values")


@pytest.mark.parametrize("url", POSTS)
def test_a_large_legitimate_body_is_not_too_many_values(api, global_route, logs, url):
    """The largest requests the API takes (2,048 texts to embed; 256 messages) pass."""
    if url == "/api/llm/embeddings":
        body = body_for(url, input=[f"text {n}" for n in range(2048)])
    elif url == "/api/llm/chat":
        body = body_for(url, messages=[{"role": "user", "content": f"m{n}"} for n in range(256)])
    else:
        body = body_for(url, prompt="p " * 10_000)

    response = post_raw(api, url, json.dumps(body))

    assert response.status_code == 200, response.content[:500]


# ---- text that cannot be sent ------------------------------------------------------------

LONE = "\\ud800"  # as JSON escapes it: decodes into a lone surrogate


def with_lone(url: str, field: str, credential: Any = None) -> str:
    """A valid body for `url` whose `field` holds a lone surrogate (as raw JSON)."""
    body = body_for(url, credential)
    marker = "LONE-SURROGATE-HERE"
    if field == "content":
        body["messages"] = [{"role": "user", "content": f"hi {marker}"}]
    elif field == "input list":
        body["input"] = ["fine", f"x{marker}"]
    elif field == "key":
        body["messages"] = [{"role": "user", "content": "hi", marker: 1}]
    else:
        body[field] = f"{'gpt' if field == 'model' else ''}{marker}"
    return json.dumps(body).replace(marker, LONE)


SURROGATES = [
    ("/api/llm/chat", "content", "messages"),
    ("/api/llm/chat", "key", "messages"),
    ("/api/llm/chat", "model", "model"),
    ("/api/llm/chat", "credential", "credential"),
    ("/api/llm/embeddings", "input", "input"),
    ("/api/llm/embeddings", "input list", "input"),
    ("/api/llm/embeddings", "model", "model"),
    ("/api/llm/embeddings", "credential", "credential"),
    ("/llm/send", "prompt", "prompt"),
    ("/llm/send", "model", "model"),
    ("/llm/send", "credential", "credential"),
    ("/llm/send", "purpose", "purpose"),
]


@pytest.mark.parametrize(
    ("url", "where", "field"),
    [pytest.param(*case, id=f"{case[0]} {case[1]}") for case in SURROGATES],
)
def test_a_lone_surrogate_answers_400_naming_the_field(
    api, credential, costly, logs, url, where, field
):
    response = post_raw(api, url, with_lone(url, where, credential))

    assert_refused(response, logs, costly, sentence=SURROGATE_SENTENCE, field=field)
    assert "send valid Unicode" in " ".join(response.json()["error"]["fields"][field])


@pytest.mark.parametrize("url", POSTS)
def test_a_surrogate_pair_is_valid_unicode_and_is_sent(api, credential, costly, url):
    raw = json.dumps(body_for(url, credential)).replace("hello", "hello \\ud83d\\ude00")

    response = post_raw(api, url, raw)

    assert response.status_code == 200, response.content[:300]
    assert "\U0001f600" in json.dumps(costly.requests[0].body, ensure_ascii=False)


@pytest.mark.parametrize("url", POSTS)
@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("model", "gpt\u0000mini", id="NUL in the model"),
        pytest.param("model", "gpt\nmini", id="newline in the model"),
        pytest.param("model", "gpt\u202emini", id="right-to-left override in the model"),
        pytest.param("model", "gpt\x7fmini", id="DEL in the model"),
        pytest.param("credential", "\u0000", id="NUL in the credential"),
        pytest.param("credential", "abc\r\nX-Injected: 1", id="CRLF in the credential"),
    ],
)
def test_control_characters_in_names_answer_400(api, credential, costly, logs, url, field, value):
    body = body_for(url, credential) | {field: value}

    response = post_raw(api, url, json.dumps(body))

    assert_refused(response, logs, costly, sentence="control", field=field)


def test_nul_in_message_content_is_valid_text_and_is_sent(api, credential, costly):
    body = body_for("/api/llm/chat", credential, messages=[{"role": "user", "content": "a\u0000b"}])

    response = post_raw(api, "/api/llm/chat", json.dumps(body))

    assert response.status_code == 200, response.content[:300]
    assert costly.requests[0].body["messages"][0]["content"] == "a\u0000b"


@pytest.mark.parametrize(
    ("query", "status"),
    [
        pytest.param("credential=%00", 400, id="NUL"),
        pytest.param("credential=a%09b", 400, id="tab"),
        pytest.param("credential=%E2%80%AE", 400, id="right-to-left override"),
        pytest.param("credential=%ED%A0%80", 404, id="a surrogate, not UTF-8"),
        pytest.param("credential=%FF", 404, id="not UTF-8"),
        pytest.param("credential=" + "a" * 5000, 404, id="long"),
        pytest.param("credential=1e999", 404, id="a number"),
        pytest.param("&".join(["a=1"] * 2000), 400, id="2000 parameters"),
    ],
)
@pytest.mark.parametrize("url", ["/api/llm/models", "/api/llm/budget"])
def test_the_credential_queries_refuse_a_credential_id_they_cannot_use(
    api, global_route, logs, query, status, url
):
    response = api.get(f"{url}?{query}")

    assert response.status_code == status, response.content[:300]
    if status == 400:
        assert response.json()["error"]["type"] == "InvalidRequest"
    if status == 400 and query.startswith("credential"):
        assert "credential" in response.json()["error"]["fields"]
    elif status == 400:
        assert (
            "more than 1000 form fields or query parameters" in response.json()["error"]["message"]
        )
    assert global_route.requests == []
    assert tracebacks(logs) == []


# ---- an upstream's answer that is not OpenAI-compatible --------------------------------

NOT_COMPATIBLE = [
    pytest.param({"mode": "garbage"}, id="not JSON"),
    pytest.param({"mode": "verbatim", "body": "<html><body>Login</body></html>"}, id="HTML"),
    pytest.param({"mode": "verbatim", "body": ""}, id="empty"),
    pytest.param({"mode": "verbatim", "body": b'{"data": "\xff\xfe"}'}, id="not UTF-8"),
    pytest.param({"mode": "verbatim", "body": []}, id="a list"),
    pytest.param({"mode": "verbatim", "body": None}, id="null"),
    pytest.param({"mode": "verbatim", "body": 5}, id="a number"),
    pytest.param({"mode": "verbatim", "body": {"data": 5}}, id="data 5"),
    pytest.param({"mode": "verbatim", "body": {"data": [5]}}, id="data [5]"),
    pytest.param({"mode": "verbatim", "body": {"data": [{"object": "x"}]}}, id="no ids"),
    pytest.param({"mode": "verbatim", "body": {"choices": "x"}}, id="choices x"),
    pytest.param({"mode": "verbatim", "body": {"choices": [{"message": 5}]}}, id="message 5"),
    pytest.param(
        {"mode": "verbatim", "body": {"data": [{"embedding": "x", "index": 0}]}}, id="vector x"
    ),
    pytest.param(
        {"mode": "verbatim", "body": '{"data": [{"embedding": [NaN], "index": 0}]}'},
        id="vector NaN",
    ),
    pytest.param(
        {
            "mode": "verbatim",
            "body": {
                "choices": [{"message": {"content": "hi"}}],
                "data": [{"embedding": [1.0], "index": 0}],
                "usage": {"prompt_tokens": 10**30, "total_tokens": "many"},
            },
        },
        id="token counts out of range",
    ),
    pytest.param({"mode": "verbatim", "body": "[" * 100_000}, id="nested too deeply"),
]
NOT_COMPATIBLE_SENTENCE = "not an OpenAI-compatible response"


@pytest.mark.parametrize("behaviour", NOT_COMPATIBLE)
@pytest.mark.parametrize(
    "url", ["/api/llm/models", "/api/llm/chat", "/api/llm/embeddings", "stream", "/llm/send"]
)
def test_an_answer_that_is_not_openai_compatible_answers_502(
    api, credential, costly, logs, behaviour, url
):
    costly.respond(**behaviour)

    if url == "/api/llm/models":
        response = api.get(url, {"credential": str(credential.pk)})
    elif url == "stream":
        response = post_raw(
            api, "/api/llm/chat", json.dumps(body_for("/api/llm/chat", credential, stream=True))
        )
    else:
        response = post_raw(api, url, json.dumps(body_for(url, credential)))

    assert response.status_code == 502, response.content[:500]
    error = response.json()["error"]
    assert error["type"] == "UpstreamError"
    assert NOT_COMPATIBLE_SENTENCE in error["message"]
    assert "Alice proxy" in error["message"]
    assert tracebacks(logs) == []


@pytest.mark.parametrize("url", ["/api/llm/chat", "/api/llm/embeddings"])
@pytest.mark.parametrize("count", [10**30, 2**31, -1, 1.5, "many", True, [1]])
def test_token_counts_that_are_no_counts_answer_502(api, credential, costly, logs, url, count):
    """A count no usage record could store is the upstream's fault, not a broken record."""
    costly.respond(
        mode="verbatim",
        body={
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "data": [{"embedding": [1.0], "index": 0}],
            "usage": {"prompt_tokens": count, "total_tokens": 3},
        },
    )

    response = post_raw(api, url, json.dumps(body_for(url, credential)))

    assert response.status_code == 502, response.content[:500]
    assert NOT_COMPATIBLE_SENTENCE in response.json()["error"]["message"]
    assert tracebacks(logs) == []


@pytest.mark.parametrize("behaviour", NOT_COMPATIBLE)
def test_test_connection_reports_an_answer_that_is_not_a_model_list(
    admin_client, credential_factory, upstream, logs, behaviour
):
    credential = credential_factory(title="Odd proxy", base_url=upstream.base_url)
    upstream.respond(**behaviour)

    response = admin_client.post(
        LIST_URL,
        {"action": "test_connection", "_selected_action": [str(credential.pk)]},
        follow=True,
    )

    assert response.status_code == 200
    (message,) = [str(message) for message in response.context["messages"]]
    assert message.startswith(f"Odd proxy: The LLM proxy at 127.0.0.1:{upstream.port} ")
    assert NOT_COMPATIBLE_SENTENCE in message
    assert tracebacks(logs) == []


def test_diagnose_reports_an_answer_that_is_not_a_model_list(
    admin_client, credential_factory, upstream, logs
):
    credential = credential_factory(title="Odd proxy", base_url=upstream.base_url)
    upstream.respond(mode="verbatim", body="<html>Sign in</html>")

    response = admin_client.post(
        LIST_URL, {"action": "diagnose", "_selected_action": [str(credential.pk)]}
    )

    assert response.status_code == 200
    assert "with something that is not a model list" in response.content.decode()
    assert tracebacks(logs) == []


# ---- wrong types, odd numbers, odd bodies ------------------------------------------------

BAD_BODIES = [
    # (url, raw body, content type, field named or None, sentence)
    ("/api/llm/chat", '{"model": "m", "messages": [], "temperature": 1e999}', "temperature", ""),
    ("/api/llm/chat", '{"model": "m", "messages": [], "temperature": -1e999}', "temperature", ""),
    ("/api/llm/chat", '{"model": "m", "temperature": ' + "1" + "0" * 400 + "}", "temperature", ""),
    ("/api/llm/chat", '{"model": "m", "max_tokens": ' + "9" * 400 + "}", "max_tokens", ""),
    ("/api/llm/chat", '{"model": "m", "max_tokens": ' + "9" * 5000 + "}", "max_tokens", ""),
    ("/api/llm/chat", '{"model": "m", "max_tokens": -' + "9" * 5000 + "}", "max_tokens", ""),
    ("/api/llm/chat", '{"model": "m", "max_tokens": 1' + "0" * 5000 + ".5}", "max_tokens", ""),
    ("/api/llm/chat", '{"model": "m", "max_tokens": 1e308}', "max_tokens", ""),
    ("/api/llm/chat", '{"model": "m", "temperature": NaN}', None, "NaN"),
    ("/api/llm/chat", '{"model": "m", "temperature": Infinity}', None, "Infinity"),
    ("/api/llm/chat", '{"model": "m", "temperature": -Infinity}', None, "Infinity"),
    ("/api/llm/chat", '{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model", ""),
    ("/api/llm/chat", '{"model": ["m"], "messages": []}', "model", ""),
    ("/api/llm/chat", '{"model": {"a": 1}, "messages": {}}', "model", ""),
    (
        "/api/llm/chat",
        '{"model": "m", "messages": [{"role": ["user"], "content": "x"}]}',
        "messages",
        "",
    ),
    ("/api/llm/chat", '{"model": "m", "messages": [{"role": {}, "content": "x"}]}', "messages", ""),
    (
        "/api/llm/chat",
        '{"model": "m", "messages": [{"role": "user", "content": null}]}',
        "messages",
        "",
    ),
    ("/api/llm/chat", '{"model": "m", "messages": [null]}', "messages", ""),
    ("/api/llm/chat", '{"model": "m", "messages": "hello"}', "messages", ""),
    ("/api/llm/chat", '{"model": "m", "messages": [], "stream": "true"}', "stream", ""),
    ("/api/llm/chat", '{"model": "m", "messages": [], "credential": ["x"]}', "credential", ""),
    ("/api/llm/chat", '{"model": "m", "messages": [], "credential": {"id": 1}}', "credential", ""),
    ("/api/llm/chat", '{"model": "m", "messages": [], "credential": 1e999}', "credential", ""),
    ("/api/llm/chat", '{"model": "m", "messages": [], "credential": true}', "credential", ""),
    ("/api/llm/chat", '{"model": "' + "m" * 201 + '", "messages": []}', "model", ""),
    ("/api/llm/chat", '{"model": "m", "model": 5}', "model", ""),
    ("/api/llm/embeddings", '{"model": "m", "input": [["a"]]}', "input", ""),
    ("/api/llm/embeddings", '{"model": "m", "input": {"a": "b"}}', "input", ""),
    ("/api/llm/embeddings", '{"model": "m", "input": [null]}', "input", ""),
    ("/api/llm/embeddings", '{"model": "m", "input": 1e999}', "input", ""),
    ("/llm/send", '{"purpose": ["chat"], "model": "m", "prompt": "x"}', "purpose", ""),
    ("/llm/send", '{"purpose": {"a": 1}, "model": "m", "prompt": "x"}', "purpose", ""),
    ("/llm/send", '{"purpose": "chat", "model": "m", "prompt": {"a": 1}}', "prompt", ""),
    ("/llm/send", '{"purpose": "chat", "model": "m", "prompt": ["x"]}', "prompt", ""),
    ("/llm/send", '{"purpose": "embeddings", "model": 7, "prompt": "x"}', "model", ""),
    (
        "/llm/send",
        '{"purpose": "code", "model": "m", "prompt": "x", "temperature": 1e999}',
        "temperature",
        "",
    ),
    (
        "/llm/send",
        '{"purpose": "chat", "model": "m", "prompt": "x", "max_tokens": ' + "9" * 400 + "}",
        "max_tokens",
        "",
    ),
]


@pytest.mark.parametrize(
    ("url", "raw", "field", "sentence"),
    [pytest.param(*case, id=f"{case[0]} {case[1][:60]}") for case in BAD_BODIES],
)
def test_wrong_types_and_odd_numbers_answer_400(api, global_route, logs, url, raw, field, sentence):
    response = post_raw(api, url, raw)

    assert response.status_code == 400, response.content[:500]
    error = response.json()["error"]
    assert error["type"] == "InvalidRequest"
    if field is not None:
        assert field in error["fields"], error
    assert sentence in error["message"]
    assert global_route.requests == []
    assert tracebacks(logs) == []


@pytest.mark.parametrize("url", POSTS)
@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        pytest.param(b"", "application/json", id="empty"),
        pytest.param(b"\xff\xfe\xfa", "application/json", id="not UTF-8"),
        pytest.param(b'{"model": "\xff"}', "application/json", id="not UTF-8 in a string"),
        pytest.param(b"\xef\xbb\xbf{}", "application/json", id="a byte order mark"),
        pytest.param(b"null", "application/json", id="null"),
        pytest.param(b"5", "application/json", id="a number"),
        pytest.param(b"[]", "application/json", id="an array"),
        pytest.param(b'"text"', "application/json", id="a string"),
        pytest.param(b"{} {}", "application/json", id="two objects"),
        pytest.param(b"model=m&prompt=x", "application/x-www-form-urlencoded", id="a form"),
        pytest.param(b"hello", "text/plain", id="plain text"),
        pytest.param(
            b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\nm\r\n--b--\r\n",
            "multipart/form-data; boundary=b",
            id="multipart",
        ),
        pytest.param(b"--b\r\ngarbage", "multipart/form-data; boundary=b", id="bad multipart"),
        pytest.param(b"{}", "multipart/form-data", id="multipart without boundary"),
    ],
)
def test_a_body_that_is_not_a_json_object_answers_400(
    api, global_route, logs, url, raw, content_type
):
    response = post_raw(api, url, raw, content_type)

    assert response.status_code == 400, response.content[:500]
    assert response.json()["error"]["type"] == "InvalidRequest"
    assert global_route.requests == []
    assert tracebacks(logs) == []


@pytest.mark.parametrize("url", POSTS)
@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        pytest.param(b"model=m&prompt=x", "application/x-www-form-urlencoded", id="a form"),
        pytest.param(
            b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\nm\r\n--b--\r\n",
            "multipart/form-data; boundary=b",
            id="multipart",
        ),
        pytest.param(b"--b\r\ngarbage", "multipart/form-data; boundary=b", id="bad multipart"),
        pytest.param(b'{"model": "m"}', "multipart/form-data", id="multipart without boundary"),
        pytest.param(
            b"&".join([b"a=1"] * 2000), "application/x-www-form-urlencoded", id="2000 fields"
        ),
    ],
)
def test_with_csrf_checks_a_form_body_answers_json_too(
    alice, global_route, logs, url, raw, content_type
):
    """The CSRF check reads a form body's fields: the body must still be readable after."""
    strict = Client(enforce_csrf_checks=True, raise_request_exception=False)
    strict.force_login(alice)
    strict.get("/llm/")  # sets the csrftoken cookie
    token = strict.cookies["csrftoken"].value

    response = strict.post(url, data=raw, content_type=content_type, headers={"X-CSRFToken": token})
    no_token = strict.post(url, data=raw, content_type=content_type)

    assert response.status_code == 400, response.content[:500]
    assert response.json()["error"]["type"] == "InvalidRequest"
    if b"a=1&a=1" in raw:  # too many fields to look for a token among: refused unread
        assert no_token.status_code == 400, no_token.content[:500]
    else:
        assert no_token.status_code == 403, no_token.content[:500]
        assert no_token.json()["error"]["type"] == "CSRFFailed"
    assert global_route.requests == []
    assert tracebacks(logs) == []


def test_usage_is_still_recorded_after_bad_input(api, credential, costly, settings):
    """A final, valid call goes through and is recorded after a burst of bad input."""
    from llm.models import UsageRecord

    settings.LLM_USAGE_FLUSH_SECONDS = 0
    for raw in [nested(DEEP), with_lone("/api/llm/chat", "model"), '{"temperature": NaN}']:
        assert post_raw(api, "/api/llm/chat", raw).status_code == 400

    response = post_raw(api, "/api/llm/chat", json.dumps(body_for("/api/llm/chat", credential)))

    assert response.status_code == 200
    assert UsageRecord.objects.filter(outcome="ok", model=MODEL).count() == 1
