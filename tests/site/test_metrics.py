"""/metrics: who may read it, what real calls make it count, and totals across workers.

Calls go through the site to loopback upstreams (tests/upstream.py) and the counters are
read back the way Prometheus reads them: by scraping /metrics and parsing the text.
Counters of this process also move with other tests' calls, so tests compare a scrape
before with one after. The last tests run `uvicorn --workers 2` in multiprocess mode,
as `make serve` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from credentials.models import APIKeyCredentials
from llm import metrics
from tests.conftest import (
    FAKE_KEY,
    PROJECT,
    TEST_REDIS_URL,
    Site,
    database_url,
    listening,
    run_manage,
    run_python,
    signed_in,
    subprocess_env,
)
from tests.upstream import Upstream, free_port

MODEL = "gpt-test-mini"
HELLO = [{"role": "user", "content": "hello there"}]  # 2 prompt tokens, 3 in the answer
COST = "0.0042"
TITLE = "Alice's very own proxy"
TOKEN = "metrics-token-for-tests-only"
ELSEWHERE = "10.1.2.3"


def samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`; 0 if there are none."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def moved(before: str, after: str, name: str, **labels: str) -> float:
    """How much the samples `name` with `labels` grew from one scrape to the next."""
    return samples(after, name, **labels) - samples(before, name, **labels)


def scrape(client: Client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    return response.content.decode()


def chat(client: Client, credential: APIKeyCredentials) -> Any:
    body = {"credential": str(credential.pk), "model": MODEL, "messages": HELLO}
    return client.post("/api/llm/chat", data=json.dumps(body), content_type="application/json")


def host_of(upstream: Upstream) -> str:
    return f"127.0.0.1:{upstream.port}"


@pytest.fixture
def costly(start_upstream):
    return start_upstream(cost=COST)


@pytest.fixture
def credential(credential_factory, alice, costly):
    return credential_factory(title=TITLE, owner=alice, base_url=costly.base_url)


# ---- who may read it -------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_loopback_may_read_it_by_default(client, db, address):
    response = client.get("/metrics", REMOTE_ADDR=address)

    assert response.status_code == 200
    assert response["Content-Type"] == CONTENT_TYPE_LATEST
    assert "# TYPE keyroute_llm_requests_total counter" in response.content.decode()


def test_another_address_is_refused_and_told_what_to_do(client, db, settings):
    settings.METRICS_TOKEN = ""

    response = client.get("/metrics", REMOTE_ADDR=ELSEWHERE)

    assert response.status_code == 403
    assert response["Content-Type"].startswith("text/plain")
    assert "METRICS_ALLOWED_IPS" in response.content.decode()
    assert "METRICS_TOKEN" in response.content.decode()


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer ", "Bearer é"],
)
def test_another_address_without_the_right_token_is_refused(client, db, settings, authorization):
    settings.METRICS_TOKEN = TOKEN

    response = client.get("/metrics", REMOTE_ADDR=ELSEWHERE, HTTP_AUTHORIZATION=authorization)

    assert response.status_code == 403
    assert TOKEN not in response.content.decode()


def test_no_token_is_accepted_when_none_is_set(client, db, settings):
    settings.METRICS_TOKEN = ""

    response = client.get("/metrics", REMOTE_ADDR=ELSEWHERE, HTTP_AUTHORIZATION="Bearer ")

    assert response.status_code == 403


def test_the_token_opens_it_from_anywhere(client, db, settings):
    settings.METRICS_TOKEN = TOKEN

    response = client.get("/metrics", REMOTE_ADDR=ELSEWHERE, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")

    assert response.status_code == 200
    assert response["Content-Type"] == CONTENT_TYPE_LATEST


def test_allowed_networks_replace_loopback(client, db, settings):
    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8", "192.0.2.7"]

    assert client.get("/metrics", REMOTE_ADDR=ELSEWHERE).status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.7").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.8").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 403


def test_an_ipv4_mapped_address_counts_as_its_ipv4_address(client, db):
    assert client.get("/metrics", REMOTE_ADDR="::ffff:127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR=f"::ffff:{ELSEWHERE}").status_code == 403


def test_prometheus_may_scrape_over_plain_http(client, db, settings):
    settings.SECURE_SSL_REDIRECT = True

    assert client.get("/metrics").status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/llm/").status_code == 301


def test_an_invalid_allowed_address_stops_start_up_and_is_named():
    env = subprocess_env(METRICS_ALLOWED_IPS="127.0.0.1,10.0.0.300")

    result = run_manage("check", env=env)

    assert result.returncode == 1
    assert "METRICS_ALLOWED_IPS='10.0.0.300'" in result.stderr


# ---- what it counts --------------------------------------------------------------------


def test_a_chat_moves_the_counters(api, client, credential, costly):
    host = host_of(costly)
    before = scrape(client)

    response = chat(api, credential)

    assert response.status_code == 200, response.content
    after = scrape(client)
    call = {"purpose": "chat", "source": "credential", "host": host, "outcome": "ok"}
    assert moved(before, after, "keyroute_llm_requests_total", **call) == 1
    timed = {"purpose": "chat", "host": host}
    assert moved(before, after, "keyroute_llm_request_seconds_count", **timed) == 1
    assert moved(before, after, "keyroute_llm_tokens_total", kind="prompt", purpose="chat") == 2
    assert moved(before, after, "keyroute_llm_tokens_total", kind="completion", purpose="chat") == 3
    cost = moved(before, after, "keyroute_llm_cost_usd_total", credential=str(credential.pk))
    assert cost == pytest.approx(float(COST))


def test_a_failover_is_counted_from_host_to_host(api, client, credential_factory, alice, costly):
    down = f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    backup = credential_factory(title="Backup", owner=alice, base_url=costly.base_url)
    primary = credential_factory(
        title="Primary", owner=alice, base_url=f"http://{down}/v1", fallback=backup
    )
    hosts = {"from_host": down, "to_host": host_of(costly)}
    before = scrape(client)

    response = chat(api, primary)

    assert response.status_code == 200, response.content
    after = scrape(client)
    assert moved(before, after, "keyroute_llm_failovers_total", **hosts) == 1


def test_no_label_holds_a_key_a_title_a_user_or_a_prompt(api, client, credential):
    assert chat(api, credential).status_code == 200

    text = scrape(client)

    for secret in (FAKE_KEY, FAKE_KEY[-4:], TITLE, "alice", "hello there"):
        assert secret not in text


# ---- several processes -----------------------------------------------------------------


def test_a_dead_workers_gauges_go_and_its_counters_stay(tmp_path):
    """What a worker leaves when it dies: its files, as prometheus_client wrote them."""
    folder = tmp_path / "metrics"
    code = (
        "import django; django.setup()\n"
        "from llm import metrics\n"
        "metrics.client_cache(size=5)\n"
        "metrics.usage_buffer(depth=7, dropped=2)\n"
        "metrics.breaker_changed(host='proxy:4000', state='open')\n"
        "metrics.record_call(purpose='chat', source='credential', host='proxy:4000',"
        " outcome='ok', latency_seconds=0.5, prompt_tokens=2, completion_tokens=3,"
        " cost_usd=0.25, credential_id='c1')\n"
        "import os; print(os.getpid())\n"
    )
    env = subprocess_env(
        DJANGO_SETTINGS_MODULE="platform_site.settings", PROMETHEUS_MULTIPROC_DIR=str(folder)
    )
    result = run_python("-c", code, env=env)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split()[-1])
    assert folder.is_dir()  # created by the worker
    before = merged(folder)
    assert samples(before, "keyroute_client_cache_size") == 5
    assert samples(before, "keyroute_breaker_state", host="proxy:4000") == 2

    assert metrics.forget_dead_workers(str(folder)) == [pid]

    assert not list(folder.glob(f"gauge_live*_{pid}.db"))
    assert (folder / f"counter_{pid}.db").exists()
    after = merged(folder)
    assert "keyroute_client_cache_size" not in after
    assert "keyroute_breaker_state{" not in after
    assert samples(after, "keyroute_llm_requests_total") == 1
    assert samples(after, "keyroute_usage_records_dropped_total") == 2
    assert samples(after, "keyroute_llm_cost_usd_total", credential="c1") == 0.25


def merged(folder: Path) -> str:
    """The metrics of every process's files in `folder`, as a multiprocess scrape shows them."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    return generate_latest(registry).decode()


