"""Rotation at scale, on PostgreSQL: 10,000 credentials re-encrypted by
`manage.py rotate_credential_keys` in a process of its own, killed with SIGKILL at random
points and run again, while admins keep editing.

What an operator relies on: after the last run every stored key opens with the new key
alone and is the key that was entered, nothing else about a credential changed, and an
edit made while the command ran is neither lost nor left under the old key.

PostgreSQL only (row locks and concurrent transactions are what is tested); select it with
`pytest tests/credentials/test_rotation_scale.py`. The kill points and edit targets are
random: each test prints its seed, and KEYROUTE_ROTATION_SEED=<seed> replays a run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.fernet import Fernet, InvalidToken
from django.db import connection
from django.db.models.signals import post_init
from django.urls import reverse

from credentials.crypto import DecryptionError
from credentials.models import APIKeyCredentials, Provider
from credentials.secret import hint_for
from tests.conftest import PROJECT, database_url, run_manage, subprocess_env

pytestmark = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="A PostgreSQL test (row locks under concurrent transactions): "
    "run it with DATABASE_URL=postgres://...",
)

ROWS = 10_000
BATCH = 200
KILLS = 3
# Edits made at random per batch the rotation reports (the machine has to run it too).
EDITS_PER_BATCH = 2
# Every column but the key itself: rotation must leave them as they were.
COLUMNS = [f.attname for f in APIKeyCredentials._meta.concrete_fields if f.attname != "api_key"]
PROGRESS = re.compile(r"Batch (?P<batch>\d+): (?P<checked>\d+)/\d+ checked, (?P<rotated>\d+) ")
DONE = re.compile(
    r"Done: (?P<rotated>\d+) re-encrypted, (?P<current>\d+) already under the current key, "
    r"(?P<unreadable>\d+) unreadable, of (?P<total>\d+) credentials\."
)
STALE_KEY_BUG = (
    "BUG: a save() of a credential loaded before the rotation re-encrypted it wrote the old "
    "token back (save() writes api_key even when no new key was entered)"
)


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("KEYROUTE_ROTATION_SEED") or random.SystemRandom().randrange(2**32))
    print(f"KEYROUTE_ROTATION_SEED={seed}")  # shown with the failure
    return random.Random(seed)


@pytest.fixture
def old() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def new() -> str:
    return Fernet.generate_key().decode()


@dataclass
class Population:
    """The credentials as created: plaintext and every other column, by pk."""

    plaintexts: dict[uuid.UUID, str]
    columns: dict[uuid.UUID, tuple[Any, ...]]
    pks: list[uuid.UUID] = field(init=False)  # in the order the command walks them

    def __post_init__(self) -> None:
        self.pks = sorted(self.plaintexts)


def populate(
    settings: Any, count: int, keys: list[str], rng: random.Random, owners: list[Any]
) -> Population:
    """`count` credentials with distinct keys, encrypted under `keys` by the model field
    (bulk_create runs its pre_save), with every column varied. `settings`: pytest-django's."""
    settings.CREDENTIALS_ENCRYPTION_KEYS = keys
    providers = list(Provider)
    expiry = datetime(2031, 1, 1, 12, tzinfo=UTC)
    rows = []
    for number in range(count):
        rows.append(
            APIKeyCredentials(
                title=f"Scale {number:05d}",
                provider=providers[number % len(providers)],
                owner=owners[number % len(owners)],
                api_key=f"sk-test-fake-scale-{number:05d}-{rng.getrandbits(48):012x}",
                base_url="" if number % 2 else f"http://litellm-{number % 7}:4000/v1",
                is_active=number % 10 != 0,
                expires_at=expiry + timedelta(days=number) if number % 5 == 0 else None,
            )
        )
    APIKeyCredentials.objects.bulk_create(rows, batch_size=1000)
    plaintexts = {row.pk: row.api_key.get_secret_value() for row in rows}
    # The field encrypted them: the column holds a token under the first key, no plaintext.
    tokens = raw_tokens()
    assert set(tokens) == set(plaintexts)
    assert all(plaintexts[pk] not in token for pk, token in tokens.items())
    assert opened_by(keys[0], tokens, plaintexts) == set(plaintexts)
    return Population(plaintexts, snapshot())


