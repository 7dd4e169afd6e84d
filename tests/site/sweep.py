"""Tools of the secrets sweep (test_secrets_sweep.py): where to look for a key, and how.

`Exposure` reads every text a user or an operator could see (a page, a header, a log
record, a table row, a command's output) and notes where a key, or a telling part of
it, shows. It keeps the places, never the texts: a failure names the place and the part
found, and never prints the key.
"""

from __future__ import annotations

import base64
import logging
import pickle
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.db import connections

# Attributes every LogRecord has; anything else was passed as `extra=` (a JSON formatter
# prints those too).
STANDARD_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# Threads of the test doubles (tests/upstream.py): what the fake proxy logs is not
# Keyroute's output, and it is sent the key on purpose.
DOUBLES = ("upstream-", "dead-port")


def needles(key: str) -> dict[str, str]:
    """What would give the key away, most telling first.

    The last four characters are the key hint the admin shows on purpose, so the key
    without them is searched too; so are the random middle alone (a truncated or
    reformatted key), and the key encoded as base64 (at each of the 3 alignments, without
    the edges that depend on neighbouring bytes) and as hex.
    """
    found = {
        "the whole key": key,
        "the key without its last 4 characters (the hint)": key[:-4],
        "the random middle of the key": key[-28:-8],
    }
    for shift in range(3):
        encoded = base64.b64encode(key[shift:].encode()).decode()[:-4]
        found[f"the key in base64 (shift {shift})"] = encoded
        found[f"the key in base64url (shift {shift})"] = encoded.replace("+", "-").replace("/", "_")
    found["the key in hex"] = key.encode().hex()
    return found


def as_text(value: Any) -> str:
    """Text as a reader would see it; bytes decoded, anything else as str()."""
    if isinstance(value, memoryview):
        value = value.tobytes()
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


class Exposure:
    """Where the key shows, among everything read so far."""

    def __init__(self, key: str) -> None:
        self._needles = needles(key)
        self.leaks: dict[str, str] = {}  # place -> the most telling part found there
        self.places: list[str] = []  # every place read, leaking or not

    def read(self, place: str, value: Any) -> None:
        text = as_text(value)
        self.places.append(place)
        for name, needle in self._needles.items():
            if needle in text:
                self.leaks.setdefault(place, name)
                return

    def response(self, place: str, response: Any, content: bytes | None = None) -> None:
        """A response's body, headers and cookies (`content` for a streamed one)."""
        if content is None:
            content = (
                b"".join(response.streaming_content) if response.streaming else response.content
            )
        self.read(f"{place}: body", content)
        self.read(f"{place}: headers", "\n".join(f"{k}: {v}" for k, v in response.items()))
        self.read(f"{place}: cookies", response.cookies.output())

    def exception(self, place: str, error: BaseException) -> None:
        """An exception as a user (its message) or an operator (its traceback) reads it."""
        self.read(f"{place}: str()", str(error))
        self.read(f"{place}: repr()", repr(error))
        self.read(f"{place}: attributes", repr(vars(error)))
        self.read(f"{place}: traceback", "".join(traceback.format_exception(error)))

    def report(self) -> str:
        lines = [f"  - {place}: {part}" for place, part in self.leaks.items()]
        return (
            f"The API key shows in {len(lines)} of {len(self.places)} places looked at:\n"
            + "\n".join(lines)
        )


# ---- logs -----------------------------------------------------------------------------


class Recorder(logging.Handler):
    """Every record, formatted as a console would print it, plus its `extra` fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[tuple[str, int, str]] = []  # (logger, level, text)

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName and record.threadName.startswith(DOUBLES):
            return
        text = self.format(record)
        extra = {k: v for k, v in vars(record).items() if k not in STANDARD_RECORD_FIELDS}
        if extra:
            text += f"\nextra: {extra!r}"
        self.lines.append((record.name, record.levelno, text))


@contextmanager
def debug_logs(names: tuple[str, ...]) -> Iterator[Recorder]:
    """Every logger in `names` (and the root) at DEBUG, recorded; SQL logged too.

    The recorder sits on the root logger instead of its handlers (it records what the
    console would print, and the records' `extra` fields too), and on every logger that
    does not propagate to the root. Queries are logged (with their parameters) as under
    DEBUG=true.
    """
    recorder = Recorder()
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in logging.root.manager.loggerDict]
    islands = [logger for logger in loggers if not logger.propagate]
    # The console's handler (and pytest's) would print the same records again, and
    # pytest would show a leaked key in full in its report: the recorder alone reads.
    others = list(root.handlers)
    for handler in others:
        root.removeHandler(handler)
    for logger in (root, *islands):
        logger.addHandler(recorder)
    debug_cursors = {alias: connections[alias].force_debug_cursor for alias in connections}
    for alias in connections:
        connections[alias].force_debug_cursor = True
    try:
        yield recorder
    finally:
        for alias, forced in debug_cursors.items():
            connections[alias].force_debug_cursor = forced
        for logger in (root, *islands):
            logger.removeHandler(recorder)
        for handler in others:
            root.addHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# ---- storage --------------------------------------------------------------------------


def table_cells(alias: str = "default") -> Iterator[tuple[str, str, Any]]:
    """(table, column, value) of every cell of every table, read with plain SQL."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        tables = connection.introspection.table_names(cursor)
        for table in tables:
            # Names from the database's own catalogue, quoted.
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            columns = [column[0] for column in cursor.description]
            for row in cursor.fetchall():
                for column, value in zip(columns, row, strict=True):
                    yield table, column, value


def decoded_session(data: str) -> Any:
    """A stored session's contents (signed and compressed in the table and the cache)."""
    store = import_module(settings.SESSION_ENGINE).SessionStore()
    return store.decode(data)


def cache_entries() -> Iterator[tuple[str, str, Any]]:
    """(alias, key, value) of everything the configured caches hold right now."""
    for alias in settings.CACHES:
        cache: Any = caches[alias]
        if isinstance(getattr(cache, "_cache", None), dict):  # locmem: pickles in a dict
            for key, pickled in list(cache._cache.items()):
                yield alias, key, _unpickled(pickled)
        elif hasattr(cache, "_cache") and hasattr(cache._cache, "get_client"):  # Redis
            client = cache._cache.get_client(write=False)
            for key in client.scan_iter(match=f"{cache.key_prefix}*", count=1000):
                if client.type(key) == b"string":  # Django's values; not sets or hashes
                    yield alias, as_text(key), _unpickled(client.get(key))


def _unpickled(raw: Any) -> Any:
    if isinstance(raw, bytes):
        try:
            return (pickle.loads(raw), raw)  # the test's own cache
        except Exception:
            return raw  # not a pickle: as it is
    return raw
