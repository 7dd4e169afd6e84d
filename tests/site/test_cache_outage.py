"""When the shared cache (Redis) does not answer, the site still serves, reading the
database instead, and /readyz says what is wrong."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync

from platform_site import shared_cache
from tests.conftest import signed_in
from tests.upstream import free_port

PASSWORD = "outage-test-only-Pw-7k2m"


def test_the_api_answers_and_readyz_names_the_cache(
    start_site, django_user_model, credential_factory, upstream
):
    alice = django_user_model.objects.create_user("alice")
    credential = credential_factory(owner=alice, base_url=upstream.base_url)
    site = start_site(CACHE_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    headers = signed_in(alice)
    chat = {
        "credential": str(credential.pk),
        "model": "gpt-test-mini",
        "messages": [{"role": "user", "content": "hi"}],
    }

    answers = [site.request("POST", "/api/llm/chat", headers=headers, body=chat) for _ in range(3)]
    ready = site.request("GET", "/readyz")

    assert [(a.status, a.json()["text"]) for a in answers] == [(200, "echo: hi")] * 3
    assert (ready.status, ready.json()) == (
        503,
        {"status": "unavailable", "problems": ["The cache does not answer."]},
    )
    assert site.request("GET", "/healthz").status == 200


def test_users_sign_in_and_out(start_site, django_user_model):
    django_user_model.objects.create_user("alice", password=PASSWORD)
    site = start_site(CACHE_URL=f"redis://127.0.0.1:{free_port()}/0")
    csrf = site.request("GET", "/accounts/login/").cookies()["csrftoken"]

    signed = site.request(
        "POST",
        "/accounts/login/",
        headers={"Cookie": f"csrftoken={csrf}"},
        body=f"username=alice&password={PASSWORD}&csrfmiddlewaretoken={csrf}",
    )
    assert signed.status == 302, signed.content
    csrf = signed.cookies()["csrftoken"]  # signing in rotates the CSRF token
    headers = signed.follow({"Cookie": f"csrftoken={csrf}", "X-CSRFToken": csrf})
    assert site.request("GET", "/api/llm/credentials", headers=headers).status == 200

    out = site.request(
        "POST", "/accounts/logout/", headers=headers, body=f"csrfmiddlewaretoken={csrf}"
    )

    assert out.status == 302, out.content
    assert site.request("GET", "/api/llm/credentials", headers=headers).status == 401


# ---- the asyncio pool's size -------------------------------------------------------------


@pytest.mark.parametrize("size", [3, None], ids=["CACHE_MAX_CONNECTIONS=3", "the default"])
def test_a_burst_on_the_event_loop_opens_at_most_the_pools_connections(settings, own_redis, size):
    """Redis counts its clients: a loop opens what a burst needs, up to the setting
    (at 500 requests in flight the former 64 ran dry: docs/performance.md)."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": own_redis.url,
        }
    }
    if size is not None:
        settings.CACHE_MAX_CONNECTIONS = size

    async def burst() -> tuple[list[object], int]:
        reads = [shared_cache.aget(f"key-{n}", "none") for n in range(30)]
        answers = await asyncio.gather(*reads)
        return answers, await asyncio.to_thread(own_redis.clients)  # the loop's pool is open

    answers, clients = async_to_sync(burst)()

    assert answers == ["none"] * 30  # every read answered, none failed
    assert clients == (3 if size == 3 else 30)