@pytest.fixture
def population(
    transactional_db: None, settings: Any, django_user_model: Any, old: str, rng: random.Random
) -> Population:
    """10,000 credentials under the old key, shared or owned by one of two users."""
    alice = django_user_model.objects.create_user("alice")
    bob = django_user_model.objects.create_user("bob")
    return populate(settings, ROWS, [old], rng, [None, alice, bob])


def snapshot() -> dict[uuid.UUID, tuple[Any, ...]]:
    return {row[0]: row[1:] for row in APIKeyCredentials.objects.values_list("pk", *COLUMNS)}


def raw_tokens() -> dict[uuid.UUID, str]:
    """The api_key column of every row, read with SQL."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id, api_key FROM {APIKeyCredentials._meta.db_table}")
        return {pk: token for pk, token in cursor.fetchall()}


def opened_by(key: str, tokens: dict[uuid.UUID, str], plaintexts: dict[Any, str]) -> set[Any]:
    """The rows `key` alone decrypts; each must give its own plaintext."""
    fernet = Fernet(key)
    opened, wrong = set(), []
    for pk, token in tokens.items():
        try:
            value = fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            continue
        if value != plaintexts[pk]:
            wrong.append(pk)
        opened.add(pk)
    assert wrong == [], f"{len(wrong)} row(s) decrypt to another row's key"
    return opened


def unopenable_through_the_model(plaintexts: dict[uuid.UUID, str]) -> list[str]:
    """Titles of the rows the site, configured with its current keys, cannot use as
    entered: a DecryptionError or another plaintext."""
    failed = []
    for credential in APIKeyCredentials.objects.only("pk", "title", "api_key").iterator(2000):
        try:
            ok = credential.api_key.get_secret_value() == plaintexts[credential.pk]
        except DecryptionError:
            ok = False
        if not ok:
            failed.append(credential.title)
    return failed


def rotation(env: dict[str, str], *options: str) -> subprocess.Popen[str]:
    command = [sys.executable, str(PROJECT / "manage.py"), "rotate_credential_keys"]
    return subprocess.Popen(
        [*command, "--batch-size", str(BATCH), *options],
        env=env,
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def done(output: str) -> dict[str, int]:
    match = DONE.search(output)
    assert match, output
    return {name: int(value) for name, value in match.groupdict().items()}


@pytest.fixture
def rotation_env(new: str, old: str) -> dict[str, str]:
    """The site reconfigured for a rotation: the new key first, the old one after it."""
    return subprocess_env(CREDENTIALS_ENCRYPTION_KEYS=f"{new},{old}", DATABASE_URL=database_url())


@pytest.fixture
def watchdog() -> Iterator[Callable[[subprocess.Popen[str]], None]]:
    """Kill a child after a minute, so that one that never prints cannot hang the suite."""
    timers: list[threading.Timer] = []

    def watch(process: subprocess.Popen[str]) -> None:
        timer = threading.Timer(60, process.kill)
        timer.start()
        timers.append(timer)

    yield watch
    for timer in timers:
        timer.cancel()


def kill_mid_run(
    env: dict[str, str], rng: random.Random, watch: Callable[[subprocess.Popen[str]], None]
) -> list[str]:
    """Start a rotation and SIGKILL it at a random point once it has re-encrypted a batch:
    after 0-4 more batches and a fraction of a batch's time. Returns what it printed."""
    more_batches, delay = rng.randint(0, 4), rng.uniform(0, 0.05)
    process = rotation(env)
    watch(process)
    seen: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        progress = PROGRESS.match(line)
        if progress and int(progress["rotated"]):
            if more_batches == 0:
                break
            more_batches -= 1
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, (seen, stderr)
    return seen


