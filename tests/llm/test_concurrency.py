"""Many callers at once, ten keys, one server: every request carries the right key.

The server can tell the credentials apart only by the Authorization header, so a client
shared between routes, or a key crossing threads or tasks, shows up as a request whose
body names one credential and whose header carries another's key.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections

from credentials.models import PLATFORM, APIKeyCredentials
from llm.services import achat, chat

MODEL = "gpt-test-mini"
CREDENTIALS = 10
NAMED = re.compile(r"from (Concurrent \d+) call")


def key_of(index: int) -> str:
    return f"sk-test-fake-concurrent-{index:02d}-{'x' * index}"


@pytest.fixture
def credentials(transactional_db, upstream):
    """Ten credentials with ten keys, all pointing at the one `upstream`."""
    made = []
    for index in range(CREDENTIALS):
        credential = APIKeyCredentials(
            title=f"Concurrent {index:02d}", base_url=upstream.base_url, api_key=key_of(index)
        )
        credential.full_clean()
        credential.save()
        made.append(credential)
    return made


def keys_by_title(credentials: list[APIKeyCredentials]) -> dict[str, str]:
    return {c.title: f"Bearer {key_of(i)}" for i, c in enumerate(credentials)}


def title_named_in(request) -> str:
    """The credential title the request's message names."""
    named = NAMED.match(request.body["messages"][0]["content"])
    assert named is not None, request.body
    return named.group(1)


def assert_every_request_carried_its_credentials_key(upstream, credentials, calls: int) -> None:
    expected = keys_by_title(credentials)
    assert len(upstream.requests) == calls
    wrong = [
        (title_named_in(request), request.authorization)
        for request in upstream.requests
        if request.authorization != expected[title_named_in(request)]
    ]
    assert wrong == []
    assert {title_named_in(request) for request in upstream.requests} == set(expected)


def test_it_keeps_keys_apart_across_50_threads(credentials, upstream):
    pks = [c.pk for c in credentials]
    per_thread = 4

    def work(thread: int) -> list[tuple[str, str]]:
        try:
            answers = []
            for call in range(per_thread):
                number = thread * per_thread + call
                credential = APIKeyCredentials.objects.get(pk=pks[number % CREDENTIALS])
                content = f"from {credential.title} call {number}"
                result = chat(
                    messages=[{"role": "user", "content": content}],
                    model=MODEL,
                    credential=credential,
                    user=PLATFORM,
                )
                answers.append((result.text, content))
            return answers
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = [answer for batch in pool.map(work, range(50)) for answer in batch]

    assert len(results) == 50 * per_thread
    assert all(text == f"echo: {content}" for text, content in results)
    assert_every_request_carried_its_credentials_key(upstream, credentials, 50 * per_thread)
    touched = APIKeyCredentials.objects.filter(pk__in=pks, last_used_at__isnull=False)
    assert touched.count() == CREDENTIALS


def test_it_keeps_keys_apart_across_200_tasks(credentials, upstream):
    async def one(number: int) -> tuple[str, str]:
        credential = credentials[number % CREDENTIALS]
        content = f"from {credential.title} call {number}"
        result = await achat(
            messages=[{"role": "user", "content": content}],
            model=MODEL,
            credential=credential,
            user=PLATFORM,
        )
        return result.text, content

    async def main() -> list[tuple[str, str]]:
        try:
            return await asyncio.gather(*(one(number) for number in range(200)))
        finally:
            # Usage records were written from asgiref's thread: close its connection.
            await sync_to_async(connections.close_all)()

    results = asyncio.run(main())

    assert len(results) == 200
    assert all(text == f"echo: {content}" for text, content in results)
    assert_every_request_carried_its_credentials_key(upstream, credentials, 200)
    touched = APIKeyCredentials.objects.filter(
        pk__in=[c.pk for c in credentials], last_used_at__isnull=False
    )
    assert touched.count() == CREDENTIALS
