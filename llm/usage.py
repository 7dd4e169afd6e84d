"""Usage records: one per call, written without slowing the call down.

Records go into a bounded in-memory buffer that a background thread writes in bulk
every LLM_USAGE_FLUSH_SECONDS (and at process exit), together with each credential's
`last_used_at`: a call itself never waits for the database. A crash (SIGKILL, power
loss) loses at most the records of the last interval. A failed write (database down)
keeps its records for the next flush; when LLM_USAGE_BUFFER_SIZE records are waiting,
the oldest are dropped and counted in a warning. With LLM_USAGE_FLUSH_SECONDS=0 every
record is written as its call ends (in the caller's thread).

Records never block each other. Their text is made storable when they are buffered
(`as_row`: what a user sent as a model name may hold NULs or lone surrogates); a batch
the database still refuses is split in halves, each written in a transaction of its
own, until the record it refuses is alone: that one is dropped, logged with the
database's reason and counted (keyroute_usage_records_unstorable_total), and the others
are written (`store`). Only errors of the database itself (OperationalError,
InterfaceError: down, unreachable, connection lost; ProgrammingError: a missing table or
column, or no permission, as while a deploy waits for its migration) keep the whole
batch for the next flush. Deleting a credential or a user cannot make a record
unstorable (llm.models).

Reports over the records (the admin's totals and chart) live in llm.reports.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
from collections import deque
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import (
    InterfaceError,
    OperationalError,
    ProgrammingError,
    connections,
    router,
    transaction,
)
from django.db.models import Q
from django.utils import timezone

from credentials.models import APIKeyCredentials
from llm import metrics
from llm.models import UsageRecord
from platform_site.signals import worker_stopping

log = logging.getLogger(__name__)

Row = tuple[Any, ...]

# The database failed, not a record: the records wait for the next flush.
UNAVAILABLE = (OperationalError, InterfaceError, ProgrammingError)


class Unwritten(Exception):
    """The database failed (`error`): `rows` were not written, `written` were."""

    def __init__(self, error: Exception, rows: list[Row], written: int) -> None:
        super().__init__(f"{len(rows)} usage records not written: {error}")
        self.error, self.rows, self.written = error, rows, written


class UsageBuffer:
    """Records (as field dicts) waiting to be written; bounded, thread-safe."""

    def __init__(self, *, maxsize: int, interval: float) -> None:
        self.maxsize = maxsize
        self.interval = interval
        self.dropped = 0
        self._records: deque[Row] = deque()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._records)

    def add(self, fields: dict[str, Any]) -> None:
        row = as_row(fields)
        with self._lock:
            dropped = len(self._records) >= self.maxsize
            if dropped:
                self._records.popleft()
                self.dropped += 1
            self._records.append(row)
            depth = len(self._records)
            if self._thread is None:
                self._start()
        metrics.usage_buffer(depth=depth, dropped=int(dropped))

    def flush(self) -> int:
        """Write what the buffer holds; returns how many records were written."""
        with self._flush_lock:
            with self._lock:
                records = list(self._records)
                self._records.clear()
                dropped, self.dropped = self.dropped, 0
            metrics.usage_buffer(depth=0)
            if dropped:
                log.warning("Usage buffer full: %d usage records were dropped.", dropped)
            if not records:
                return 0
            try:
                return store(records)
            except Unwritten as unwritten:
                log.error(
                    "Could not write %d usage records; will retry.",
                    len(unwritten.rows),
                    exc_info=unwritten.error,
                )
                self._requeue(unwritten.rows)
                return unwritten.written

    def _requeue(self, records: list[Row]) -> None:
        """Put unwritten records back in front of newer ones, within the bound."""
        with self._lock:
            self._records.extendleft(reversed(records))
            dropped = max(0, len(self._records) - self.maxsize)
            for _ in range(dropped):
                self._records.popleft()
            self.dropped += dropped
            depth = len(self._records)
        metrics.usage_buffer(depth=depth, dropped=dropped)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="usage-flusher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.flush()
                # Once a second is no reason to keep a connection open (or hold a test
                # database that is about to be dropped).
                connections.close_all()
            except Exception:
                # The flusher must outlive any failure, or every later record waits forever.
                log.exception("The usage flusher failed; it tries again in %s s.", self.interval)


@cache
def _fields() -> list[Any]:
    return [f for f in UsageRecord._meta.concrete_fields if not f.primary_key]


@cache
def _columns() -> tuple[tuple[str, Any, int | None], ...]:
    """(attname, field, max_length of a text column or None) in column order."""
    return tuple((field.attname, field, getattr(field, "max_length", None)) for field in _fields())


def as_row(fields: dict[str, Any]) -> Row:
    """A record as a tuple in column order, of values the garbage collector ignores and
    text both databases can store.

    A thousand buffered dicts (or UUIDs) would be walked by every collection until the
    flush; tuples of strings, numbers, datetimes and decimals are untracked.
    """
    return tuple(
        _plain(fields[name], max_length) if name in fields else field.get_default()
        for name, field, max_length in _columns()
    )


def _plain(value: Any, max_length: int | None) -> Any:
    # Credential ids as hex strings: what both drivers take, and untracked by the GC.
    if isinstance(value, uuid.UUID):
        return value.hex
    if max_length is not None and isinstance(value, str):
        return storable_text(value, max_length)
    return value


def storable_text(text: str, max_length: int) -> str:
    """`text` as SQLite and PostgreSQL alike can store it in a column of `max_length`.

    Lone UTF-16 surrogates (which no driver can encode) become U+FFFD, while a pair
    becomes the character it stands for; NULs (which PostgreSQL refuses in text) go;
    what is longer than the column is cut (PostgreSQL refuses it, SQLite would keep it).
    """
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii():
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text[:max_length]


def store(rows: list[Row]) -> int:
    """Write `rows`, dropping only those the database refuses; returns how many were written.

    A refused batch is split in halves, each tried in a transaction of its own (after
    an error, PostgreSQL refuses everything else in the same transaction), down to the
    refused record alone, which is dropped (`_drop`): one bad record among n costs about
    2 log2(n) tries. When the database itself fails (UNAVAILABLE), raises `Unwritten`
    with the rows not yet written, in their order.
    """
    pending = [rows]  # a stack: the next batch to try is last
    written = 0
    while pending:
        batch = pending.pop()
        try:
            write(batch)
        except UNAVAILABLE as error:
            unwritten = [row for part in [batch, *reversed(pending)] for row in part]
            raise Unwritten(error, unwritten, written) from error
        except Exception as error:
            if len(batch) == 1:
                _drop(batch[0], error)
            else:
                half = len(batch) // 2
                pending += [batch[half:], batch[:half]]
        else:
            written += len(batch)
    return written


def _drop(row: Row, error: Exception) -> None:
    """Log and count a record the database refused. A record holds no key and no prompt."""
    reason = type(error).__name__
    described = ", ".join(
        f"{name}={_shown(value)}"
        for (name, _, _), value in zip(_columns(), row, strict=True)
        if value not in (None, "")
    )
    log.error(
        "A usage record was dropped: the database refused it (%s: %s). The other records "
        "were written. The record: %s.",
        reason,
        _shown(str(error).strip(), quote=False),
        described,
    )
    metrics.usage_unstorable(reason=reason)


def _shown(value: Any, *, quote: bool = True, limit: int = 300) -> str:
    """`value` on one line of printable text, at most `limit` characters."""
    if isinstance(value, datetime):
        return value.isoformat()
    shown = repr(value) if quote else value.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def write(rows: list[Row]) -> None:
    """Insert the rows and bring `last_used_at` forward, in one transaction.

    Users deleted since their records were buffered are left out of the records (as
    deleting a user does to the records already written): the column has no database
    constraint, so a user deleted between this check and the insert leaves an id that
    names nobody, which the admin shows as deleted, instead of a record that fails.

    One executemany for many rows: a twentieth of what bulk_create costs per row.

    The rows hold values both drivers take as they are (credential ids as hex strings,
    which PostgreSQL casts to uuid; decimals; aware datetimes), except that SQLite wants
    datetimes the way Django writes them there. The flusher's time is the request
    threads' time (one GIL), so this is measured: bench/routing.py.
    """
    connection = connections[router.db_for_write(UsageRecord)]
    fields = _fields()
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    marks = ", ".join(["%s"] * len(fields))
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    params: list[Any] = rows
    if connection.vendor == "sqlite":
        at = [f.attname for f in fields].index("created_at")
        adapt = connection.ops.adapt_datetimefield_value
        params = [(*row[:at], adapt(row[at]), *row[at + 1 :]) for row in rows]
    # Read before the transaction: on SQLite, a transaction that reads and then writes
    # fails at once ("database is locked") when another process wrote in between.
    params = _without_deleted_users(params, connection.alias)
    with transaction.atomic(using=connection.alias):
        with connection.cursor() as cursor:
            # Quoted names from the model; the values go as parameters.
            cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", params)  # noqa: S608
        for credential_id, used_at in _last_uses(rows).items():
            APIKeyCredentials.objects.using(connection.alias).filter(
                Q(last_used_at__isnull=True) | Q(last_used_at__lt=used_at), pk=credential_id
            ).update(last_used_at=used_at)


def _without_deleted_users(rows: list[Row], alias: str) -> list[Row]:
    """`rows` with the users that no longer exist left out."""
    at = [f.attname for f in _fields()].index("user_id")
    users = {row[at] for row in rows if row[at] is not None}
    if not users:
        return rows
    existing = get_user_model()._default_manager.using(alias).filter(pk__in=users)
    found = set(existing.values_list("pk", flat=True))
    if found == users:
        return rows
    return [
        row if row[at] is None or row[at] in found else (*row[:at], None, *row[at + 1 :])
        for row in rows
    ]


def _last_uses(rows: list[Row]) -> dict[str, datetime]:
    """The latest successful call of each credential among `rows`."""
    names = [f.attname for f in _fields()]
    at, credential, outcome = (names.index(n) for n in ("created_at", "credential_id", "outcome"))
    latest: dict[str, datetime] = {}
    for row in rows:
        if row[credential] and row[outcome] == "ok":
            latest[row[credential]] = max(row[at], latest.get(row[credential], row[at]))
    return latest


_buffer = UsageBuffer(
    maxsize=settings.LLM_USAGE_BUFFER_SIZE, interval=settings.LLM_USAGE_FLUSH_SECONDS or 2.0
)
atexit.register(_buffer.flush)
# uvicorn workers never reach atexit (they end by the signal that stopped them).
worker_stopping.connect(lambda **kwargs: _buffer.flush(), weak=False)


def _buffered() -> bool:
    return bool(settings.LLM_USAGE_FLUSH_SECONDS)


def record(**fields: Any) -> None:
    """Record one call (from sync code)."""
    fields["created_at"] = timezone.now()
    if _buffered():
        _buffer.add(fields)
    else:
        _store_now(as_row(fields))


async def arecord(**fields: Any) -> None:
    """Record one call (from async code): with the buffer, no I/O and no thread hop."""
    fields["created_at"] = timezone.now()
    if _buffered():
        _buffer.add(fields)
    else:
        await sync_to_async(_store_now)(as_row(fields))


def _store_now(row: Row) -> None:
    """Without the buffer: a record refused is dropped; the database's failure is raised."""
    try:
        store([row])
    except Unwritten as unwritten:
        raise unwritten.error from None


def flush() -> int:
    return _buffer.flush()


def as_decimal(cost: float | None) -> Decimal | None:
    return None if cost is None else Decimal(str(cost))
