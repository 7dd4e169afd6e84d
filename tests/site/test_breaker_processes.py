"""The circuit breaker of a base URL across worker processes (llm/breaker.py).

Two uvicorn processes on the test database, sharing one Redis, stand for
`uvicorn --workers 2`, as in test_shared_state. Alice's credential goes through a
primary proxy that dies: a DeadPort on its port accepts connections and closes them at
once, counting the knocks. Its fallback is a live loopback upstream. Every call
answers, through the fallback while the primary is down; what the tests count is who
still knocks at the dead proxy, and who tries it again once it is back.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from django.core.cache import cache

from credentials.models import APIKeyCredentials
from llm.breaker import _keys
from tests.conftest import TEST_REDIS_URL, Answer, Site, signed_in
from tests.upstream import DeadPort, Upstream, free_port

MODEL = "gpt-test-mini"
HI = [{"role": "user", "content": "hi"}]
FAILURES = 3
REFRESH = 0.2
COOLDOWN = 3.0
# Tests that do not wait for the cooldown must not see it end, even on a busy machine.
LONG_COOLDOWN = {"LLM_BREAKER_COOLDOWN_SECONDS": "30"}
BREAKER_ENV = {
    "LLM_BREAKER_FAILURES": str(FAILURES),
    "LLM_BREAKER_COOLDOWN_SECONDS": str(COOLDOWN),
    "LLM_BREAKER_REFRESH_SECONDS": str(REFRESH),
    "LLM_USAGE_FLUSH_SECONDS": "0",
}
SHARED_ENV = {"CACHE_URL": TEST_REDIS_URL, **BREAKER_ENV}
ALONE_WARNING = "each worker keeps its own circuit breakers"
BACK_AGAIN = "The cache answers again"


def wait_for(check: Callable[[], Any], *, within: float, what: str, every: float = 0.05) -> Any:
    """Poll `check` until it returns something true, for at most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"Not within {within} s: {what}.")
        time.sleep(every)


@dataclass
class Proxies:
    """Alice's credential on a primary proxy (alive, dead, or back), with a fallback."""

    port: int
    backup: Upstream
    credential: APIKeyCredentials
    fallback: APIKeyCredentials
    steady: Steady
    headers: dict[str, str]
    primary: Upstream | None = None
    dead: DeadPort | None = None
    started: list[Upstream] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def knocks(self) -> int:
        """Connections the dead proxy accepted (and closed at once)."""
        assert self.dead is not None
        return self.dead.attempts

    def up(self, server: Upstream | None = None) -> Upstream:
        """The primary proxy answers on its port (again): `server`, or a plain one."""
        if self.dead is not None:
            self.dead.close()
            self.dead = None
        self.primary = (server or Upstream()).start(self.port)
        self.started.append(self.primary)
        return self.primary

    def down(self) -> DeadPort:
        """The primary proxy dies: its port accepts connections and closes them."""
        if self.primary is not None:
            self.primary.stop()  # not twice: a stopped Upstream's loop is gone
            self.started.remove(self.primary)
            self.primary = None
        self.dead = DeadPort(self.port)
        return self.dead

    def chat(self, site: Site, credential: APIKeyCredentials | None = None) -> Answer:
        body = {"credential": str((credential or self.credential).pk), "model": MODEL}
        return site.request(
            "POST", "/api/llm/chat", headers=self.headers, body={**body, "messages": HI}
        )

    def failed_over(self, answer: Answer) -> dict[str, Any]:
        """The route of an answer the fallback served in place of the primary."""
        assert answer.status == 200, answer.content
        assert answer.json()["text"] == "echo: hi"
        route: dict[str, Any] = answer.json()["route"]
        assert route["source"] == "failover", route
        assert route["host"] == f"127.0.0.1:{self.backup.port}"
        assert route["credential"]["id"] == str(self.fallback.pk)
        assert route["failed_over_from"]["host"] == self.host
        assert route["failed_over_from"]["credential"]["id"] == str(self.credential.pk)
        assert answer.headers["X-Keyroute-Route"].startswith("source=failover; ")
        return route

    def by_primary(self, answer: Answer) -> bool:
        """Whether the primary served `answer` itself (an answer it must be)."""
        assert answer.status == 200, answer.content
        assert answer.json()["text"] == "echo: hi"
        route = answer.json()["route"]
        if route["source"] != "credential":
            return False
        assert route["host"] == self.host
        assert route["failed_over_from"] is None
        assert answer.headers["X-Keyroute-Route"].startswith("source=credential; ")
        return True

    def open_until(self) -> float:
        """The breaker's deadline in the shared cache (0: closed)."""
        return float(cache.get(_keys(self.base_url)[1]) or 0)


