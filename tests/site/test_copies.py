"""Copies of users and credentials in this process, trusted while the shared stamp holds."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.cache import cache

from platform_site import copies, shared_cache
from platform_site.copies import LocalCopies
from tests.upstream import free_port


class Row:
    def __init__(self, value: str) -> None:
        self.value = value


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def table() -> dict[str, Any]:
    """What the loader reads, and how often it was asked."""
    return {"rows": {"a": "first"}, "loads": 0}


@pytest.fixture
def kept(table) -> LocalCopies[str, Row]:
    def load(key: str) -> Row | None:
        table["loads"] += 1
        value = table["rows"].get(key)
        return None if value is None else Row(value)

    return LocalCopies("rows", load)


def get(kept: LocalCopies[str, Row], key: str) -> Row | None:
    return async_to_sync(kept.aget)(key)


def value(kept: LocalCopies[str, Row], key: str) -> str | None:
    row = get(kept, key)
    return None if row is None else row.value


def test_it_loads_once_then_serves_its_copy(kept, table):
    assert (value(kept, "a"), value(kept, "a")) == ("first", "first")
    assert table["loads"] == 1


def test_requests_that_miss_at_once_share_one_load(kept, table):
    async def burst() -> list[Row | None]:
        return list(await asyncio.gather(*(kept.aget("a") for _ in range(50))))

    rows = async_to_sync(burst)()

    assert [row.value if row else None for row in rows] == ["first"] * 50
    assert len({id(row) for row in rows}) == 50
    assert table["loads"] == 1


def test_each_caller_gets_its_own_copy(kept):
    mine = get(kept, "a")
    assert mine is not None
    mine.value = "changed by one request"

    assert value(kept, "a") == "first"


def test_a_bump_makes_every_copy_load_afresh(kept, table):
    get(kept, "a")
    table["rows"]["a"] = "second"

    copies.bump()

    assert value(kept, "a") == "second"
    assert table["loads"] == 2


def test_a_missing_row_is_kept_too(kept, table):
    assert get(kept, "nope") is None
    assert get(kept, "nope") is None
    assert table["loads"] == 1


def test_a_copy_older_than_max_age_is_loaded_again(kept, table, monkeypatch):
    monkeypatch.setattr(copies, "MAX_AGE", 0.0)
    get(kept, "a")
    get(kept, "a")

    assert table["loads"] == 2


def test_a_lost_stamp_never_matches_the_copies_made_before(kept, table):
    get(kept, "a")
    cache.delete(copies.STAMP)  # evicted, or the cache restarted
    table["rows"]["a"] = "second"

    assert value(kept, "a") == "second"


def test_a_change_in_a_transaction_bumps_again_when_it_commits(
    db, django_user_model, django_capture_on_commit_callbacks
):
    before = cache.get(copies.STAMP)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        django_user_model.objects.create_user("alice")
        after_save = cache.get(copies.STAMP)

    assert len(callbacks) == 1
    assert before != after_save != cache.get(copies.STAMP)


def test_signing_in_does_not_bump(db, django_user_model, client):
    django_user_model.objects.create_user("alice", password="unused-Pw-4x8q")
    before = cache.get(copies.STAMP)

    assert client.login(username="alice", password="unused-Pw-4x8q")

    assert cache.get(copies.STAMP) == before


def test_without_a_cache_nothing_is_trusted_and_it_says_so(kept, table, settings, caplog):
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        }
    }
    shared_cache._last_warning = -shared_cache.WARN_EVERY

    with caplog.at_level(logging.WARNING, logger="platform_site.shared_cache"):
        assert (value(kept, "a"), value(kept, "a")) == ("first", "first")

    assert table["loads"] == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "The cache (RedisCache) does not answer (ConnectionError): reading from the database "
        "instead."
    ]
