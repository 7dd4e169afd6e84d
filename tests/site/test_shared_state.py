"""A change to a credential or a user takes effect on the very next request in every worker.

Two uvicorn processes on the test database, sharing one Redis, stand for
`uvicorn --workers 2` (the same thing, but each worker can be addressed on its own
port). Both are warmed first, so each holds copies of alice and her credential
(platform_site.copies). Then one thing changes, and the very next request on each
worker (no sleep, no retry) must see it.

Changes made through the ORM in the test process stand for another process changing
the data (a management command, the admin on another machine); that process must share
the workers' cache, hence `settings.CACHES` pointing at the same Redis. One change goes
through a worker's own admin, to prove the admin tells the other worker too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest

from credentials.models import APIKeyCredentials
from tests.conftest import TEST_REDIS_URL, Answer, Site, signed_in
from tests.upstream import Upstream

MODEL = "gpt-test-mini"
HI = [{"role": "user", "content": "hi"}]
# Obviously fake keys; never real ones.
OLD_KEY = "sk-test-fake-shared-state-0001"
NEW_KEY = "sk-test-fake-shared-state-0002"
MOVED_KEY = "sk-test-fake-shared-state-0003"
CHANGELIST = "/admin/credentials/apikeycredentials/"


@dataclass
class Workers:
    """Two warm workers, and what the tests change under them."""

    one: Site
    two: Site
    upstream: Upstream
    credential: APIKeyCredentials
    alice: Any
    bob: Any
    admin: Any
    alice_headers: dict[str, str]

    @property
    def both(self) -> tuple[Site, Site]:
        return (self.one, self.two)

    def chat(self, site: Site, headers: dict[str, str] | None = None) -> Answer:
        """One chat with the credential, as alice unless `headers` say otherwise."""
        body = {"credential": str(self.credential.pk), "model": MODEL, "messages": HI}
        return site.request(
            "POST", "/api/llm/chat", headers=headers or self.alice_headers, body=body
        )


def assert_answered(answer: Answer) -> None:
    assert answer.status == 200, answer.content
    assert answer.json()["text"] == "echo: hi"


@pytest.fixture
def workers(
    transactional_db: None,
    settings: Any,
    django_user_model: Any,
    credential_factory: Callable[..., APIKeyCredentials],
    start_upstream: Callable[..., Upstream],
    start_site: Callable[..., Site],
) -> Workers:
    # This process changes data as another process would: through the shared cache, so
    # that its bump reaches the workers (pytest-django's fixture resets the cache handler).
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": TEST_REDIS_URL,
        }
    }
    alice = django_user_model.objects.create_user("alice", password="alice-old-password-1")
    bob = django_user_model.objects.create_user("bob")
    admin = django_user_model.objects.create_user("root", is_staff=True, is_superuser=True)
    upstream = start_upstream()
    credential = credential_factory(
        title="Alice proxy", owner=alice, base_url=upstream.base_url, api_key=OLD_KEY
    )
    env = {"CACHE_URL": TEST_REDIS_URL, "LLM_USAGE_FLUSH_SECONDS": "0"}
    shared = Workers(
        one=start_site(**env),
        two=start_site(**env),
        upstream=upstream,
        credential=credential,
        alice=alice,
        bob=bob,
        admin=admin,
        alice_headers=signed_in(alice),
    )
    # Warm: each worker now holds copies of alice and her credential.
    for site in shared.both:
        assert_answered(shared.chat(site))
        assert upstream.requests[-1].authorization == f"Bearer {OLD_KEY}"
    assert len(upstream.requests) == 2
    return shared


def test_a_new_key_is_sent_on_the_next_chat_on_every_worker(workers):
    before = len(workers.upstream.requests)

    workers.credential.api_key = NEW_KEY
    workers.credential.save()

    for site in workers.both:
        assert_answered(workers.chat(site))
        assert workers.upstream.requests[-1].authorization == f"Bearer {NEW_KEY}"
    sent = [request.authorization for request in workers.upstream.requests[before:]]
    assert sent == [f"Bearer {NEW_KEY}"] * 2


def test_a_new_base_url_is_reached_on_the_next_chat_on_every_worker(workers, start_upstream):
    moved = start_upstream()
    before = len(workers.upstream.requests)

    workers.credential.base_url = moved.base_url
    workers.credential.api_key = MOVED_KEY  # moving a key requires entering it again
    workers.credential.save()

    for site in (workers.two, workers.one):
        assert_answered(workers.chat(site))
        assert moved.requests[-1].authorization == f"Bearer {MOVED_KEY}"
    assert len(moved.requests) == 2
    assert len(workers.upstream.requests) == before  # the old upstream got nothing more


def test_deactivating_in_one_workers_admin_answers_404_on_every_worker(workers):
    before = len(workers.upstream.requests)
    admin_headers = signed_in(workers.admin)
    form = urlencode(
        {
            "action": "deactivate",
            "_selected_action": str(workers.credential.pk),
            "index": "0",
            "csrfmiddlewaretoken": admin_headers["X-CSRFToken"],
        }
    )

    deactivated = workers.one.request("POST", CHANGELIST, headers=admin_headers, body=form)

    assert deactivated.status == 302, deactivated.content
    workers.credential.refresh_from_db()
    assert workers.credential.is_active is False
    for site in (workers.two, workers.one):
        refused = workers.chat(site)
        assert refused.status == 404, refused.content
        assert refused.json()["error"]["message"].startswith("No such credential")
    assert len(workers.upstream.requests) == before


def test_a_new_owner_answers_404_to_the_old_one_on_every_worker(workers):
    before = len(workers.upstream.requests)

    workers.credential.owner = workers.bob
    workers.credential.save()

    for site in workers.both:
        refused = workers.chat(site)
        assert refused.status == 404, refused.content
    assert len(workers.upstream.requests) == before
    # The credential still works, for its new owner.
    bob_headers = signed_in(workers.bob)
    for site in workers.both:
        assert_answered(workers.chat(site, bob_headers))
    assert len(workers.upstream.requests) == before + 2


def test_a_deactivated_user_is_signed_out_on_every_worker(workers):
    before = len(workers.upstream.requests)

    workers.alice.is_active = False
    workers.alice.save()

    for site in (workers.two, workers.one):
        refused = workers.chat(site)
        assert refused.status == 401, refused.content
        assert refused.json()["error"]["type"] == "NotAuthenticated"
    for site in workers.both:  # and her next requests too
        assert workers.chat(site).status == 401
    assert len(workers.upstream.requests) == before


def test_a_new_password_signs_out_old_sessions_on_every_worker(workers):
    before = len(workers.upstream.requests)

    workers.alice.set_password("alice-new-password-2")
    workers.alice.save()

    for site in workers.both:
        refused = workers.chat(site)
        assert refused.status == 401, refused.content
        assert refused.json()["error"]["type"] == "NotAuthenticated"
    assert len(workers.upstream.requests) == before
    # A session signed in after the change (with the new password's hash) works.
    fresh = signed_in(workers.alice)
    for site in workers.both:
        assert_answered(workers.chat(site, fresh))
