"""Usage records the database could not store must not stop the others (issue 10, defect 1).

A record is made of what a user sent (the model name), what an upstream answered and
what an admin did meanwhile (deleting a credential or a user between the call and the
flush). Whatever it holds, the good records of its batch are written, later batches are
not blocked, and what cannot be stored is dropped alone, logged with its reason and
counted at /metrics. Run on SQLite and on PostgreSQL (DATABASE_URL): the two refuse
different things (PostgreSQL refuses NUL characters in text; both drivers refuse lone
surrogates; both databases refuse a negative count of tokens).

The calls reach real loopback servers; the buffer is the test's own, whose flusher
thread sleeps, and the test flushes by hand.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from llm import services, usage
from llm.models import UsageRecord
from tests.conftest import FAKE_KEY, GLOBAL_KEY, database_url, run_manage, subprocess_env
from tests.upstream import free_port

HELLO = [{"role": "user", "content": "hello there"}]
SURROGATE = "gpt-\ud800-mini"  # a lone UTF-16 surrogate: no driver can encode it
NUL = "gpt-\x00-mini"  # PostgreSQL refuses NUL in text
RECORDS_URL = reverse("admin:llm_usagerecord_changelist")
DROPPED = "keyroute_usage_records_unstorable_total"


@pytest.fixture
def buffered(settings: Any, monkeypatch: pytest.MonkeyPatch) -> usage.UsageBuffer:
    """Calls buffer their records in a buffer of the test's own, flushed by hand."""
    settings.LLM_USAGE_FLUSH_SECONDS = 3600
    buffer = usage.UsageBuffer(maxsize=1000, interval=3600)
    monkeypatch.setattr(usage, "_buffer", buffer)
    return buffer


def chat(model: str, **kwargs: Any) -> None:
    """A chat through llm.services, whatever it answers: only its record matters here."""
    with contextlib.suppress(Exception):  # the SDK may refuse the model name
        services.chat(messages=HELLO, model=model, **kwargs)


def stored_models() -> list[str]:
    return sorted(UsageRecord.objects.values_list("model", flat=True))


def scrape() -> str:
    response = Client().get("/metrics")
    assert response.status_code == 200
    return response.content.decode()


