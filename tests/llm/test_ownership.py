"""Who sees and uses which credential: alice's own and the shared ones, never bob's.

A credential alice may not use (bob's, an inactive or expired one, an id that is not
even a uuid) is answered exactly like one that does not exist, and nothing reaches the
upstream.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from django.contrib.auth.models import AnonymousUser
from django.utils import timezone

from credentials.models import PLATFORM, APIKeyCredentials
from credentials.selectors import usable_credential, usable_credentials
from llm import services
from llm.errors import CredentialUnavailable
from llm.models import PlaygroundChoice, UsageRecord
from tests.conftest import FAKE_KEY

MODEL = "gpt-test-mini"


class Options(HTMLParser):
    """The <option>s of the <select id=...> of a page: (value, text, selected)."""

    def __init__(self, select_id: str) -> None:
        super().__init__()
        self.select_id = select_id
        self.inside = False
        self.current: list[str] | None = None
        self.selected = False
        self.value = ""
        self.options: list[tuple[str, str, bool]] = []

    def handle_starttag(self, tag, attrs):
        found = dict(attrs)
        if tag == "select":
            self.inside = found.get("id") == self.select_id
        elif tag == "option" and self.inside:
            self.value, self.selected, self.current = (
                found.get("value") or "",
                "selected" in found,
                [],
            )

    def handle_data(self, data):
        if self.current is not None:
            self.current.append(data)

    def handle_endtag(self, tag):
        if tag == "option" and self.current is not None:
            self.options.append((self.value, "".join(self.current).strip(), self.selected))
            self.current = None
        elif tag == "select":
            self.inside = False


def options(html: str, select_id: str) -> list[tuple[str, str, bool]]:
    parser = Options(select_id)
    parser.feed(html)
    return parser.options


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob")


@pytest.fixture
def credentials(credential_factory, alice, bob, upstream):
    """Every kind of credential, all pointing at `upstream` with the fake key."""
    past = timezone.now() - timedelta(hours=1)
    future = timezone.now() + timedelta(days=30)
    url = upstream.base_url
    return {
        "own": credential_factory(title="Alice own", owner=alice, base_url=url, provider="openai"),
        "own_later": credential_factory(title="Alice later", owner=alice, expires_at=future),
        "shared": credential_factory(title="Team shared", base_url=url, provider="litellm"),
        "bobs": credential_factory(title="Bob private", owner=bob, base_url=url),
        "inactive": credential_factory(
            title="Alice inactive", owner=alice, base_url=url, is_active=False
        ),
        "expired": credential_factory(
            title="Alice expired", owner=alice, base_url=url, expires_at=past
        ),
        "shared_inactive": credential_factory(title="Shared off", base_url=url, is_active=False),
        "shared_expired": credential_factory(title="Shared expired", base_url=url, expires_at=past),
    }


@pytest.fixture
def as_alice(client, alice):
    client.force_login(alice)
    return client


USABLE = ("own", "own_later", "shared")
UNUSABLE = ("bobs", "inactive", "expired", "shared_inactive", "shared_expired")


def test_it_lists_alices_own_and_shared_credentials_only(as_alice, credentials, upstream, settings):
    settings.OPENAI_BASE_URL = "https://default.example/v1"

    response = as_alice.get("/api/llm/credentials")

    assert response.status_code == 200
    listed = response.json()["credentials"]
    host = f"127.0.0.1:{upstream.port}"
    hint = FAKE_KEY[-4:]
    assert sorted(listed, key=lambda c: c["title"]) == [
        {
            "id": str(credentials["own_later"].pk),
            "title": "Alice later",
            "provider": "litellm",
            "host": "default.example",
            "key_hint": hint,
            "shared": False,
        },
        {
            "id": str(credentials["own"].pk),
            "title": "Alice own",
            "provider": "openai",
            "host": host,
            "key_hint": hint,
            "shared": False,
        },
        {
            "id": str(credentials["shared"].pk),
            "title": "Team shared",
            "provider": "litellm",
            "host": host,
            "key_hint": hint,
            "shared": True,
        },
    ]
    assert FAKE_KEY not in response.content.decode()
    for credential in listed:
        assert all(FAKE_KEY not in str(value) for value in credential.values())


def test_bob_sees_his_own_and_the_shared_one_not_alices(client, bob, credentials):
    client.force_login(bob)

    titles = {c["title"] for c in client.get("/api/llm/credentials").json()["credentials"]}

    assert titles == {"Bob private", "Team shared"}


def test_the_playground_offers_alices_usable_credentials_only(as_alice, credentials, upstream):
    response = as_alice.get("/llm/")

    assert response.status_code == 200
    html = response.content.decode()
    offered = options(html, "credential")
    host = f"127.0.0.1:{upstream.port}"
    hint = FAKE_KEY[-4:]
    by_value = {value: text for value, text, _ in offered}
    assert set(by_value) == {str(credentials[name].pk) for name in USABLE}
    assert by_value[str(credentials["own"].pk)] == f"Alice own · openai · {host} · …{hint}"
    assert by_value[str(credentials["shared"].pk)] == f"Team shared · litellm · {host} · …{hint}"
    for name in UNUSABLE:
        assert str(credentials[name].pk) not in html
        assert credentials[name].title not in html
    assert FAKE_KEY not in html


def post_json(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


def attempts(credential_id: str) -> dict[str, dict[str, object]]:
    """The same request to each endpoint that takes a credential."""
    return {
        "/api/llm/chat": {
            "credential": credential_id,
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
        },
        "/api/llm/embeddings": {"credential": credential_id, "model": MODEL, "input": "hi"},
        "/llm/send": {
            "credential": credential_id,
            "purpose": "chat",
            "model": MODEL,
            "prompt": "hi",
        },
    }


@pytest.mark.parametrize("which", [*UNUSABLE, "not-a-uuid"])
def test_a_credential_alice_may_not_use_is_answered_like_a_missing_one(
    as_alice, credentials, upstream, which
):
    credential_id = which if which == "not-a-uuid" else str(credentials[which].pk)
    missing = attempts(str(uuid.uuid4()))

    for url, body in attempts(credential_id).items():
        response = post_json(as_alice, url, body)
        nonexistent = post_json(as_alice, url, missing[url])

        assert response.status_code == 404, (url, response.content)
        assert nonexistent.status_code == 404
        assert response.content == nonexistent.content
        assert response.json()["error"]["type"] == "LLMError"
        assert "No such credential" in response.json()["error"]["message"]
        assert response["Content-Type"] == nonexistent["Content-Type"]
    models = as_alice.get("/api/llm/models", {"credential": credential_id})
    assert models.status_code == 404
    assert models.content == as_alice.get("/api/llm/models", {"credential": uuid.uuid4()}).content
    assert upstream.requests == []
    assert not UsageRecord.objects.exists()
    assert not PlaygroundChoice.objects.exists()


def test_alice_can_use_her_own_and_the_shared_credential(as_alice, credentials, upstream):
    for name in ("own", "shared"):
        body = attempts(str(credentials[name].pk))["/api/llm/chat"]
        response = post_json(as_alice, "/api/llm/chat", body)
        assert response.status_code == 200, response.content
        assert response.json()["text"] == "echo: hi"
    assert len(upstream.requests) == 2


def test_the_selectors_offer_nothing_to_anonymous_users(credentials, alice):
    assert list(usable_credentials(AnonymousUser())) == []
    assert list(usable_credentials(None)) == []
    assert usable_credential(AnonymousUser(), credentials["shared"].pk) is None
    assert {c.title for c in usable_credentials(alice)} == {
        "Alice own",
        "Alice later",
        "Team shared",
    }


# ---- one rule, for the query and the instance --------------------------------------------


@pytest.mark.parametrize("who", ["alice", "bob", "anonymous", "nobody", "platform", "inactive"])
def test_the_query_and_the_instance_agree_on_who_may_use_what(
    credentials, alice, bob, django_user_model, who
):
    user = {
        "alice": alice,
        "bob": bob,
        "anonymous": AnonymousUser(),
        "nobody": None,
        "platform": PLATFORM,
        "inactive": django_user_model.objects.create_user("carol", is_active=False),
    }[who]

    by_query = set(APIKeyCredentials.objects.usable_by(user))
    by_instance = {c for c in APIKeyCredentials.objects.all() if c.unusable_by(user) is None}

    assert by_query == by_instance
    if who == "platform":
        assert {c.title for c in by_query} == {
            "Alice own",
            "Alice later",
            "Team shared",
            "Bob private",
        }


def test_a_service_refuses_someone_elses_credential_without_an_explicit_opt_out(
    credentials, alice, upstream
):
    bobs = credentials["bobs"]
    hello = [{"role": "user", "content": "hi"}]

    for user in (alice, None):  # for alice; for nobody (the argument forgotten)
        with pytest.raises(CredentialUnavailable) as refused:
            services.chat(messages=hello, model=MODEL, credential=bobs, user=user)
        assert refused.value.reason == "not_yours"
    assert upstream.requests == []

    # The platform's own call says so where it is made.
    result = services.chat(messages=hello, model=MODEL, credential=bobs, user=PLATFORM)

    assert result.text == "echo: hi"
    assert len(upstream.requests) == 1


def test_the_platform_may_not_use_an_inactive_credential_either(credentials, upstream):
    with pytest.raises(CredentialUnavailable) as refused:
        services.embed(texts=["hi"], model=MODEL, credential=credentials["inactive"], user=PLATFORM)

    assert refused.value.reason == "inactive"
    assert upstream.requests == []