def test_a_rotation_killed_three_times_finishes_on_a_rerun_and_changes_nothing_else(
    population: Population,
    rotation_env: dict[str, str],
    new: str,
    old: str,
    rng: random.Random,
    watchdog: Callable[[subprocess.Popen[str]], None],
    settings: Any,
) -> None:
    plaintexts = population.plaintexts
    rotated = 0
    for kill in range(1, KILLS + 1):
        printed = kill_mid_run(rotation_env, rng, watchdog)

        tokens = raw_tokens()
        under_new = opened_by(new, tokens, plaintexts)
        under_old = opened_by(old, tokens, plaintexts)
        # Every row holds its old token or its new one, never anything else or nothing.
        assert under_new | under_old == set(plaintexts), f"kill {kill}"
        assert not under_new & under_old
        # Whole batches only, in primary-key order, and each run got further.
        assert len(under_new) % BATCH == 0, f"kill {kill}: a batch was half-committed"
        assert under_new == set(population.pks[: len(under_new)]), f"kill {kill}"
        assert rotated < len(under_new) < ROWS, (kill, rotated, len(under_new), printed[-3:])
        # What it printed was committed: a batch is reported after its commit.
        last = PROGRESS.match(printed[-1])
        assert last, printed[-1]
        assert len(under_new) >= int(last["checked"]), (kill, printed[-1])
        rotated = len(under_new)
        assert snapshot() == population.columns, f"kill {kill} changed another column"

    result = run_manage("rotate_credential_keys", "--batch-size", str(BATCH), env=rotation_env)

    assert result.returncode == 0, result.stderr
    assert done(result.stdout) == {
        "rotated": ROWS - rotated,
        "current": rotated,
        "unreadable": 0,
        "total": ROWS,
    }
    tokens = raw_tokens()
    assert opened_by(new, tokens, plaintexts) == set(plaintexts)
    assert opened_by(old, tokens, plaintexts) == set()
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new]  # the old key is dropped
    assert unopenable_through_the_model(plaintexts) == []
    # Title, owner, base URL, hint, dates (updated_at included): all as they were.
    assert snapshot() == population.columns


# ---- edits while the rotation runs ------------------------------------------------------


def change_url(pk: uuid.UUID) -> str:
    return reverse("admin:credentials_apikeycredentials_change", args=[pk])


def admin_form(credential: APIKeyCredentials, **changes: str) -> dict[str, str]:
    """The change form as the admin page submits it: every field as stored, key blank."""
    expires = credential.expires_at
    data = {
        "title": credential.title,
        "provider": credential.provider,
        "owner": str(credential.owner_id or ""),
        "api_key": "",
        "base_url": credential.base_url,
        "fallback": str(credential.fallback_id or ""),
        "expires_at_0": f"{expires:%Y-%m-%d}" if expires else "",
        "expires_at_1": f"{expires:%H:%M:%S}" if expires else "",
        "_save": "Save",
    }
    if credential.is_active:
        data["is_active"] = "on"
    data.update(changes)
    return data


