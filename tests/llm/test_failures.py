"""Every way a call to an LLM can fail, as the user sees it, for sync and async services.

Each failure is one LLMError subclass with the status a view answers with, a sentence
naming the credential and the host as configured, and never the API key: not in the
message, the repr, the traceback, nor any log record down to DEBUG.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from cryptography.fernet import Fernet
from django.utils import timezone

from credentials.models import PLATFORM, APIKeyCredentials
from llm import services
from llm.errors import (
    CredentialRejected,
    CredentialUnavailable,
    LLMError,
    ModelNotAllowed,
    ModelNotFound,
    ProxyUnreachable,
    RateLimited,
    UnsendableRequest,
    UpstreamError,
)
from tests.upstream import free_port

LEAK_KEY = "sk-test-fake-LEAKCHECK-9f8e7d6c5b4a"
TITLE = "Team proxy"
WHO = f"credential {TITLE!r}"
NOISY_LOGGERS = ("openai", "httpx2", "httpcore2", "aiohttp", "asyncio")
SERVICES = ["chat", "generate_code", "embed", "achat", "aembed"]
ASYNC = {"achat", "aembed"}
MESSAGES = [{"role": "user", "content": "hello"}]
IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")


def call(service, *, model="gpt-test-mini", **kwargs):
    """Run one service as its callers do: async ones on their own loop."""
    if service == "chat":
        return services.chat(messages=MESSAGES, model=model, **kwargs)
    if service == "generate_code":
        return services.generate_code(prompt="fizzbuzz in one line", model=model, **kwargs)
    if service == "embed":
        return services.embed(texts=["hello"], model=model, **kwargs)
    if service == "list_models":
        return services.list_models(**kwargs)

    async def run():
        if service == "achat":
            return await services.achat(messages=MESSAGES, model=model, **kwargs)
        if service == "alist_models":
            return await services.alist_models(**kwargs)
        return await services.aembed(texts=["hello"], model=model, **kwargs)

    return async_to_sync(run)()


def failure(service, **kwargs) -> LLMError:
    with pytest.raises(LLMError) as caught:
        call(service, **kwargs)
    return caught.value


def places_showing(key, error, caplog) -> list[str]:
    """Where a user or an operator could read `key`: the error, its traceback, the logs."""
    texts = {
        "str": str(error),
        "repr": repr(error),
        "traceback": "".join(traceback.format_exception(error)),
    }
    for number, record in enumerate(caplog.records):
        text = record.getMessage() + (record.exc_text or "") + (record.stack_info or "")
        if record.exc_info and record.exc_info[1] is not None:
            text += "".join(traceback.format_exception(record.exc_info[1]))
        texts[f"log record {number} ({record.name})"] = text
    return [place for place, text in texts.items() if key in text]


def assert_names_host_only(error, host):
    assert host in error.message
    assert set(IPV4.findall(error.message)) <= {host.split(":")[0]}


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)
    for name in NOISY_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.fixture
def credential(credential_factory, upstream):
    """A credential for `upstream` with a distinctive key, as a request would load it."""
    made = credential_factory(title=TITLE, api_key=LEAK_KEY, base_url=upstream.base_url)
    return APIKeyCredentials.objects.get(pk=made.pk)


# ---- the upstream answers, badly -------------------------------------------------------

SCRIPTED: dict[str, tuple[dict[str, Any], type[LLMError], int, list[str]]] = {
    "401": (
        {"status": 401, "body": {"error": {"message": "invalid api key"}}},
        CredentialRejected,
        403,
        [WHO, "rejected the key", "(401)", "the key does not match", "invalid api key"],
    ),
    "403": (
        {"status": 403, "body": {"error": {"message": "key not allowed"}}},
        CredentialRejected,
        403,
        [WHO, "rejected the key", "(403)", "not allowed to do this", "key not allowed"],
    ),
    "403, model not for this key": (
        {
            "status": 403,
            "body": {"error": {"message": "not for you", "type": "key_model_access_denied"}},
        },
        ModelNotAllowed,
        403,
        [WHO, "does not let", "use the model 'gpt-nope' (403)", "/models lists", "not for you"],
    ),
    "401, model not for this key (older LiteLLM)": (
        {
            "status": 401,
            "body": {
                "error": {
                    "message": "key not allowed to access model. This key can only access "
                    "models=['gpt-4o']. Tried to access gpt-nope",
                    "type": "auth_error",
                }
            },
        },
        ModelNotAllowed,
        403,
        [WHO, "does not let", "use the model 'gpt-nope' (401)"],
    ),
    "404": (
        {"status": 404, "body": {"error": {"message": "model gpt-nope not found"}}},
        ModelNotFound,
        400,
        [WHO, "The model 'gpt-nope' is not available", "model gpt-nope not found"],
    ),
    "429 with Retry-After": (
        {"status": 429, "headers": {"Retry-After": "7"}},
        RateLimited,
        429,
        [WHO, "rate limiting", "(429)", "Try again in 7 s."],
    ),
    "429 without Retry-After": (
        {"status": 429, "body": {"error": {"message": "slow down"}}},
        RateLimited,
        429,
        [WHO, "rate limiting", "(429)", "slow down"],
    ),
    "500": (
        {"status": 500, "body": {"error": {"message": "database on fire"}}},
        UpstreamError,
        502,
        [WHO, "answered 500", 'It said: "database on fire"'],
    ),
    "503": (
        {"status": 503, "body": {"error": {"message": "no healthy deployments"}}},
        UpstreamError,
        502,
        [WHO, "is unavailable (503)", 'It said: "no healthy deployments"'],
    ),
    "dropped connection": (
        {"mode": "drop"},
        UpstreamError,
        502,
        [WHO, "closed the connection"],
    ),
    "garbage": (
        {"mode": "garbage"},
        UpstreamError,
        502,
        ["not an OpenAI-compatible response"],
    ),
}


def cases():
    """Every (scenario, service) pair."""
    return [
        pytest.param(scenario, service, id=f"{scenario}-{service}")
        for scenario in SCRIPTED
        for service in SERVICES
    ]


@pytest.mark.parametrize(("scenario", "service"), cases())
def test_it_maps_each_upstream_failure_to_a_sentence(scenario, service, upstream, credential, logs):
    behaviour, kind, status, fragments = SCRIPTED[scenario]
    upstream.respond(**behaviour)

    error = failure(service, credential=credential, user=PLATFORM, model="gpt-nope")

    assert type(error) is kind
    assert error.status == status
    for fragment in fragments:
        assert fragment in error.message
    assert_names_host_only(error, f"127.0.0.1:{upstream.port}")
    if isinstance(error, RateLimited):
        assert error.retry_after == (7 if "Retry-After" in behaviour.get("headers", {}) else None)
    assert len(upstream.requests) == 1
    assert upstream.requests[0].authorization == f"Bearer {LEAK_KEY}"
    assert places_showing(LEAK_KEY, error, logs) == []
    assert any(record.name.startswith("openai") for record in logs.records)


@pytest.mark.parametrize("service", SERVICES)
def test_it_names_the_credential_when_the_answer_is_not_json(service, upstream, credential):
    upstream.respond(mode="garbage")

    error = failure(service, credential=credential, user=PLATFORM)

    assert type(error) is UpstreamError
    assert WHO in error.message


@pytest.mark.parametrize("service", [*SERVICES, "list_models", "alist_models"])
@pytest.mark.parametrize(
    "body",
    [
        pytest.param("<html><body>Sign in</body></html>", id="HTML"),
        pytest.param("", id="empty"),
        pytest.param([], id="a list"),
        pytest.param(None, id="null"),
        pytest.param({"data": [{"object": "model"}], "choices": [{"message": 5}]}, id="odd"),
        pytest.param("[" * 100_000, id="nested too deeply"),
    ],
)
def test_an_answer_of_the_wrong_shape_is_an_upstream_error(
    service, body, upstream, credential, logs
):
    """Whatever the SDK raises reading it (not only OpenAIError) leaves as the sentence."""
    upstream.respond(mode="verbatim", body=body)

    error = failure(service, credential=credential, user=PLATFORM)

    assert type(error) is UpstreamError
    assert error.status == 502
    assert error.fault == "malformed"
    assert f"not an OpenAI-compatible response, for {WHO}" in error.message
    assert places_showing(LEAK_KEY, error, logs) == []


def test_a_probe_reports_an_answer_of_the_wrong_shape(upstream, credential):
    upstream.respond(mode="verbatim", body="<html><body>Sign in</body></html>")

    (result,) = services.probe([credential])

    assert result.error is not None
    assert "not an OpenAI-compatible response" in result.error
    assert result.models == ()


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize(
    ("where", "sentence"),
    [
        pytest.param("model", "lone UTF-16 surrogate (\\ud800)", id="surrogate in the model"),
        pytest.param("text", "lone UTF-16 surrogate (\\udfff)", id="surrogate in the text"),
        pytest.param("nested", "nested too deeply", id="nested too deeply"),
    ],
)
def test_a_request_the_sdk_cannot_encode_is_refused_unsent(
    service, where, sentence, upstream, credential
):
    """The API refuses such input itself (llm.requests); a caller in code gets a 400
    error that blames the request, not the proxy."""
    model, text = "gpt-test-mini", "hello"
    if where == "model":
        model = "gpt-\ud800"
    elif where == "text":
        text = "hello \udfff"
    else:
        deep: Any = "hello"
        for _ in range(5000):
            deep = [deep]
        text = deep
    if service in {"chat", "achat"}:
        messages = [{"role": "user", "content": text}]
        error = failure_with(service, credential, messages=messages, model=model)
    elif service == "generate_code":
        error = failure_with(service, credential, prompt=text, model=model)
    else:
        error = failure_with(service, credential, texts=[text], model=model)

    assert type(error) is UnsendableRequest
    assert error.status == 400
    assert sentence in error.message
    assert WHO in error.message
    assert upstream.requests == []


def failure_with(service: str, credential: APIKeyCredentials, **kwargs: Any) -> LLMError:
    """Run `service` with arguments of its own (`call` fixes them) and catch its error."""
    function = getattr(services, service)
    run = async_to_sync(function) if service in ASYNC else function
    with pytest.raises(LLMError) as caught:
        run(credential=credential, user=PLATFORM, **kwargs)
    return caught.value


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, CredentialRejected), (404, ModelNotFound), (429, RateLimited), (500, UpstreamError)],
)
def test_it_scrubs_a_key_the_upstream_echoes_back(
    service, status, kind, upstream, credential, logs
):
    # A careless proxy quotes the key it was sent in its error message.
    upstream.respond(status=status, body={"error": {"message": f"invalid key {LEAK_KEY}"}})

    error = failure(service, credential=credential, user=PLATFORM)

    assert type(error) is kind
    assert 'It said: "invalid key [key]"' in error.message
    assert upstream.requests[0].authorization == f"Bearer {LEAK_KEY}"
    assert places_showing(LEAK_KEY, error, logs) == []
    assert any(record.name.startswith("openai") for record in logs.records)


# ---- the upstream does not answer ------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_it_reports_a_closed_port_as_unreachable(service, credential_factory, logs):
    port = free_port()
    credential = credential_factory(
        title=TITLE, api_key=LEAK_KEY, base_url=f"http://127.0.0.1:{port}/v1"
    )

    error = failure(service, credential=credential, user=PLATFORM)

    assert type(error) is ProxyUnreachable
    assert error.status == 502
    for fragment in (f"127.0.0.1:{port}", WHO, "connection refused", "curl"):
        assert fragment in error.message
    assert_names_host_only(error, f"127.0.0.1:{port}")
    assert places_showing(LEAK_KEY, error, logs) == []


@pytest.mark.parametrize("service", sorted(ASYNC))
@pytest.mark.parametrize("how", ["closed port", "dropped connection"])
def test_it_keeps_the_key_out_of_async_connection_failures(
    service, how, upstream, credential_factory, logs
):
    """The aiohttp transport reports both as a connect timeout; the mapping sees through it."""
    base_url = f"http://127.0.0.1:{free_port()}/v1" if how == "closed port" else upstream.base_url
    credential = credential_factory(title=TITLE, api_key=LEAK_KEY, base_url=base_url)
    upstream.respond(mode="drop")

    error = failure(service, credential=credential, user=PLATFORM)

    assert error.status == 502
    expected = "connection refused" if how == "closed port" else "closed the connection"
    assert expected in error.message
    assert WHO in error.message
    assert_names_host_only(error, base_url.split("/")[2])
    assert places_showing(LEAK_KEY, error, logs) == []


@pytest.mark.parametrize("service", SERVICES)
def test_it_gives_up_on_a_silent_upstream_within_the_time_budget(
    service, settings, upstream, credential, logs
):
    settings.LLM_TIMEOUT_SECONDS = 1
    upstream.respond(mode="hang")

    started = time.monotonic()
    error = failure(service, credential=credential, user=PLATFORM)
    elapsed = time.monotonic() - started

    assert type(error) is ProxyUnreachable
    assert error.status == 504
    assert "did not answer in time" in error.message
    assert WHO in error.message
    assert_names_host_only(error, f"127.0.0.1:{upstream.port}")
    assert elapsed < 8
    assert len(upstream.requests) == 1
    assert places_showing(LEAK_KEY, error, logs) == []


# ---- no call is made -------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_it_refuses_the_global_default_without_a_key(db, service, settings, upstream, logs):
    # Embeddings use the internal default. The other default's key is set: it must not show.
    missing, other = ("OPENAI_API_KEY", "OPENAI_INTERNAL_API_KEY")
    if service.endswith("embed"):
        missing, other = other, missing
    settings.OPENAI_BASE_URL = settings.OPENAI_INTERNAL_BASE_URL = upstream.base_url
    setattr(settings, missing, "")
    setattr(settings, other, LEAK_KEY)

    error = failure(service)

    assert type(error) is CredentialUnavailable
    assert (error.status, error.reason) == (503, "no_default_key")
    assert f"{missing} is not set" in error.message
    assert upstream.requests == []
    assert places_showing(LEAK_KEY, error, logs) == []


@pytest.mark.parametrize("service", SERVICES)
def test_it_refuses_a_base_url_the_policy_no_longer_allows(
    service, settings, upstream, credential, logs
):
    settings.LLM_ALLOWED_BASE_URL_HOSTS = ["only-this-host"]

    error = failure(service, credential=credential, user=PLATFORM)

    assert type(error) is CredentialUnavailable
    assert error.reason == "base_url_refused"
    assert WHO in error.message
    assert "LLM_ALLOWED_BASE_URL_HOSTS" in error.message
    assert upstream.requests == []
    assert places_showing(LEAK_KEY, error, logs) == []


def make_inactive(credential, **_):
    credential.is_active = False
    credential.save()
    return credential, {}


def make_expired(credential, **_):
    credential.expires_at = timezone.now() - timedelta(minutes=1)
    credential.save()
    return credential, {}


def make_foreign(credential, django_user_model, **_):
    bob = django_user_model.objects.create_user("bob", password="unused-password-1")
    alice = django_user_model.objects.create_user("alice", password="unused-password-2")
    credential.owner = bob
    credential.save()
    return credential, {"user": alice}


def make_undecryptable(credential, settings, **_):
    settings.CREDENTIALS_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    return APIKeyCredentials.objects.get(pk=credential.pk), {}


UNUSABLE: dict[str, tuple[Any, int, bool]] = {
    "inactive": (make_inactive, 403, True),
    "expired": (make_expired, 403, True),
    "not_yours": (make_foreign, 404, False),
    "undecryptable": (make_undecryptable, 503, True),
}


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("reason", UNUSABLE)
def test_it_makes_no_call_with_an_unusable_credential(
    service, reason, settings, django_user_model, upstream, credential, logs
):
    make, status, names_title = UNUSABLE[reason]
    credential, extra = make(credential, settings=settings, django_user_model=django_user_model)

    error = failure(service, credential=credential, **{"user": PLATFORM, **extra})

    assert type(error) is CredentialUnavailable
    assert (error.reason, error.status) == (reason, status)
    assert (TITLE in error.message) is names_title
    assert upstream.requests == []
    assert places_showing(LEAK_KEY, error, logs) == []