@pytest.fixture
def start_workers(transactional_db: None) -> Iterator[Callable[..., Site]]:
    """`uvicorn --workers N` on the test database and Redis, as `make serve` runs it.

    The uvicorn parent leads a process group of its own: its workers are killed with it
    at the end, whatever state they are in."""
    started: list[subprocess.Popen[str]] = []

    def start(workers: int, **env: str) -> Site:
        port = free_port()
        server_env = subprocess_env(
            DATABASE_URL=database_url(),
            CACHE_URL=TEST_REDIS_URL,
            ALLOWED_HOSTS="127.0.0.1",
            LLM_MAX_RETRIES="0",
            LLM_USAGE_FLUSH_SECONDS="0",
            LOG_LEVEL="WARNING",
            **env,
        )
        command = [sys.executable, "-m", "uvicorn", "platform_site.asgi:application"]
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
            cwd=PROJECT,
            env=server_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(process)
        if listening(process, port, seconds=30):
            return Site(f"http://127.0.0.1:{port}", process)
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"uvicorn did not start: {process.communicate()[1]}")

    yield start
    for process in started:
        process.terminate()  # the parent stops its workers
    for process in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)
        os.killpg(process.pid, signal.SIGKILL)  # any worker left behind
        process.wait(5)


def served_by_each(folder: Path) -> dict[int, float]:
    """Chat calls counted by each worker, read from its own counter file."""
    counts = {}
    for path in folder.glob("counter_*.db"):
        pid = int(path.stem.removeprefix("counter_"))
        counts[pid] = sum(
            sample.value
            for metric in MultiProcessCollector.merge([str(path)])
            for sample in metric.samples
            if sample.name == "keyroute_llm_requests_total"
        )
    return counts


