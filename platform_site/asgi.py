"""The ASGI application (uvicorn: `make run`, `make serve`).

No request waits for another request's sync work, and a request that has no sync work
runs without a thread at all (docs/performance.md, "Serving model"):

- Each request runs in Django's per-request context (`ThreadSensitiveContext`): its
  sync code (an admin page, a query) runs in a thread of its own, created on its first
  sync call. Nothing is ever queued behind one thread shared by all requests.
- Django's handler makes two sync calls in every request: it sends `request_started`
  and closes the response (which sends `request_finished`). Made from a thread, they
  would start one for every request. Here they run on the event loop while the only
  receivers are Django's own (QUIET_RECEIVERS: they close the connections and caches of
  the thread they run in, and the loop's thread never opens any). A request that did
  start a thread has its response closed in that thread, as Django does, so that its
  database connection is closed where it was opened. Any other receiver is sent to in
  a thread, as Django does.
- The middleware chain is built from settings.MIDDLEWARE, with Django's classes swapped
  for the twins of platform_site.middleware that call their hooks in place.

It also speaks ASGI's lifespan protocol, which Django does not: at shutdown, after the
last request, it sends `worker_stopping` (the usage records still buffered are written
then). uvicorn ends a worker with the signal that stopped it once the lifespan is over,
so `atexit` would never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import django
from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.cache import close_caches
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.base import reset_urlconf
from django.db import close_old_connections, reset_queries
from django.dispatch import Signal
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.urls import set_script_prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "platform_site.settings")
django.setup(set_prefix=False)

from platform_site import copies  # noqa: E402 (needs the settings)
from platform_site.middleware import ON_THE_LOOP  # noqa: E402
from platform_site.signals import worker_stopping  # noqa: E402

QUIET_RECEIVERS = frozenset({reset_queries, close_old_connections, close_caches, reset_urlconf})


class Handler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        listed = settings.MIDDLEWARE
        # Django's checks read the setting; only this chain uses the twins.
        settings.MIDDLEWARE = [ON_THE_LOOP.get(path, path) for path in listed]
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = listed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        async with ThreadSensitiveContext():
            copies.begin_request()
            await self.handle(scope, receive, send)

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            body = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            set_script_prefix(get_script_prefix(scope))
            await _send(signals.request_started, self.__class__, scope=scope)
            request, refusal = self.create_request(scope, body)
            if request is None:
                assert refusal is not None  # Django's answer to a request it cannot parse
                await self.send_response(refusal, send)
                await self._finish(refusal)
            else:
                await self._finish(await self._respond_unless_gone(request, receive, send))
        finally:
            body.close()

    async def _finish(self, response: HttpResponseBase | None) -> None:
        """Close the response (None: the client left first), which sends request_finished.

        In the request's own thread if it has one, so that its database connection is
        closed in the thread that opened it.
        """
        in_place = not _has_thread() and _quiet(signals.request_finished, self.__class__)
        if response is None and in_place:
            signals.request_finished.send(sender=self.__class__)
        elif response is None:
            await signals.request_finished.asend(sender=self.__class__)
        elif in_place:
            response.close()
        else:
            await sync_to_async(response.close)()

    async def _respond_unless_gone(
        self, request: HttpRequest, receive: Any, send: Any
    ) -> HttpResponseBase | None:
        """Answer, unless the client disconnects first: then the view is cancelled."""

        async def respond() -> HttpResponseBase:
            response: HttpResponseBase = await self.run_get_response(request)
            with contextlib.suppress(asyncio.CancelledError):  # gone while we sent
                await self.send_response(response, send)
            return response

        gone = asyncio.create_task(self.listen_for_disconnect(receive))
        answer = asyncio.create_task(respond())
        await asyncio.wait([gone, answer], return_when=asyncio.FIRST_COMPLETED)
        for task in (gone, answer):
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RequestAborted):
                await task
        return None if answer.cancelled() else answer.result()


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            # In a thread of its own: receivers write to the database.
            await sync_to_async(worker_stopping.send, thread_sensitive=False)(sender=Handler)
            await send({"type": "lifespan.shutdown.complete"})
            return


def _has_thread() -> bool:
    """Whether the current request ran sync code, in a thread of its own."""
    context = SyncToAsync.thread_sensitive_context.get(None)
    return context is not None and context in SyncToAsync.context_to_thread_executor


def _quiet(signal: Signal, sender: Any) -> bool:
    sync_receivers, async_receivers = signal._live_receivers(sender)
    return not async_receivers and QUIET_RECEIVERS.issuperset(sync_receivers)


async def _send(signal: Signal, sender: Any, **named: Any) -> None:
    if _quiet(signal, sender):
        signal.send(sender=sender, **named)
    else:
        await signal.asend(sender=sender, **named)


application = Handler()
