"""The client cache: one client per route, rebuilt when a credential changes, bounded.

Clients are real OpenAI SDK clients talking to real loopback servers; what is checked
is what a user or an operator would notice: which key and server a call reaches, how
many connections the server sees, whether an old client's connections were closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ssl
import threading
import time
import uuid

import openai
import pytest
from asgiref.sync import async_to_sync
from cryptography.fernet import Fernet
from django.core.management import call_command

import llm.clients
import llm.services
from credentials.models import PLATFORM, APIKeyCredentials
from credentials.secret import Secret
from llm.clients import ClientCache, cache_stats, get_client, shared_ssl_context
from llm.errors import LLMError
from llm.routes import Route, resolve_route
from llm.services import achat, chat
from tests.conftest import GLOBAL_KEY, TEST_FERNET_KEY

MODEL = "gpt-test-mini"
OLD_KEY = "sk-test-fake-cache-old-1111"
NEW_KEY = "sk-test-fake-cache-new-2222"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def clean_cache():
    """Every test starts with an empty cache and leaves one behind."""
    llm.clients.evict()
    yield
    llm.clients.evict()


def bearer(key: str) -> str:
    return f"Bearer {key}"


def route_to(upstream, key: str) -> Route:
    return Route(
        purpose="chat",
        base_url=upstream.base_url,
        api_key=Secret(key),
        source="credential",
        credential_id=uuid.uuid4(),
    )


def sdk_client(upstream, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=upstream.base_url, max_retries=0)


# ---- one client per route -------------------------------------------------------------


def test_it_reuses_one_client_and_its_connection_for_a_route(credential_factory, upstream):
    credential = credential_factory(base_url=upstream.base_url, api_key=OLD_KEY)
    before = cache_stats()["builds"]

    for number in range(50):
        result = chat(
            messages=[{"role": "user", "content": f"call {number}"}],
            model=MODEL,
            credential=credential,
            user=PLATFORM,
        )
        assert result.text == f"echo: call {number}"

    assert len(upstream.requests) == 50
    assert upstream.connections <= 2
    assert cache_stats()["builds"] - before == 1
    assert cache_stats()["clients"] == 1


def test_it_gives_each_route_its_own_client(credential_factory, upstream):
    first = credential_factory(base_url=upstream.base_url, api_key=OLD_KEY)
    second = credential_factory(base_url=upstream.base_url, api_key=NEW_KEY)

    client_a = get_client(resolve_route("chat", first, user=PLATFORM))
    client_b = get_client(resolve_route("chat", second, user=PLATFORM))

    assert client_a is not client_b
    assert get_client(resolve_route("chat", first, user=PLATFORM)) is client_a
    assert cache_stats()["clients"] == 2


# ---- edits and deletions --------------------------------------------------------------


def test_it_uses_a_new_key_on_the_next_call_after_an_edit(credential_factory, upstream):
    credential = credential_factory(base_url=upstream.base_url, api_key=OLD_KEY)
    chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)
    old_client = get_client(resolve_route("chat", credential, user=PLATFORM))

    credential.api_key = NEW_KEY
    credential.save()
    chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)
    # Another request, another instance: read back from the database.
    chat(
        messages=HELLO,
        model=MODEL,
        credential=APIKeyCredentials.objects.get(pk=credential.pk),
        user=PLATFORM,
    )

    assert [r.authorization for r in upstream.requests] == [
        bearer(OLD_KEY),
        bearer(NEW_KEY),
        bearer(NEW_KEY),
    ]
    assert old_client.is_closed()
    assert cache_stats()["clients"] == 1


def test_it_moves_to_the_new_server_on_the_next_call_after_an_edit(
    credential_factory, start_upstream
):
    old_server, new_server = start_upstream(), start_upstream()
    credential = credential_factory(base_url=old_server.base_url, api_key=OLD_KEY)
    chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)
    old_client = get_client(resolve_route("chat", credential, user=PLATFORM))

    loaded = APIKeyCredentials.objects.get(pk=credential.pk)
    loaded.base_url = new_server.base_url
    loaded.api_key = NEW_KEY
    loaded.full_clean()
    loaded.save()
    result = chat(
        messages=HELLO,
        model=MODEL,
        credential=APIKeyCredentials.objects.get(pk=credential.pk),
        user=PLATFORM,
    )

    assert [r.authorization for r in old_server.requests] == [bearer(OLD_KEY)]
    assert [r.authorization for r in new_server.requests] == [bearer(NEW_KEY)]
    assert result.route.host == f"127.0.0.1:{new_server.port}"
    assert old_client.is_closed()
    assert cache_stats()["clients"] == 1


def test_it_closes_the_clients_of_a_deleted_credential(credential_factory, upstream):
    doomed = credential_factory(title="Doomed", base_url=upstream.base_url, api_key=OLD_KEY)
    kept = credential_factory(title="Kept", base_url=upstream.base_url, api_key=NEW_KEY)
    chat(messages=HELLO, model=MODEL, credential=doomed, user=PLATFORM)
    chat(messages=HELLO, model=MODEL, credential=kept, user=PLATFORM)
    doomed_client = get_client(resolve_route("chat", doomed, user=PLATFORM))
    kept_client = get_client(resolve_route("chat", kept, user=PLATFORM))
    assert cache_stats()["clients"] == 2

    doomed.delete()

    assert doomed_client.is_closed()
    assert not kept_client.is_closed()
    assert cache_stats()["clients"] == 1
    assert chat(messages=HELLO, model=MODEL, credential=kept, user=PLATFORM).text == "echo: hello"


def test_it_closes_the_clients_of_rotated_credentials(
    credential_factory, upstream, settings, django_capture_on_commit_callbacks
):
    rotated = credential_factory(title="Rotated", base_url=upstream.base_url, api_key=OLD_KEY)
    chat(messages=HELLO, model=MODEL, credential=rotated, user=PLATFORM)
    client = get_client(resolve_route("chat", rotated, user=PLATFORM))
    settings.CREDENTIALS_ENCRYPTION_KEYS = [Fernet.generate_key().decode(), TEST_FERNET_KEY]
    chat(
        messages=HELLO, model=MODEL, credential=rotated, user=PLATFORM
    )  # setting change: a fresh client
    client = get_client(resolve_route("chat", rotated, user=PLATFORM))

    with django_capture_on_commit_callbacks(execute=True):  # each batch commits
        call_command("rotate_credential_keys", stdout=io.StringIO())

    assert client.is_closed()
    assert cache_stats()["clients"] == 0
    reloaded = APIKeyCredentials.objects.get(pk=rotated.pk)
    assert (
        chat(messages=HELLO, model=MODEL, credential=reloaded, user=PLATFORM).text == "echo: hello"
    )
    assert upstream.requests[-1].authorization == bearer(OLD_KEY)


def test_it_lets_a_call_in_flight_finish_when_its_credential_is_renamed(transactional_db, upstream):
    credential = APIKeyCredentials(title="Busy", base_url=upstream.base_url, api_key=OLD_KEY)
    credential.save()
    # Warm up: the client exists, and last_used_at was just written (no write from the thread).
    chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)
    upstream.respond(delay=1.0)
    outcome: dict[str, object] = {}

    def slow_call() -> None:
        try:
            outcome["text"] = chat(
                messages=[{"role": "user", "content": "slow"}],
                model=MODEL,
                credential=credential,
                user=PLATFORM,
            ).text
        except LLMError as error:
            outcome["error"] = str(error)

    caller = threading.Thread(target=slow_call)
    caller.start()
    deadline = time.monotonic() + 5
    while len(upstream.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(upstream.requests) == 2  # the slow call has reached the server

    renamed = APIKeyCredentials.objects.get(pk=credential.pk)
    renamed.title = "Busy (renamed)"
    renamed.save()
    caller.join(10)

    assert outcome == {"text": "echo: slow"}


# ---- the LRU --------------------------------------------------------------------------


def test_it_bounds_the_cache_and_closes_the_least_recently_used_client(upstream):
    cache = ClientCache(maxsize=2)
    keys = [f"sk-test-fake-lru-{n}-0000" for n in range(3)]
    routes = [route_to(upstream, key) for key in keys]

    first, second, third = (
        cache.get(("sync", n), route, lambda key=key: sdk_client(upstream, key))
        for n, (key, route) in enumerate(zip(keys, routes, strict=True))
    )

    assert len(cache) == 2
    assert cache.builds == 3
    assert first.is_closed()
    assert not second.is_closed()
    assert not third.is_closed()
    cache.evict()
    assert second.is_closed()
    assert third.is_closed()


def test_it_keeps_a_recently_used_client_over_an_older_one(upstream):
    cache = ClientCache(maxsize=2)
    routes = [route_to(upstream, f"sk-test-fake-lru-{n}-0000") for n in range(3)]

    def get(n: int) -> openai.OpenAI:
        return cache.get(("sync", n), routes[n], lambda: sdk_client(upstream, f"k{n}"))  # type: ignore[no-any-return]

    first, second = get(0), get(1)
    assert get(0) is first  # first is now the most recently used
    third = get(2)

    assert second.is_closed()
    assert not first.is_closed()
    assert not third.is_closed()
    assert get(0) is first
    assert cache.builds == 3
    cache.evict()


def test_it_leaks_no_client_when_two_threads_build_the_same_route_at_once(upstream):
    cache = ClientCache(maxsize=8)
    route = route_to(upstream, OLD_KEY)
    both_building = threading.Barrier(2)
    built: list[openai.OpenAI] = []
    got: list[openai.OpenAI] = []

    def build() -> openai.OpenAI:
        client = sdk_client(upstream, OLD_KEY)
        built.append(client)
        # A cache that builds one at a time never meets here: the barrier times out.
        with contextlib.suppress(threading.BrokenBarrierError):
            both_building.wait(timeout=1)
        return client

    def caller() -> None:
        got.append(cache.get(("sync", "same"), route, build))

    threads = [threading.Thread(target=caller) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    kept = cache.get(("sync", "same"), route, build)

    try:
        assert len(cache) == 1
        leaked = [client for client in built if client is not kept and not client.is_closed()]
        assert leaked == []
    finally:
        cache.evict()
        for client in built:
            client.close()


# ---- async clients --------------------------------------------------------------------


def test_it_gives_each_event_loop_its_own_async_client(db, global_route):
    upstream = global_route
    before = cache_stats()

    async def one_run(number: int) -> str:
        result = await achat(messages=[{"role": "user", "content": f"run {number}"}], model=MODEL)
        return result.text

    first = async_to_sync(one_run)(1)
    after_first = cache_stats()
    second = async_to_sync(one_run)(2)

    assert (first, second) == ("echo: run 1", "echo: run 2")
    assert after_first["builds"] - before["builds"] == 1
    assert cache_stats()["builds"] - before["builds"] == 2
    # The end of each run's event loop closed its client and took it out of the cache.
    assert after_first["clients"] == before["clients"]
    assert cache_stats()["clients"] == before["clients"]
    assert [r.authorization for r in upstream.requests] == [bearer(GLOBAL_KEY)] * 2


def test_it_shares_the_async_client_within_one_loop(db, global_route):
    upstream = global_route
    before = cache_stats()["builds"]

    async def main() -> list[str]:
        results = [await achat(messages=HELLO, model=MODEL) for _ in range(20)]
        return [result.text for result in results]

    texts = async_to_sync(main)()

    assert texts == ["echo: hello"] * 20
    assert cache_stats()["builds"] - before == 1
    assert upstream.connections <= 2


# ---- redirects and TLS ----------------------------------------------------------------


def test_it_does_not_follow_a_redirect_with_the_key(credential_factory, start_upstream):
    proxy, elsewhere = start_upstream(), start_upstream()
    credential = credential_factory(base_url=proxy.base_url, api_key=OLD_KEY)
    proxy.respond(
        status=307, headers={"Location": f"{elsewhere.base_url}/chat/completions"}, body={}
    )

    with pytest.raises(LLMError):
        chat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)

    assert len(proxy.requests) == 1
    assert elsewhere.requests == []


def test_it_does_not_follow_a_redirect_with_the_key_from_async_calls(
    credential_factory, start_upstream
):
    proxy, elsewhere = start_upstream(), start_upstream()
    credential = credential_factory(base_url=proxy.base_url, api_key=OLD_KEY)
    proxy.respond(
        status=307, headers={"Location": f"{elsewhere.base_url}/chat/completions"}, body={}
    )

    async def main() -> None:
        await achat(messages=HELLO, model=MODEL, credential=credential, user=PLATFORM)

    with pytest.raises(LLMError):
        async_to_sync(main)()

    assert len(proxy.requests) == 1
    assert elsewhere.requests == []


def test_it_builds_one_shared_ssl_context():
    context = shared_ssl_context()

    assert isinstance(context, ssl.SSLContext)
    assert shared_ssl_context() is context
    assert context.verify_mode == ssl.CERT_REQUIRED


# ---- keep-alive -----------------------------------------------------------------------


def sync_calls(pauses, messages):
    for pause in pauses:
        time.sleep(pause)
        chat(messages=messages, model="gpt-test-mini", user=PLATFORM)


def async_calls(pauses, messages):
    async def calls() -> None:
        for pause in pauses:
            await asyncio.sleep(pause)
            await achat(messages=messages, model="gpt-test-mini", user=PLATFORM)

    async_to_sync(calls)()


@pytest.mark.django_db
@pytest.mark.parametrize("calls", [sync_calls, async_calls], ids=["sync", "async"])
def test_an_idle_connection_is_dropped_before_the_proxy_would_drop_it(
    settings, global_route, calls
):
    """A connection idle for longer than LLM_KEEPALIVE_SECONDS is not reused: the next
    call opens a new one, rather than writing to one the proxy may be closing."""
    settings.LLM_KEEPALIVE_SECONDS = 0.5

    calls([0, 0.1, 1.0], [{"role": "user", "content": "hi"}])

    first, soon_after, after_a_pause = (request.peer for request in global_route.requests)
    assert soon_after == first  # reused while fresh
    assert after_a_pause != first  # a new connection once idle past the keep-alive
