"""Fixtures the LLM tests share: alice's credential on an upstream that reports
a cost (x-litellm-response-cost: 0.0042); spend control's counters, local or in Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import pytest
import redis

from tests.conftest import TEST_REDIS_URL


@pytest.fixture
def costly(start_upstream):
    return start_upstream(cost="0.0042")


@pytest.fixture
def credential(credential_factory, alice, costly):
    return credential_factory(title="Alice proxy", owner=alice, base_url=costly.base_url)


@pytest.fixture(params=["local", "redis"])
def counters(request: pytest.FixtureRequest, settings: Any) -> str:
    """The counters in this process's own cache, or in the tests' Redis."""
    if request.param == "local":
        backend = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
        settings.CACHES = {"default": {**backend, "LOCATION": f"test-{uuid.uuid4()}"}}
    else:
        backend = {"BACKEND": "django.core.cache.backends.redis.RedisCache"}
        settings.CACHES = {"default": {**backend, "LOCATION": TEST_REDIS_URL}}
    return str(request.param)


def forget_counters(credentials: Iterable[Any]) -> None:
    """Delete these credentials' counters from the tests' Redis (a month's would live on
    for 40 days)."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    for credential in credentials:
        keys = list(client.scan_iter(f"*keyroute:*{credential.pk.hex}*", count=1000))
        if keys:
            client.delete(*keys)
    client.close()
