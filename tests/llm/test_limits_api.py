"""Spend control as API callers see it: allowed models, budgets and the platform's rate
limits, refused before anything reaches the upstream (tests/upstream.py records all
it is sent), and GET /api/llm/budget.

The spend counters live in the cache (Redis when CACHE_URL says so, else this process's
own); their keys hold the credential's id, which no other test shares.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client

COST = "0.003"
MODELS = ["gpt-test-mini", "gpt-test-large", "embed-test", "embed-test-v2", "openai/gpt-4o"]


def post_json(client: Client, url: str, body: Any) -> Any:
    return client.post(url, data=json.dumps(body), content_type="application/json")


def chat(client: Client, credential: Any, model: str = "gpt-test-mini") -> Any:
    body = {
        "credential": str(credential.pk),
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
    }
    return post_json(client, "/api/llm/chat", body)


def send_streamed(user: Any, body: dict[str, Any]) -> tuple[Any, bytes]:
    """The playground's send, as the page posts it, read to its end on the view's loop."""

    async def main() -> tuple[Any, bytes]:
        client = AsyncClient()
        await client.aforce_login(user)
        response: Any = await client.post(
            "/llm/send", data=json.dumps(body), content_type="application/json"
        )
        if response.streaming:
            return response, b"".join([c async for c in response.streaming_content])
        return response, response.content

    return async_to_sync(main)()


def chats(upstream: Any) -> list[Any]:
    return [r for r in upstream.requests if r.path == "/v1/chat/completions"]


def next_month() -> datetime:
    now = datetime.now(UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


def this_month() -> str:
    return f"{datetime.now(UTC):%B %Y}"


def resets() -> str:
    return f"resets on 1 {next_month():%B %Y} at 00:00 UTC"


def budget(client: Client, credential: Any = None) -> Any:
    query = {} if credential is None else {"credential": str(credential.pk)}
    return client.get("/api/llm/budget", query)


@pytest.fixture
def offering(start_upstream):
    return start_upstream(models=MODELS, cost=COST)


# ---- allowed models ------------------------------------------------------------------


def test_the_model_list_shows_only_the_allowed_models(api, alice, credential_factory, offering):
    allowed = credential_factory(
        owner=alice, base_url=offering.base_url, allowed_models=["gpt-test-mini", "embed-*"]
    )
    anything = credential_factory(owner=alice, base_url=offering.base_url)

    listed = api.get("/api/llm/models", {"credential": str(allowed.pk)})
    unlisted = api.get("/api/llm/models", {"credential": str(anything.pk)})

    assert listed.status_code == 200, listed.content
    assert listed.json() == {"models": ["embed-test", "embed-test-v2", "gpt-test-mini"]}
    assert unlisted.json() == {"models": sorted(MODELS)}


def test_a_pattern_matches_slashes_and_nothing_else_is_a_pattern(
    api, alice, credential_factory, offering
):
    allowed = credential_factory(
        owner=alice, base_url=offering.base_url, allowed_models=["openai/*", "gpt-test"]
    )

    listed = api.get("/api/llm/models", {"credential": str(allowed.pk)})

    assert listed.json() == {"models": ["openai/gpt-4o"]}


def test_a_model_off_the_list_is_refused_with_403_before_anything_is_sent(
    api, alice, credential_factory, offering
):
    credential = credential_factory(
        title="Team mini",
        owner=alice,
        base_url=offering.base_url,
        allowed_models=["gpt-test-mini", "embed-*"],
    )

    response = chat(api, credential, model="gpt-test-large")

    assert response.status_code == 403, response.content
    error = response.json()["error"]
    assert error["type"] == "ModelNotAllowed"
    assert "'Team mini'" in error["message"]
    assert "'gpt-test-large'" in error["message"]
    assert "gpt-test-mini, embed-*" in error["message"]
    assert offering.requests == []


def test_the_playground_and_embeddings_are_refused_alike(api, alice, credential_factory, offering):
    credential = credential_factory(
        owner=alice, base_url=offering.base_url, allowed_models=["gpt-test-mini"]
    )
    sends = {
        "/llm/send": {
            "credential": str(credential.pk),
            "purpose": "chat",
            "model": "embed-test",
            "prompt": "hi",
        },
        "/api/llm/embeddings": {
            "credential": str(credential.pk),
            "model": "embed-test",
            "input": "hi",
        },
    }

    for url, body in sends.items():
        response = post_json(api, url, body)
        assert response.status_code == 403, (url, response.content)
        assert response["Content-Type"] == "application/json"
        assert response.json()["error"]["type"] == "ModelNotAllowed"
    assert offering.requests == []


def test_an_allowed_model_is_answered(api, alice, credential_factory, offering):
    credential = credential_factory(
        owner=alice, base_url=offering.base_url, allowed_models=["gpt-test-mini", "embed-*"]
    )

    response = chat(api, credential)

    assert response.status_code == 200, response.content
    assert response.json()["text"] == "echo: hello"


# ---- GET /api/llm/budget ---------------------------------------------------------------


def test_without_a_budget_both_are_null(api, alice, credential_factory, offering):
    credential = credential_factory(owner=alice, base_url=offering.base_url)

    assert budget(api).json() == {"credential": None, "user": None}
    assert budget(api, credential).json() == {"credential": None, "user": None}
    assert api.get("/api/llm/budget", {"credential": ""}).json() == {
        "credential": None,
        "user": None,
    }


def test_it_answers_the_budget_the_cap_and_what_a_call_spent(
    api, alice, credential_factory, offering
):
    credential = credential_factory(
        owner=alice,
        base_url=offering.base_url,
        monthly_budget_usd=Decimal("10"),
        user_monthly_budget_usd=Decimal("1"),
    )
    resets_at = next_month().strftime("%Y-%m-%dT%H:%M:%SZ")

    before = budget(api, credential)
    assert chat(api, credential).status_code == 200
    after = budget(api, credential)

    assert before.status_code == 200, before.content
    assert before.json() == {
        "credential": {
            "budget": "10.00",
            "spent": "0.00",
            "remaining": "10.00",
            "resets_at": resets_at,
        },
        "user": {"budget": "1.00", "spent": "0.00", "remaining": "1.00", "resets_at": resets_at},
    }
    assert after.json() == {
        "credential": {
            "budget": "10.00",
            "spent": "0.003",
            "remaining": "9.997",
            "resets_at": resets_at,
        },
        "user": {"budget": "1.00", "spent": "0.003", "remaining": "0.997", "resets_at": resets_at},
    }


def test_the_cap_alone_leaves_the_credentials_budget_null(api, alice, credential_factory, offering):
    credential = credential_factory(
        owner=alice, base_url=offering.base_url, user_monthly_budget_usd=Decimal("0.50")
    )

    assert chat(api, credential).status_code == 200
    answer = budget(api, credential).json()

    assert answer["credential"] is None
    assert answer["user"]["budget"] == "0.50"
    assert answer["user"]["remaining"] == "0.497"


def test_the_cap_counts_each_users_spend_apart(
    api, alice, django_user_model, credential_factory, offering
):
    shared = credential_factory(
        base_url=offering.base_url,
        monthly_budget_usd=Decimal("10"),
        user_monthly_budget_usd=Decimal("1"),
    )
    bob = Client()
    bob.force_login(django_user_model.objects.create_user("bob"))

    assert chat(api, shared).status_code == 200
    assert chat(api, shared).status_code == 200
    assert chat(bob, shared).status_code == 200

    alices, bobs = budget(api, shared).json(), budget(bob, shared).json()
    assert alices["credential"]["spent"] == bobs["credential"]["spent"] == "0.009"
    assert (alices["user"]["spent"], bobs["user"]["spent"]) == ("0.006", "0.003")


def test_a_credential_the_user_may_not_use_answers_404_like_the_model_list(
    api, django_user_model, credential_factory, offering
):
    bob = django_user_model.objects.create_user("bob")
    bobs = credential_factory(
        owner=bob, base_url=offering.base_url, monthly_budget_usd=Decimal("10")
    )

    for credential_id in (str(bobs.pk), str(uuid.uuid4()), "not-a-uuid"):
        response = api.get("/api/llm/budget", {"credential": credential_id})
        models = api.get("/api/llm/models", {"credential": credential_id})
        assert response.status_code == 404, response.content
        assert response.content == models.content
        assert "No such credential" in response.json()["error"]["message"]
    assert offering.requests == []


def test_a_malformed_id_answers_400_naming_the_field(api, db):
    response = api.get("/api/llm/budget", {"credential": "abc\x00def"})

    assert response.status_code == 400, response.content
    assert response.json()["error"]["type"] == "InvalidRequest"
    assert "credential" in response.json()["error"]["fields"]


def test_signed_out_it_answers_401_and_only_to_get(client, api, db):
    signed_out = client.get("/api/llm/budget")
    posted = api.post("/api/llm/budget")

    assert signed_out.status_code == 401
    assert signed_out.json()["error"]["type"] == "NotAuthenticated"
    assert posted.status_code == 405


# ---- refusals ----------------------------------------------------------------------------


def test_a_spent_budget_answers_402_with_the_spend_and_when_it_resets(
    api, alice, credential_factory, offering
):
    credential = credential_factory(
        title="Team mini",
        owner=alice,
        base_url=offering.base_url,
        monthly_budget_usd=Decimal("0.005"),
    )

    assert chat(api, credential).status_code == 200
    assert chat(api, credential).status_code == 200
    refused = chat(api, credential)

    assert refused.status_code == 402, refused.content
    assert "Retry-After" not in refused
    error = refused.json()["error"]
    assert error["type"] == "BudgetExceeded"
    assert error["message"].startswith(
        f"Credential 'Team mini' has spent $0.006 of its $0.005 budget for {this_month()}; "
        f"it {resets()}."
    )
    assert len(chats(offering)) == 2
    assert budget(api, credential).json()["credential"]["remaining"] == "0.00"


def test_a_spent_cap_answers_402_to_that_user_only(
    api, django_user_model, credential_factory, offering
):
    shared = credential_factory(
        title="Team shared",
        base_url=offering.base_url,
        user_monthly_budget_usd=Decimal("0.003"),
    )
    bob = Client()
    bob.force_login(django_user_model.objects.create_user("bob"))

    assert chat(api, shared).status_code == 200
    refused = chat(api, shared)
    bobs = chat(bob, shared)

    assert refused.status_code == 402, refused.content
    assert refused.json()["error"]["message"].startswith(
        "You have spent $0.003 of your $0.003 monthly cap on credential 'Team shared' for "
        f"{this_month()}; it {resets()}."
    )
    assert bobs.status_code == 200, bobs.content
    assert len(chats(offering)) == 2


def test_a_streamed_send_over_budget_answers_402_json_not_a_stream(
    alice, credential_factory, offering
):
    credential = credential_factory(
        owner=alice, base_url=offering.base_url, monthly_budget_usd=Decimal("0")
    )
    body = {
        "credential": str(credential.pk),
        "purpose": "chat",
        "model": "gpt-test-mini",
        "prompt": "hi",
    }

    response, content = send_streamed(alice, body)

    assert response.status_code == 402
    assert response["Content-Type"] == "application/json"
    assert json.loads(content)["error"]["type"] == "BudgetExceeded"
    assert offering.requests == []


def test_the_platforms_rate_limit_answers_429_with_retry_after_and_never_fails_over(
    api, alice, credential_factory, offering, start_upstream
):
    backup_upstream = start_upstream(cost=COST)
    backup = credential_factory(title="Backup", owner=alice, base_url=backup_upstream.base_url)
    credential = credential_factory(
        title="Team mini",
        owner=alice,
        base_url=offering.base_url,
        requests_per_minute=1,
        fallback=backup,
    )

    assert chat(api, credential).status_code == 200
    refused = chat(api, credential)

    assert refused.status_code == 429, refused.content
    assert refused.json()["error"]["type"] == "RateLimited"
    assert (
        "Credential 'Team mini' allows 1 request per minute" in (refused.json()["error"]["message"])
    )
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert len(chats(offering)) == 1
    assert backup_upstream.requests == []