class HeldUpstream(Upstream):
    """An upstream whose chat answers wait until the test sets `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    async def _misbehave(self, request: web.Request) -> web.StreamResponse | None:
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        return await super()._misbehave(request)


@dataclass
class Steady:
    """A credential of alice's on a proxy that stays up, without a fallback."""

    credential: APIKeyCredentials
    upstream: Upstream


@pytest.fixture
def redis_cache(settings: Any) -> None:
    """This process reads and cleans the breakers' keys in the sites' Redis."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": TEST_REDIS_URL,
        }
    }


@pytest.fixture
def proxies(
    transactional_db: None,
    redis_cache: None,
    django_user_model: Any,
    credential_factory: Callable[..., APIKeyCredentials],
    start_upstream: Callable[..., Upstream],
) -> Iterator[Proxies]:
    alice = django_user_model.objects.create_user("alice")
    backup, steady = start_upstream(), start_upstream()
    fallback = credential_factory(title="Backup proxy", owner=alice, base_url=backup.base_url)
    port = free_port()
    credential = credential_factory(
        title="Primary proxy",
        owner=alice,
        base_url=f"http://127.0.0.1:{port}/v1",
        fallback=fallback,
    )
    other = credential_factory(title="Steady proxy", owner=alice, base_url=steady.base_url)
    found = Proxies(port, backup, credential, fallback, Steady(other, steady), signed_in(alice))
    # No breaker of an earlier test on a reused port, in Redis, before or after.
    urls = [found.base_url, backup.base_url, steady.base_url]
    keys = [key for url in urls for key in (*_keys(url), _keys(url)[2] + ":forced")]
    cache.delete_many(keys)
    yield found
    cache.delete_many(keys)
    if found.dead is not None:
        found.dead.close()
    for server in found.started:
        server.stop()


def two_workers(start_site: Callable[..., Site], **env: str) -> tuple[Site, Site]:
    """Two sites sharing Redis, started at once (each takes seconds to import Django)."""
    with ThreadPoolExecutor(2) as pool:
        one, two = pool.map(lambda _: start_site(**{**SHARED_ENV, **env}), range(2))
    return one, two


def open_on(site: Site, proxies: Proxies, *, shared: bool = True) -> None:
    """FAILURES calls on `site` knock at the dead primary, fail over, and open its breaker;
    the next one does not knock."""
    before = proxies.knocks
    for _ in range(FAILURES):
        proxies.failed_over(proxies.chat(site))
    assert proxies.knocks == before + FAILURES
    route = proxies.failed_over(proxies.chat(site))
    assert route["failed_over_from"]["reason"] == "circuit breaker open"
    assert proxies.knocks == before + FAILURES
    if shared:
        wait_for(proxies.open_until, within=2, what="the open breaker reaches Redis")


def test_failures_seen_by_one_worker_open_the_breaker_for_the_other(
    proxies: Proxies, start_site: Callable[..., Site]
) -> None:
    one, two = two_workers(start_site, **LONG_COOLDOWN)
    proxies.up()
    for site in (one, two):  # both have called the primary: each watches its breaker
        assert proxies.by_primary(proxies.chat(site))
    proxies.down()

    open_on(one, proxies)
    time.sleep(2 * REFRESH)  # `two` reads the shared breakers at least once

    for _ in range(FAILURES + 1):
        route = proxies.failed_over(proxies.chat(two))
        assert route["failed_over_from"]["reason"] == "circuit breaker open"
    assert proxies.knocks == FAILURES  # `two` never knocked


def test_a_worker_that_never_called_the_proxy_knows_its_breaker_is_open(
    proxies: Proxies, start_site: Callable[..., Site]
) -> None:
    one, two = two_workers(start_site, **LONG_COOLDOWN)
    proxies.down()
    open_on(one, proxies)
    time.sleep(2 * REFRESH)

    for _ in range(FAILURES + 1):
        proxies.failed_over(proxies.chat(two))
    assert proxies.knocks == FAILURES


def test_one_worker_alone_sends_the_half_open_probe(
    proxies: Proxies, start_site: Callable[..., Site]
) -> None:
    one, two = two_workers(start_site)
    proxies.up()
    for site in (one, two):
        assert proxies.by_primary(proxies.chat(site))
    proxies.down()
    open_on(one, proxies)
    time.sleep(2 * REFRESH)
    proxies.failed_over(proxies.chat(two))
    assert proxies.knocks == FAILURES
    deadline = proxies.open_until()
    primary = HeldUpstream()
    proxies.up(primary)  # back, but its answers wait for the test
    assert primary.requests == []  # the breaker is open: nobody tried it yet
    time.sleep(max(0.0, deadline - time.time()) + 0.05)  # the cooldown is over

    start = threading.Barrier(20)

    def call(site: Site) -> Answer:
        start.wait(5)
        return proxies.chat(site)

    with ThreadPoolExecutor(20) as pool:
        calls = [pool.submit(call, site) for site in [one] * 10 + [two] * 10]
        # While the probe is held, every other call is passed over to the fallback.
        wait_for(
            lambda: sum(c.done() for c in calls) == 19,
            within=10,
            what="19 calls answered while the probe is held",
        )
        assert len(primary.requests) == 1  # the probe, from one worker
        (probe,) = [c for c in calls if not c.done()]
        primary.release.set()
        answers = [c.result(10) for c in calls]

    assert len(primary.requests) == 1
    assert proxies.by_primary(probe.result())
    for answer in answers:
        if answer is not probe.result():
            route = proxies.failed_over(answer)
            assert route["failed_over_from"]["reason"] == "circuit breaker open"

    # The probe closed the breaker: both workers call the primary again.
    for site in (one, two):

        def served_by_primary(site: Site = site) -> bool:
            return bool(proxies.by_primary(proxies.chat(site)))

        wait_for(
            served_by_primary,
            within=10 * REFRESH,  # a refresh or two, and requests on a busy machine
            what="the primary serves again",
        )
    assert proxies.open_until() == 0
    for site in (one, two):
        assert proxies.by_primary(proxies.chat(site))


def test_after_a_failed_probe_no_other_worker_probes_again(
    proxies: Proxies, start_site: Callable[..., Site]
) -> None:
    env = {"LLM_BREAKER_REFRESH_SECONDS": "1", "LLM_BREAKER_COOLDOWN_SECONDS": "4"}
    one, two = two_workers(start_site, **env)  # refreshing each second: the default
    proxies.up()
    for site in (one, two):
        assert proxies.by_primary(proxies.chat(site))
    proxies.down()
    open_on(one, proxies)
    # Two seconds after it opened: `two` has refreshed, and the cooldown is not over.
    time.sleep(max(0.0, proxies.open_until() - 2.0 - time.time()))
    route = proxies.failed_over(proxies.chat(two))
    assert route["failed_over_from"]["reason"] == "circuit breaker open"
    assert proxies.knocks == FAILURES
    time.sleep(max(0.0, proxies.open_until() - time.time()) + 0.05)

    route = proxies.failed_over(proxies.chat(one))  # the probe: the primary is still down
    assert route["failed_over_from"]["reason"] == "connection dropped"
    assert proxies.knocks == FAILURES + 1
    route = proxies.failed_over(proxies.chat(two))  # right after it

    assert proxies.knocks == FAILURES + 1, "a second probe in one half-open period"
    assert route["failed_over_from"]["reason"] == "circuit breaker open"


def test_without_the_cache_each_worker_keeps_its_own_breakers(
    proxies: Proxies, start_site: Callable[..., Site]
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    site = start_site(**{**BREAKER_ENV, "CACHE_URL": nowhere, **LONG_COOLDOWN})

    steady = proxies.chat(site, proxies.steady.credential)
    assert steady.status == 200, steady.content
    assert steady.json()["route"]["source"] == "credential"
    assert len(proxies.steady.upstream.requests) == 1

    proxies.down()
    open_on(site, proxies, shared=False)
    for _ in range(5):
        proxies.failed_over(proxies.chat(site))
    assert proxies.knocks == FAILURES

    site.process.terminate()
    _, log = site.process.communicate(timeout=10)
    assert log.count(ALONE_WARNING) == 1, log
    assert BACK_AGAIN not in log, log