def test_two_workers_add_up_whichever_answers_and_a_dead_one_is_handled(
    settings, tmp_path, django_user_model, credential_factory, start_upstream, start_workers
):
    # This process writes the session where the workers look: the shared Redis.
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": TEST_REDIS_URL,
        }
    }
    alice = django_user_model.objects.create_user("alice")
    upstream = start_upstream(cost=COST)
    credential = credential_factory(title=TITLE, owner=alice, base_url=upstream.base_url)
    folder = tmp_path / "metrics"  # missing: the workers create it
    site = start_workers(2, PROMETHEUS_MULTIPROC_DIR=str(folder))
    headers = signed_in(alice)
    body = {"credential": str(credential.pk), "model": MODEL, "messages": HELLO}

    # Fresh connections, until both workers have served (at least 20 calls in all).
    calls = 0
    while calls < 20 or len([n for n in served_by_each(folder).values() if n]) < 2:
        assert calls < 200, f"calls counted per worker pid: {served_by_each(folder)}"
        answer = site.request("POST", "/api/llm/chat", headers=headers, body=body)
        assert answer.status == 200, answer.content
        calls += 1

    def assert_totals(text: str) -> None:
        assert samples(text, "keyroute_llm_requests_total", outcome="ok") == calls
        assert samples(text, "keyroute_llm_request_seconds_count") == calls
        assert samples(text, "keyroute_llm_tokens_total", kind="completion") == 3 * calls
        assert samples(text, "keyroute_llm_cost_usd_total", credential=str(credential.pk)) == (
            pytest.approx(calls * float(COST))
        )

    for _ in range(6):  # whichever worker accepts each connection
        answer = site.request("GET", "/metrics")
        assert answer.status == 200
        assert answer.headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert_totals(answer.content.decode())

    # One worker dies; uvicorn starts another in its place, and tells nobody.
    served = served_by_each(folder)
    dead = max(served, key=lambda pid: served[pid])
    os.kill(dead, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _running(dead):
        assert time.monotonic() < deadline, "the killed worker was not reaped"
        time.sleep(0.1)

    answer = site.request("GET", "/metrics")

    assert answer.status == 200
    assert_totals(answer.content.decode())  # its counts stay in the totals
    assert not list(folder.glob(f"gauge_live*_{dead}.db"))  # its gauges are gone
    assert (folder / f"counter_{dead}.db").exists()


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
