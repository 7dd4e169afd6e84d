"""Things that belong to one event loop (connection pools), closed when that loop ends.

uvicorn runs one loop for the life of a worker, but the test client, `async_to_sync`
and `asyncio.run` in a command each run a loop of their own and close it. A pool left
open on a closed loop cannot be closed any more: aiohttp then warns "Unclosed client
session" at exit. Loops run by `asyncio.run`, asgiref and uvicorn end with
`loop.shutdown_asyncgens()`, which closes every asynchronous generator still open: a
generator waiting at its one `yield` is how this module hears that its loop is ending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

log = logging.getLogger(__name__)

Closer = Callable[[], Awaitable[object]]
_closers: dict[asyncio.AbstractEventLoop, dict[str, Closer]] = {}
# Strong references: the loop holds its asynchronous generators only weakly.
_watchers: dict[asyncio.AbstractEventLoop, AsyncIterator[None]] = {}


async def at_loop_end(name: str, close: Closer) -> None:
    """Await `close()` when the running loop ends; once per `name` and loop."""
    loop = asyncio.get_running_loop()
    closers = _closers.get(loop)
    if closers is None:
        closers = _closers[loop] = {}
        watcher = _watch(loop, closers)
        await anext(watcher)  # started on this loop: shutdown_asyncgens() will close it
        _watchers[loop] = watcher
    closers.setdefault(name, close)


async def _watch(
    loop: asyncio.AbstractEventLoop, closers: dict[str, Closer]
) -> AsyncIterator[None]:
    try:
        yield
    finally:
        _closers.pop(loop, None)
        _watchers.pop(loop, None)
        for name, close in closers.items():
            try:
                await close()
            except Exception:
                log.exception("Closing %s at the end of an event loop failed.", name)
