"""Slow sync work delays no other request, measured against a real uvicorn server.

An admin *Test connection* waiting on an upstream that answers after 8 s, or an admin
page that sleeps 8 s, holds only its own request's thread (platform_site/asgi.py): while
it is in flight, /healthz, /readyz, an API chat to a fast upstream and the playground
each answer within FAST_ENOUGH. Nothing is warmed up first: even a cold request, which
reads the database, gets a thread of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest

from tests.conftest import Answer, Site, signed_in

T = TypeVar("T")

FAST_ENOUGH = 0.5
SLOW_UPSTREAM_SECONDS = 8.0
# The slow request gets 30 s to answer; joining it gets a little more, then the test fails.
SLOW_REQUEST_TIMEOUT = 30.0
JOIN_TIMEOUT = SLOW_REQUEST_TIMEOUT + 5
# How long the slow work may take to start on a cold server.
START_TIMEOUT = 15.0
CHANGELIST = "/admin/credentials/apikeycredentials/"


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("admin", password="not-a-real-password")


@pytest.fixture
def fast(start_upstream):
    return start_upstream()


@pytest.fixture
def slow(start_upstream):
    upstream = start_upstream()
    upstream.respond(delay=SLOW_UPSTREAM_SECONDS)
    return upstream


@pytest.fixture
def alice_credential(credential_factory, alice, fast):
    return credential_factory(title="Alice fast proxy", owner=alice, base_url=fast.base_url)


@pytest.fixture
def slow_credential(credential_factory, slow):
    return credential_factory(title="Slow shared proxy", base_url=slow.base_url)


def in_background(send: Callable[[], T]) -> Future[T]:
    """Run `send` in a thread of the test; its answer comes in the future."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(send())
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name="slow-request", daemon=True).start()
    return future


def answer_of(future: Future[T], what: str) -> T:
    try:
        return future.result(timeout=JOIN_TIMEOUT)
    except TimeoutError:
        pytest.fail(f"{what} did not answer within {JOIN_TIMEOUT:g} s")


def wait_until(condition: Callable[[], bool], what: str, slow_work: Future[Any]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not condition():
        if slow_work.done():
            pytest.fail(f"{what} never happened; the slow request ended: {slow_work.result()!r}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {START_TIMEOUT:g} s")
        time.sleep(0.02)


def measure_the_others(site: Site, alice: dict[str, str], credential) -> dict[str, Answer]:
    """One after another, each as a client that knows nothing of the slow work."""
    chat = {
        "credential": str(credential.pk),
        "model": "gpt-test-mini",
        "messages": [{"role": "user", "content": "hi"}],
    }
    return {
        "GET /healthz": site.request("GET", "/healthz"),
        "GET /readyz": site.request("GET", "/readyz"),
        "POST /api/llm/chat": site.request("POST", "/api/llm/chat", headers=alice, body=chat),
        "GET /llm/": site.request("GET", "/llm/", headers=alice),
    }


def assert_all_fast(answers: dict[str, Answer]) -> None:
    seen = {name: (answer.status, round(answer.seconds, 3)) for name, answer in answers.items()}
    # One assertion for all, so that a failure shows every status and timing.
    assert all(status == 200 and seconds < FAST_ENOUGH for status, seconds in seen.values()), seen
    assert answers["POST /api/llm/chat"].json()["text"] == "echo: hi"


def test_it_answers_the_others_while_an_admin_test_connection_waits(
    start_site, admin_user, alice, alice_credential, slow, slow_credential
):
    site = start_site()
    admin, as_alice = signed_in(admin_user), signed_in(alice)
    form = urlencode(
        {
            "action": "test_connection",
            "_selected_action": str(slow_credential.pk),
            "index": "0",
            "csrfmiddlewaretoken": admin["X-CSRFToken"],
        }
    )

    action = in_background(
        lambda: site.request(
            "POST", CHANGELIST, headers=admin, body=form, timeout=SLOW_REQUEST_TIMEOUT
        )
    )
    wait_until(
        lambda: any(request.path == "/v1/models" for request in slow.requests),
        "The slow upstream's GET /v1/models",
        action,
    )
    answers = measure_the_others(site, as_alice, alice_credential)

    done = answer_of(action, "The admin action")
    assert_all_fast(answers)
    assert (done.status, done.headers["Location"]) == (302, CHANGELIST)
    assert len(slow.requests) == 1  # no retries
    changelist = site.request("GET", CHANGELIST, headers=done.follow(admin))  # the messages
    assert changelist.status == 200
    assert "did not answer in time" in changelist.content.decode()
    assert "LLM_PROBE_TIMEOUT_SECONDS" in changelist.content.decode()


@pytest.mark.usefixtures("slow_credential")
def test_it_answers_the_others_while_a_sync_admin_page_is_slow(
    start_site, tmp_path: Path, admin_user, alice, alice_credential
):
    marker = tmp_path / "slow-page-started"
    site = start_site(
        DJANGO_SETTINGS_MODULE="tests.site.slow_site", KEYROUTE_SLOW_MARKER=str(marker)
    )
    admin, as_alice = signed_in(admin_user), signed_in(alice)

    page = in_background(
        lambda: site.request("GET", "/admin/slow/", headers=admin, timeout=SLOW_REQUEST_TIMEOUT)
    )
    wait_until(marker.exists, "The slow admin page's start", page)
    answers = measure_the_others(site, as_alice, alice_credential)

    done = answer_of(page, "The slow admin page")
    assert_all_fast(answers)
    assert (done.status, done.content) == (200, b"Slow on purpose, and done.")
