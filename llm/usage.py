"""Usage records: one per call, written without slowing the call down.

Records go into a bounded in-memory buffer that a background thread writes in bulk
every LLM_USAGE_FLUSH_SECONDS (and at process exit), together with each credential's
`last_used_at`: a call itself never waits for the database. A crash (SIGKILL, power
loss) loses at most the records of the last interval. A failed write (database down)
keeps its records for the next flush; when LLM_USAGE_BUFFER_SIZE records are waiting,
the oldest are dropped and counted in a warning. With LLM_USAGE_FLUSH_SECONDS=0 every
record is written as its call ends (in the caller's thread).

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
from django.db import connections, router, transaction
from django.db.models import Q
from django.utils import timezone

from credentials.models import APIKeyCredentials
from llm import metrics
from llm.models import UsageRecord
from platform_site.signals import worker_stopping

log = logging.getLogger(__name__)


class UsageBuffer:
    """Records (as field dicts) waiting to be written; bounded, thread-safe."""

    def __init__(self, *, maxsize: int, interval: float) -> None:
        self.maxsize = maxsize
        self.interval = interval
        self.dropped = 0
        self._records: deque[tuple[Any, ...]] = deque()
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
            if records:
                try:
                    write(records)
                except Exception:
                    log.exception("Could not write %d usage records; will retry.", len(records))
                    self._requeue(records)
                    return 0
            return len(records)

    def _requeue(self, records: list[tuple[Any, ...]]) -> None:
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
            self.flush()
            # Once a second is no reason to keep a connection open (or hold a test
            # database that is about to be dropped).
            connections.close_all()


@cache
def _fields() -> list[Any]:
    return [f for f in UsageRecord._meta.concrete_fields if not f.primary_key]


def as_row(fields: dict[str, Any]) -> tuple[Any, ...]:
    """A record as a tuple in column order, of values the garbage collector ignores.

    A thousand buffered dicts (or UUIDs) would be walked by every collection until the
    flush; tuples of strings, numbers, datetimes and decimals are untracked.
    """
    return tuple(
        _plain(fields[field.attname]) if field.attname in fields else field.get_default()
        for field in _fields()
    )


def _plain(value: Any) -> Any:
    # Credential ids as hex strings: what both drivers take, and untracked by the GC.
    return value.hex if isinstance(value, uuid.UUID) else value


def write(rows: list[tuple[Any, ...]]) -> None:
    """Insert the rows and bring `last_used_at` forward, in one transaction.

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
    with transaction.atomic(using=connection.alias):
        with connection.cursor() as cursor:
            # Quoted names from the model; the values go as parameters.
            cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", params)  # noqa: S608
        for credential_id, used_at in _last_uses(rows).items():
            APIKeyCredentials.objects.using(connection.alias).filter(
                Q(last_used_at__isnull=True) | Q(last_used_at__lt=used_at), pk=credential_id
            ).update(last_used_at=used_at)


def _last_uses(rows: list[tuple[Any, ...]]) -> dict[str, datetime]:
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
        write([as_row(fields)])


async def arecord(**fields: Any) -> None:
    """Record one call (from async code): with the buffer, no I/O and no thread hop."""
    fields["created_at"] = timezone.now()
    if _buffered():
        _buffer.add(fields)
    else:
        await sync_to_async(write)([as_row(fields)])


def flush() -> int:
    return _buffer.flush()


def as_decimal(cost: float | None) -> Decimal | None:
    return None if cost is None else Decimal(str(cost))
