"""Load without mix-ups: 200 concurrent API requests through the site served by uvicorn,
across 20 credentials (shared, or owned by one of two users) on 2 upstreams.

The upstreams can tell the credentials apart only by the Authorization header. Each
request names its credential in its model and its prompt, so a client, a key or a route
crossing from one request to another shows up as an upstream request whose body names
one credential and whose header (or upstream) is another's.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from credentials.models import APIKeyCredentials
from tests.conftest import signed_in
from tests.upstream import Recorded, Upstream

REQUESTS = 200
CREDENTIALS = 20
CHAT = "/v1/chat/completions"
NAMED = re.compile(r"load (?P<request>\d{3}) with credential (?P<credential>\d{2})")


@dataclass
class Planned:
    """One API request: who sends it, with which credential, saying what."""

    number: int
    user: Any
    credential: int

    @property
    def model(self) -> str:
        return f"gpt-test-load-{self.credential:02d}"

    @property
    def prompt(self) -> str:
        return f"load {self.number:03d} with credential {self.credential:02d}"


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("KEYROUTE_LOAD_SEED") or random.SystemRandom().randrange(2**32))
    print(f"KEYROUTE_LOAD_SEED={seed}")  # shown with a failure
    return random.Random(seed)


def key_of(index: int) -> str:
    return f"sk-test-fake-load-{index:02d}-{'k' * (index + 1)}"


def make_credentials(
    upstreams: list[Upstream], owners: list[Any]
) -> tuple[list[APIKeyCredentials], dict[int, Upstream]]:
    """20 credentials, each with its own key; even ones on the first upstream, odd ones on
    the second; shared or owned in turn."""
    made, where = [], {}
    for index in range(CREDENTIALS):
        upstream = upstreams[index % len(upstreams)]
        credential = APIKeyCredentials(
            title=f"Load {index:02d}",
            owner=owners[index % len(owners)],
            base_url=upstream.base_url,
            api_key=key_of(index),
        )
        credential.full_clean()
        credential.save()
        made.append(credential)
        where[index] = upstream
    return made, where


def plan(
    credentials: list[APIKeyCredentials], users: list[Any], rng: random.Random
) -> list[Planned]:
    """Ten requests per credential, in random order; a shared credential is used by
    either user, an owned one by its owner."""
    planned = []
    for number in range(REQUESTS):
        index = number % CREDENTIALS
        owner = credentials[index].owner
        planned.append(Planned(number, owner or rng.choice(users), index))
    rng.shuffle(planned)
    return planned


async def send_all(
    base_url: str,
    planned: list[Planned],
    credentials: list[APIKeyCredentials],
    headers: dict[Any, dict[str, str]],
) -> list[tuple[int, Any]]:
    """All requests at once over as many connections, as 200 browsers would; `headers`:
    each user's signed-in browser headers, by pk."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:

        async def send(request: Planned) -> tuple[int, Any]:
            body = {
                "credential": str(credentials[request.credential].pk),
                "model": request.model,
                "messages": [{"role": "user", "content": request.prompt}],
            }
            async with session.post(
                f"{base_url}/api/llm/chat", json=body, headers=headers[request.user.pk]
            ) as answer:
                return answer.status, await answer.json(content_type=None)

        return await asyncio.gather(*(send(request) for request in planned))


def named(recorded: Recorded) -> tuple[int, int]:
    """(request number, credential index) as the upstream request's prompt names them."""
    match = NAMED.fullmatch(recorded.body["messages"][-1]["content"])
    assert match is not None, recorded.body
    return int(match["request"]), int(match["credential"])


def test_200_concurrent_requests_each_reach_their_credentials_upstream_with_its_key(
    start_site, start_upstream, django_user_model, rng
):
    alice = django_user_model.objects.create_user("alice")
    bob = django_user_model.objects.create_user("bob")
    users = [alice, bob]
    upstreams = [start_upstream(), start_upstream()]
    for upstream in upstreams:
        upstream.respond(delay=0.2)  # so that the requests are in flight together
    credentials, upstream_of = make_credentials(upstreams, [None, alice, bob])
    planned = plan(credentials, users, rng)
    site = start_site()

    headers = {user.pk: signed_in(user) for user in users}

    answers = asyncio.run(send_all(site.base_url, planned, credentials, headers))

    # Every caller got its own answer, from its own credential.
    wrong_answers = [
        (request.number, status, answer)
        for request, (status, answer) in zip(planned, answers, strict=True)
        if status != 200
        or answer.get("text") != f"echo: {request.prompt}"
        or answer["route"]["credential"]["id"] != str(credentials[request.credential].pk)
    ]
    assert wrong_answers == []
    # Each upstream saw exactly the requests of its own credentials, each once...
    for upstream in upstreams:
        assert {r.path for r in upstream.requests} == {CHAT}
    seen = [(upstream, r) for upstream in upstreams for r in upstream.requests]
    assert len(seen) == REQUESTS
    assert Counter(named(r)[0] for _, r in seen) == Counter(range(REQUESTS))
    misrouted = [named(r) for upstream, r in seen if upstream_of[named(r)[1]] is not upstream]
    assert misrouted == []
    # ...with that credential's key and model, never another's.
    mixed_up = [
        (named(r), r.body["model"], r.authorization[-6:])
        for _, r in seen
        if r.authorization != f"Bearer {key_of(named(r)[1])}"
        or r.body["model"] != f"gpt-test-load-{named(r)[1]:02d}"
    ]
    assert mixed_up == []
    # They were in flight together, and both users and all twenty credentials took part.
    print("most in flight at each upstream:", [u.most_in_flight for u in upstreams])
    assert all(upstream.most_in_flight > 1 for upstream in upstreams)
    assert {request.user.pk for request in planned} == {alice.pk, bob.pk}
    assert {named(r)[1] for _, r in seen} == set(range(CREDENTIALS))
