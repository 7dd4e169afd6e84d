"""`manage.py rotate_credential_keys`: re-encrypt every stored API key under the first key."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import threading
import uuid

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command

from credentials.crypto import DecryptionError
from credentials.models import APIKeyCredentials
from tests.conftest import PROJECT, database_url, raw_api_key, run_manage, subprocess_env

DONE = re.compile(
    r"Done: (?P<rotated>\d+) (?:re-encrypted|would be re-encrypted), "
    r"(?P<current>\d+) already under the current key, (?P<unreadable>\d+) unreadable, "
    r"of (?P<total>\d+) credentials\."
)


def new_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def old() -> str:
    return new_key()


@pytest.fixture
def new() -> str:
    return new_key()


@pytest.fixture
def make_credentials(credential_factory, settings):
    """Create `count` credentials under `keys`; returns {pk: plaintext}."""

    def make(keys: list[str], count: int, *, prefix: str = "rotation") -> dict[object, str]:
        settings.CREDENTIALS_ENCRYPTION_KEYS = keys
        created = {}
        for number in range(count):
            plaintext = f"sk-test-fake-{prefix}-{number:04d}"
            credential = credential_factory(title=f"{prefix} {number:04d}", api_key=plaintext)
            created[credential.pk] = plaintext
        return created

    return make


def opened_by(settings, keys: list[str], plaintexts: dict[uuid.UUID, str]) -> set[uuid.UUID]:
    """The pks whose stored key `keys` decrypts; each must decrypt to its own plaintext."""
    settings.CREDENTIALS_ENCRYPTION_KEYS = keys
    opened = set()
    for pk, plaintext in plaintexts.items():
        try:
            value = APIKeyCredentials.objects.get(pk=pk).api_key.get_secret_value()
        except DecryptionError:
            continue
        assert value == plaintext
        opened.add(pk)
    return opened


def raw_tokens(pks) -> dict[object, str]:
    return {pk: raw_api_key(pk) for pk in pks}


def done(output: str) -> dict[str, int]:
    match = DONE.search(output)
    assert match, output
    return {name: int(value) for name, value in match.groupdict().items()}


def rotate(**options) -> str:
    stdout = io.StringIO()
    call_command("rotate_credential_keys", stdout=stdout, stderr=io.StringIO(), **options)
    return stdout.getvalue()


def test_it_re_encrypts_every_row_under_the_new_key(make_credentials, settings, old, new):
    plaintexts = make_credentials([old], 7)
    before = raw_tokens(plaintexts)
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]

    output = rotate()

    assert done(output) == {"rotated": 7, "current": 0, "unreadable": 0, "total": 7}
    assert opened_by(settings, [new], plaintexts) == set(plaintexts)
    after = raw_tokens(plaintexts)
    assert all(after[pk] != before[pk] for pk in plaintexts)
    assert opened_by(settings, [old], plaintexts) == set()


def test_it_works_in_batches(make_credentials, settings, old, new):
    plaintexts = make_credentials([old], 7)
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]

    output = rotate(batch_size=3)

    batches = [line for line in output.splitlines() if line.startswith("Batch ")]
    assert batches == [
        "Batch 1: 3/7 checked, 3 re-encrypted, 0 already current, 0 unreadable",
        "Batch 2: 6/7 checked, 6 re-encrypted, 0 already current, 0 unreadable",
        "Batch 3: 7/7 checked, 7 re-encrypted, 0 already current, 0 unreadable",
    ]
    assert opened_by(settings, [new], plaintexts) == set(plaintexts)


def test_it_is_idempotent(make_credentials, settings, old, new):
    plaintexts = make_credentials([old], 6)
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]
    rotate(batch_size=4)
    after_first = raw_tokens(plaintexts)

    output = rotate(batch_size=4)

    assert done(output) == {"rotated": 0, "current": 6, "unreadable": 0, "total": 6}
    assert "Batch 2: 6/6 checked, 0 re-encrypted, 6 already current, 0 unreadable" in output
    assert raw_tokens(plaintexts) == after_first
    assert opened_by(settings, [new], plaintexts) == set(plaintexts)


def test_it_changes_nothing_on_a_dry_run(make_credentials, settings, old, new):
    plaintexts = make_credentials([old], 5)
    make_credentials([new], 2, prefix="current")
    before = raw_tokens(plaintexts)
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]

    output = rotate(dry_run=True, batch_size=2)

    assert done(output) == {"rotated": 5, "current": 2, "unreadable": 0, "total": 7}
    assert "would be re-encrypted" in output
    assert "to re-encrypt" in output
    assert raw_tokens(plaintexts) == before
    assert opened_by(settings, [new], plaintexts) == set()
    assert opened_by(settings, [old], plaintexts) == set(plaintexts)


def test_it_does_nothing_without_credentials(db):
    output = rotate()

    assert done(output) == {"rotated": 0, "current": 0, "unreadable": 0, "total": 0}


def test_it_refuses_a_batch_size_below_one(make_credentials, settings, old, new):
    plaintexts = make_credentials([old], 1)
    before = raw_tokens(plaintexts)
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]

    with pytest.raises(CommandError, match="--batch-size must be at least 1"):
        rotate(batch_size=0)

    assert raw_tokens(plaintexts) == before


def test_it_refuses_a_negative_pause(make_credentials, settings, old, new):
    plaintexts = make_credentials([old], 3)
    before = raw_tokens(plaintexts)
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]

    with pytest.raises(CommandError, match="--pause"):
        rotate(batch_size=1, pause=-1.0)

    assert raw_tokens(plaintexts) == before


def test_it_lists_an_unreadable_row_and_rotates_the_others(make_credentials, settings, old, new):
    plaintexts = make_credentials([old], 4)
    third = new_key()
    lost = make_credentials([third], 1, prefix="lost")
    (lost_pk,) = lost
    lost_token = raw_api_key(lost_pk)
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]
    stdout = io.StringIO()

    with pytest.raises(CommandError) as raised:
        call_command("rotate_credential_keys", stdout=stdout, stderr=io.StringIO())

    message = str(raised.value)
    assert "1 credential(s) cannot be decrypted" in message
    assert str(lost_pk) in message
    assert "lost 0000" in message
    assert "Put the key it was encrypted with back" in message
    for pk in plaintexts:
        assert str(pk) not in message
    assert done(stdout.getvalue()) == {"rotated": 4, "current": 0, "unreadable": 1, "total": 5}
    assert raw_api_key(lost_pk) == lost_token
    assert opened_by(settings, [new], plaintexts) == set(plaintexts)
    assert opened_by(settings, [third], lost) == set(lost)


def test_it_exits_non_zero_on_an_unreadable_row(transactional_db, make_credentials, old, new):
    plaintexts = make_credentials([old], 2)
    lost = make_credentials([new_key()], 1, prefix="lost")
    (lost_pk,) = lost
    lost_token = raw_api_key(lost_pk)

    result = run_manage(
        "rotate_credential_keys",
        env=subprocess_env(CREDENTIALS_ENCRYPTION_KEYS=f"{new},{old}", DATABASE_URL=database_url()),
    )

    assert result.returncode != 0
    assert "CommandError" in result.stderr
    assert str(lost_pk) in result.stderr
    assert "lost 0000" in result.stderr
    assert done(result.stdout) == {"rotated": 2, "current": 0, "unreadable": 1, "total": 3}
    assert raw_api_key(lost_pk) == lost_token
    for pk in plaintexts:
        assert Fernet(new).decrypt(raw_api_key(pk).encode()).decode() == plaintexts[pk]


def test_it_never_prints_a_plaintext(make_credentials, settings, old, new):
    plaintexts = make_credentials([old], 3)
    plaintexts |= make_credentials([new], 2, prefix="current")
    make_credentials([new_key()], 1, prefix="lost")
    settings.CREDENTIALS_ENCRYPTION_KEYS = [new, old]
    shown = []

    for options in ({"dry_run": True}, {"batch_size": 2}):
        stdout, stderr = io.StringIO(), io.StringIO()
        with pytest.raises(CommandError) as raised:
            call_command("rotate_credential_keys", stdout=stdout, stderr=stderr, **options)
        shown += [stdout.getvalue(), stderr.getvalue(), str(raised.value)]

    assert "Done:" in shown[0]
    for plaintext in plaintexts.values():
        for text in shown:
            assert plaintext not in text
            # Not even the distinctive tail of a key.
            assert plaintext.removeprefix("sk-test-fake-") not in text


def test_a_killed_run_leaves_every_row_readable_and_a_second_run_finishes(
    transactional_db, make_credentials, settings, old, new
):
    plaintexts = make_credentials([old], 40)
    env = subprocess_env(CREDENTIALS_ENCRYPTION_KEYS=f"{new},{old}", DATABASE_URL=database_url())
    proc = subprocess.Popen(
        [
            sys.executable,
            str(PROJECT / "manage.py"),
            "rotate_credential_keys",
            "--batch-size",
            "5",
            "--pause",
            "0.3",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=PROJECT,
    )
    # A watchdog, so that a child that never prints cannot hang the suite.
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    seen = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("Batch 1:"):
                proc.kill()
                break
    finally:
        watchdog.cancel()
        proc.kill()
        _, stderr = proc.communicate(timeout=30)
    assert seen, stderr
    assert seen[-1].startswith("Batch 1:"), (seen, stderr)
    assert proc.returncode == -9

    # Every row opens with the configured keys: each holds its old token or its new one.
    assert opened_by(settings, [new, old], plaintexts) == set(plaintexts)
    rotated = opened_by(settings, [new], plaintexts)
    assert 5 <= len(rotated) < len(plaintexts), "the kill did not land mid-way"
    # Whole batches only, in primary-key order: a killed batch left nothing half-done.
    assert len(rotated) % 5 == 0
    assert rotated == set(sorted(plaintexts)[: len(rotated)])
    assert opened_by(settings, [old], plaintexts) == set(plaintexts) - rotated

    result = run_manage("rotate_credential_keys", "--batch-size", "5", env=env)

    assert result.returncode == 0, result.stderr
    assert done(result.stdout) == {
        "rotated": len(plaintexts) - len(rotated),
        "current": len(rotated),
        "unreadable": 0,
        "total": len(plaintexts),
    }
    assert "Batch 1: 5/40 checked, 0 re-encrypted, 5 already current, 0 unreadable" in (
        result.stdout
    )
    assert opened_by(settings, [new], plaintexts) == set(plaintexts)
    for plaintext in plaintexts.values():
        assert plaintext not in "".join(seen) + stderr + result.stdout + result.stderr


def test_it_shows_progress_in_place_on_a_terminal(transactional_db, make_credentials, old, new):
    make_credentials([old], 3)
    env = subprocess_env(CREDENTIALS_ENCRYPTION_KEYS=f"{new},{old}", DATABASE_URL=database_url())
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(PROJECT / "manage.py"),
                "rotate_credential_keys",
                "--batch-size",
                "1",
            ],
            env=env,
            cwd=PROJECT,
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
        os.close(follower)
        output = b""
        while chunk := read_available(leader):
            output += chunk
    finally:
        os.close(leader)

    assert proc.returncode == 0, proc.stderr
    text = output.decode()
    assert text.count("\rBatch ") == 3
    assert "Done: 3 re-encrypted" in text


def read_available(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal's other end is closed and drained
        return b""