def dropped(text: str, **labels: str) -> float:
    """The records counted as unstorable in a scrape (0 before the first one)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == DROPPED and labels.items() <= sample.labels.items()
    )


def reasons(text: str) -> set[str]:
    return {
        sample.labels["reason"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == DROPPED
    }


@pytest.fixture
def database_down() -> Iterator[Any]:
    """`down()` points the connection at a database that is not there (a closed port, a
    folder that does not exist); the real one is back when the test ends or `up()`."""
    real = dict(connection.settings_dict)

    class Switch:
        def down(self) -> None:
            connection.close()
            if connection.vendor == "sqlite":
                connection.settings_dict["NAME"] = "/nonexistent-keyroute-folder/db.sqlite3"
            else:
                connection.settings_dict["PORT"] = free_port()

        def up(self) -> None:
            connection.close()
            connection.settings_dict.update(real)

    switch = Switch()
    yield switch
    switch.up()


# ---- text no database can take --------------------------------------------------------


def test_bad_model_names_are_stored_cleaned_and_block_nothing(
    transactional_db, buffered, global_route
):
    chat("before-1")
    chat(SURROGATE)
    chat("before-2")
    chat(NUL)
    chat("before-3")

    assert usage.flush() == 5

    assert stored_models() == ["before-1", "before-2", "before-3", "gpt--mini", "gpt-\ufffd-mini"]
    good = UsageRecord.objects.filter(model__startswith="before")
    assert set(good.values_list("outcome", flat=True)) == {"ok"}
    assert len(buffered) == 0
    chat("after")
    assert usage.flush() == 1
    assert "after" in stored_models()


def test_without_the_buffer_a_bad_model_name_is_stored_cleaned(db, global_route):
    # LLM_USAGE_FLUSH_SECONDS=0: each record is written as its call ends.
    chat(NUL)
    chat(SURROGATE)

    assert stored_models() == ["gpt--mini", "gpt-\ufffd-mini"]


def test_every_text_field_is_cleaned_and_cut_to_its_column(transactional_db, buffered):
    long_host = "h\x00" + "x" * 300
    usage.record(
        purpose="chat",
        model="m\ud83d\ude00\udfff" + "y" * 300,  # a valid pair, a lone half, too long
        route_source="global\x00",
        route_host=long_host,
        outcome="Bad\ud800Error",
        credential_title="Team\x00 proxy \udc80",
        serving_credential_title="x" * 500,
        latency_ms=1.0,
    )

    assert usage.flush() == 1

    record = UsageRecord.objects.get()
    assert record.model == ("m\U0001f600\ufffd" + "y" * 300)[:200]
    assert record.route_source == "global"
    assert record.route_host == "h" + "x" * 254
    assert record.outcome == "Bad\ufffdError"
    assert record.credential_title == "Team proxy \ufffd"
    assert record.serving_credential_title == "x" * 200


# ---- a record that still cannot be stored ---------------------------------------------


@pytest.mark.parametrize("tokens", [-1, 2**63], ids=["negative", "too-large"])
def test_an_unstorable_record_is_dropped_alone_logged_and_counted(
    transactional_db, buffered, global_route, caplog, tokens
):
    before = scrape()
    chat("good-1")
    usage.record(purpose="chat", model="unstorable", prompt_tokens=tokens, latency_ms=1.0)
    chat("good-2")
    chat("good-3")

    with caplog.at_level(logging.WARNING, logger="llm.usage"):
        assert usage.flush() == 3

    assert stored_models() == ["good-1", "good-2", "good-3"]
    assert len(buffered) == 0
    told = [r for r in caplog.records if r.name == "llm.usage" and r.levelno >= logging.WARNING]
    assert len(told) == 1, [r.getMessage() for r in told]
    message = told[0].getMessage()
    assert "dropped" in message
    assert "'unstorable'" in message
    assert FAKE_KEY not in message
    assert GLOBAL_KEY not in message
    after = scrape()
    assert dropped(after) - dropped(before) == 1
    # Counted under the error's class, which the log names too.
    (reason,) = {r for r in reasons(after) if dropped(after, reason=r) > dropped(before, reason=r)}
    assert reason in ("IntegrityError", "DataError", "OverflowError")
    assert f"{reason}:" in message

    chat("later")
    assert usage.flush() == 1
    assert "later" in stored_models()


def test_several_unstorable_records_in_a_large_batch_are_dropped_one_by_one(
    transactional_db, buffered, caplog
):
    for number in range(100):
        bad = number in (0, 37, 38, 99)
        usage.record(
            purpose="chat", model=f"m{number}", prompt_tokens=-1 if bad else 1, latency_ms=1.0
        )

    with caplog.at_level(logging.WARNING, logger="llm.usage"):
        assert usage.flush() == 96

    assert UsageRecord.objects.count() == 96
    assert not UsageRecord.objects.filter(model__in=["m0", "m37", "m38", "m99"]).exists()
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 4


# ---- the database is down: nothing is dropped -----------------------------------------


def test_a_database_that_is_down_keeps_the_whole_batch(
    transactional_db, buffered, caplog, database_down
):
    before = scrape()
    usage.record(purpose="chat", model="one", latency_ms=1.0)
    usage.record(purpose="chat", model="unstorable", prompt_tokens=-1, latency_ms=1.0)
    usage.record(purpose="chat", model="two", latency_ms=1.0)

    database_down.down()
    assert usage.flush() == 0
    assert usage.flush() == 0
    assert len(buffered) == 3  # kept for the next flush, the unstorable one too
    database_down.up()

    assert dropped(scrape()) == dropped(before)
    assert usage.flush() == 2
    assert stored_models() == ["one", "two"]
    assert len(buffered) == 0


# ---- a credential or a user deleted meanwhile -----------------------------------------


def test_a_credential_deleted_before_the_flush_keeps_its_usage(
    transactional_db, buffered, credential, alice, admin_client
):
    pk = credential.pk
    chat("gpt-test-mini", credential=credential, user=alice)
    chat("unrelated")  # no credential: refused, recorded as well
    credential.delete()

    assert usage.flush() == 2

    record = UsageRecord.objects.get(model="gpt-test-mini")
    assert (record.credential_id, record.serving_credential_id) == (pk, pk)
    assert record.credential_title == "Alice proxy"
    assert record.serving_credential_title == "Alice proxy"
    assert record.outcome == "ok"
    assert record.cost_usd == Decimal("0.0042")
    listing = admin_client.get(RECORDS_URL)
    assert listing.status_code == 200
    assert "Alice proxy (deleted)" in listing.content.decode()
    mine = admin_client.get(RECORDS_URL, {"credential__id__exact": str(pk)})
    assert mine.status_code == 200, mine
    assert [r.pk for r in mine.context["cl"].result_list] == [record.pk]
    page = admin_client.get(reverse("admin:llm_usagerecord_change", args=[record.pk]))
    assert page.status_code == 200
    assert "Alice proxy (deleted)" in page.content.decode()


def test_a_deleted_credential_keeps_the_usage_already_written(db, credential, alice, admin_client):
    services.chat(messages=HELLO, model="gpt-test-mini", credential=credential, user=alice)
    pk = credential.pk
    credential.title = "Renamed proxy"
    credential.save()
    listing = admin_client.get(RECORDS_URL).content.decode()
    assert "Renamed proxy" in listing  # a live credential shows its name of today

    credential.delete()

    record = UsageRecord.objects.get()
    assert (record.credential_id, record.serving_credential_id) == (pk, pk)
    assert record.credential_title == "Alice proxy"  # its name when the call was made
    listing = admin_client.get(RECORDS_URL).content.decode()
    assert "Alice proxy (deleted)" in listing
    search = admin_client.get(RECORDS_URL, {"q": "Alice proxy"})
    assert search.context["cl"].result_count == 1


def test_a_fallback_deleted_after_serving_shows_on_the_credentials_usage(
    db, credential_factory, alice, costly, admin_client
):
    fallback = credential_factory(title="Backup", owner=alice, base_url=costly.base_url)
    closed = f"http://127.0.0.1:{free_port()}/v1"
    chosen = credential_factory(title="Main", owner=alice, base_url=closed, fallback=fallback)
    services.chat(messages=HELLO, model="gpt-test-mini", credential=chosen, user=alice)
    fallback.delete()

    record = UsageRecord.objects.get()
    assert record.failed_over is True
    assert record.serving_credential_title == "Backup"
    change = reverse("admin:credentials_apikeycredentials_change", args=[chosen.pk])
    assert admin_client.get(change).status_code == 200
    listing = admin_client.get(RECORDS_URL).content.decode()
    assert "Backup (deleted)" in listing
    assert "Main" in listing


def test_a_user_deleted_before_the_flush_does_not_stop_their_usage(
    transactional_db, buffered, global_route, django_user_model
):
    bob = django_user_model.objects.create_user("bob")
    chat("bobs-call", user=bob)
    chat("platform-call")
    bob.delete()

    assert usage.flush() == 2

    assert stored_models() == ["bobs-call", "platform-call"]
    assert UsageRecord.objects.get(model="bobs-call").user_id is None


def test_a_user_deleted_later_leaves_usage_without_a_user(db, global_route, alice, admin_client):
    chat("alices-call", user=alice)
    alice.delete()

    assert UsageRecord.objects.get().user_id is None
    assert admin_client.get(RECORDS_URL).status_code == 200


# ---- at exit ---------------------------------------------------------------------------


def test_the_exit_flush_writes_everything_storable(transactional_db):
    script = (
        "from llm import usage\n"
        "usage.record(purpose='chat', model='exit-1', latency_ms=1.0)\n"
        "usage.record(purpose='chat', model='gpt-\\ud800', latency_ms=1.0)\n"
        "usage.record(purpose='chat', model='gpt-\\x00', latency_ms=1.0)\n"
        "usage.record(purpose='chat', model='bad', prompt_tokens=-1, latency_ms=1.0)\n"
        "usage.record(purpose='chat', model='exit-2', latency_ms=1.0)\n"
    )
    env = subprocess_env(DATABASE_URL=database_url(), LLM_USAGE_FLUSH_SECONDS="600")

    result = run_manage("shell", "-c", script, env=env)

    assert result.returncode == 0, result.stderr
    assert stored_models() == ["exit-1", "exit-2", "gpt-", "gpt-\ufffd"]
    assert "'bad'" in result.stderr  # the dropped record is logged


# ---- the migration ---------------------------------------------------------------------


def test_the_migration_gives_existing_usage_its_credentials_titles(
    transactional_db, credential_factory
):
    chosen = credential_factory(title="Main")
    backup = credential_factory(title="Backup")
    before, after = (
        [("llm", "0002_serving_credential")],
        [("llm", "0003_usage_outlives_credentials")],
    )
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps.get_model("llm", "UsageRecord")
    old.objects.create(
        purpose="chat", model="both", credential_id=chosen.pk, serving_credential_id=backup.pk
    )
    old.objects.create(purpose="chat", model="none")

    executor = MigrationExecutor(connection)
    executor.migrate(after)
    migrated = executor.loader.project_state(after).apps.get_model("llm", "UsageRecord")
    titles = {
        r.model: (r.credential_title, r.serving_credential_title) for r in migrated.objects.all()
    }
    MigrationExecutor(connection).migrate(executor.loader.graph.leaf_nodes())

    assert titles == {"both": ("Main", "Backup"), "none": ("", "")}