class Progress:
    """The rows a running rotation has checked so far, read from its output in a thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.checked = 0
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)
            if progress := PROGRESS.match(line):
                self.checked = int(progress["checked"])

    def join(self) -> str:
        self._thread.join(30)
        return "".join(self.lines)


@dataclass
class Edit:
    """An edit and what it must leave: the title and key the row holds afterwards."""

    how: str
    pk: uuid.UUID
    title: str
    key: str


class Editor:
    """Edits credentials the two ways the site does: the admin change view (a superuser's
    browser) and the model's save() (as the admin form and scripts do)."""

    def __init__(self, client: Any, plaintexts: dict[uuid.UUID, str]) -> None:
        self.client = client
        self.plaintexts = plaintexts
        self.edits: dict[uuid.UUID, Edit] = {}

    def _edit(self, how: str, pk: uuid.UUID, with_key: bool) -> tuple[str, str]:
        number = len(self.edits)
        title = f"Edited {number:03d} by {how}"
        key = f"sk-test-fake-entered-{number:03d}-during-rotation" if with_key else ""
        self.edits[pk] = Edit(how, pk, title, key or self.plaintexts[pk])
        return title, key

    def admin(self, pk: uuid.UUID, *, with_key: bool, form: dict[str, str] | None = None) -> None:
        """POST the change form (`form`: one loaded earlier, as a browser tab keeps it)."""
        form = form or admin_form(APIKeyCredentials.objects.get(pk=pk))
        title, key = self._edit("admin", pk, with_key)
        response = self.client.post(change_url(pk), {**form, "title": title, "api_key": key})
        assert response.status_code == 302, response.content.decode()[:2000]

    def orm(self, credential: APIKeyCredentials, *, with_key: bool) -> None:
        """Save `credential` (loaded just now, or earlier) with a new title."""
        title, key = self._edit("save()", credential.pk, with_key)
        credential.title = title
        if key:
            credential.api_key = key
        credential.full_clean()
        credential.save()


def test_edits_made_while_a_rotation_runs_are_kept_and_open_with_the_new_key(
    population: Population,
    rotation_env: dict[str, str],
    new: str,
    old: str,
    rng: random.Random,
    watchdog: Callable[[subprocess.Popen[str]], None],
    admin_client: Any,
    settings: Any,
) -> None:
    plaintexts, pks = population.plaintexts, population.pks
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]  # this process is a reconfigured site
    position = {pk: index for index, pk in enumerate(pks)}
    editor = Editor(admin_client, plaintexts)
    # Loaded before the rotation reaches them, saved after it passed them: the admin's
    # form in an open tab, and an instance a script or a shell holds.
    ahead = rng.sample(range(ROWS // 4, ROWS // 2), 8)
    stale_forms = {pks[i]: admin_form(APIKeyCredentials.objects.get(pk=pks[i])) for i in ahead[:4]}
    stale_rows = [APIKeyCredentials.objects.get(pk=pks[i]) for i in ahead[4:]]
    process = rotation(rotation_env, "--pause", "0.02")
    watchdog(process)
    progress = Progress(process)

    made = 0
    while process.poll() is None:
        checked = progress.checked
        for pk in [pk for pk in stale_forms if position[pk] < checked]:
            editor.admin(pk, with_key=False, form=stale_forms.pop(pk))
        for row in [row for row in stale_rows if position[row.pk] < checked]:
            stale_rows.remove(row)
            editor.orm(row, with_key=False)
        # A row in the batch being rotated now or the next one, not edited yet; only once
        # the rotation is under way, and spread over its run.
        index = min(checked + rng.randrange(2 * BATCH), ROWS - 1)
        if (
            made >= EDITS_PER_BATCH * checked // BATCH
            or pks[index] in editor.edits
            or index in ahead
        ):
            time.sleep(0.01)
            continue
        made += 1
        with_key = rng.random() < 0.3
        if rng.random() < 0.5:
            editor.admin(pks[index], with_key=with_key)
        else:
            editor.orm(APIKeyCredentials.objects.get(pk=pks[index]), with_key=with_key)
    output = progress.join()

    assert process.wait() == 0, process.stderr.read() if process.stderr else ""
    assert done(output)["total"] == ROWS
    # The rotation passed every stale row before it ended: 10,000 rows take seconds.
    assert (stale_forms, stale_rows) == ({}, []), "the rotation ended too soon"
    edits = editor.edits
    assert len(edits) >= 40, f"only {len(edits)} edits landed during the rotation"
    print(f"{len(edits)} edits during the rotation")
    expected = {**plaintexts, **{pk: edit.key for pk, edit in edits.items()}}

    # Every edit is there.
    titles = dict(APIKeyCredentials.objects.filter(pk__in=edits).values_list("pk", "title"))
    assert {pk: titles[pk] for pk in edits} == {pk: edit.title for pk, edit in edits.items()}
    # Every row opens with the new key alone and holds the key last entered.
    tokens = raw_tokens()
    under_old = opened_by(old, tokens, expected)
    assert [(edits[pk].how, titles[pk]) for pk in under_old if pk in edits] == [], STALE_KEY_BUG
    assert under_old == set()
    assert opened_by(new, tokens, expected) == set(expected)
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new]
    assert unopenable_through_the_model(expected) == []
    # Nothing else changed: the rows nobody edited are as they were, and an edit changed
    # its title, its key hint (a new key), its updated_at and nothing more.
    after = snapshot()
    assert {pk: after[pk] for pk in pks if pk not in edits} == {
        pk: population.columns[pk] for pk in pks if pk not in edits
    }
    varying = {COLUMNS.index(name) for name in ("title", "key_hint", "updated_at")}
    for pk, edit in edits.items():
        was, now = population.columns[pk], after[pk]
        assert [v for i, v in enumerate(now) if i not in varying] == [
            v for i, v in enumerate(was) if i not in varying
        ], edit
        assert now[COLUMNS.index("key_hint")] == hint_for(edit.key)


# ---- the race, made to happen every time ------------------------------------------------


def test_a_credential_loaded_before_the_rotation_and_saved_after_it_keeps_the_new_key(
    transactional_db: None,
    settings: Any,
    old: str,
    new: str,
    rng: random.Random,
    rotation_env: dict[str, str],
) -> None:
    """A form or a script holding a credential from before the rotation saves a new
    title: the stored key must stay under the new key, as the rotation left it."""
    population = populate(settings, 3, [old], rng, [None])
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]
    held = APIKeyCredentials.objects.get(pk=population.pks[1])
    result = run_manage("rotate_credential_keys", env=rotation_env)
    assert result.returncode == 0, result.stderr

    held.title = "Renamed after the rotation"
    held.full_clean()
    held.save()

    settings.CREDENTIALS_ENCRYPTION_KEYS = [new]
    assert unopenable_through_the_model(population.plaintexts) == [], STALE_KEY_BUG
    assert APIKeyCredentials.objects.get(pk=held.pk).title == "Renamed after the rotation"


def test_an_admin_save_the_rotation_overtakes_keeps_the_new_key(
    transactional_db: None,
    settings: Any,
    old: str,
    new: str,
    rng: random.Random,
    rotation_env: dict[str, str],
    admin_client: Any,
) -> None:
    """The admin's POST reads the row, the rotation re-encrypts it and commits, then the
    POST writes its change: the window inside one request, which a rotation batch holding
    the row's lock stretches over the whole batch for every concurrent admin save."""
    population = populate(settings, 3, [old], rng, [None])
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]
    target = APIKeyCredentials.objects.get(pk=population.pks[1])
    rotations: list[subprocess.CompletedProcess[str]] = []

    def rotate_once_read(sender: Any, instance: APIKeyCredentials, **kwargs: Any) -> None:
        # The view has just read the row (its get_object()), before it validates and
        # saves: the rotation runs to its end now.
        if instance.pk == target.pk and not rotations:
            rotations.append(run_manage("rotate_credential_keys", env=rotation_env, timeout=30))

    post_init.connect(rotate_once_read, sender=APIKeyCredentials, dispatch_uid="rotate-once-read")
    try:
        response = admin_client.post(
            change_url(target.pk), admin_form(target, title="Renamed during the rotation")
        )
    finally:
        post_init.disconnect(sender=APIKeyCredentials, dispatch_uid="rotate-once-read")

    assert response.status_code == 302
    (rotated,) = rotations
    assert rotated.returncode == 0, rotated.stderr
    assert done(rotated.stdout)["rotated"] == 3
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new]
    assert unopenable_through_the_model(population.plaintexts) == [], STALE_KEY_BUG
    assert APIKeyCredentials.objects.get(pk=target.pk).title == "Renamed during the rotation"
