"""Django's and WhiteNoise's middleware, with their hooks run on the event loop.

Under ASGI, Django runs every hook of a `MiddlewareMixin` through `sync_to_async` (a
thread hop each), and a sync-only middleware such as WhiteNoise's makes it run the
whole stack below it, async views included, inside a thread that waits for the view:
one thread held per request in flight. These hooks do no I/O (the session is saved,
the one exception, with its hop), so here they run directly on the loop. Measured in
docs/performance.md ("Concurrency"). Under WSGI and the test client they run as usual.

MessageMiddleware is left as Django ships it: storing messages may read the session.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.conf import settings as django_settings
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.csrf import CsrfViewMiddleware
from django.middleware.security import SecurityMiddleware
from whitenoise.middleware import WhiteNoiseMiddleware


class _OnTheLoop:
    """A MiddlewareMixin whose process_request/process_response run without a hop."""

    get_response: Any

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response  # type: ignore[no-any-return]


class Security(_OnTheLoop, SecurityMiddleware):
    pass


class Common(_OnTheLoop, CommonMiddleware):
    pass


class Authentication(_OnTheLoop, AuthenticationMiddleware):
    pass


class XFrameOptions(_OnTheLoop, XFrameOptionsMiddleware):
    pass


class Csrf(_OnTheLoop, CsrfViewMiddleware):
    async def process_view(  # type: ignore[override]
        self, request: HttpRequest, callback: Any, args: Any, kwargs: Any
    ) -> HttpResponseBase | None:
        # A coroutine, so that Django calls it without a hop; the check does no I/O.
        return super().process_view(request, callback, args, kwargs)


class Session(SessionMiddleware):
    """The session is created lazily on the loop; only saving it takes a hop."""

    async def __acall__(self, request: HttpRequest) -> Any:
        self.process_request(request)
        response: Any = await self.get_response(request)  # type: ignore[misc]
        session = request.session
        if session.accessed and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST):
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)


class StaticFiles(WhiteNoiseMiddleware):  # type: ignore[misc]
    """WhiteNoise for static paths only; every other request passes by without a thread."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any, settings: Any = django_settings) -> None:
        super().__init__(get_response, settings)
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if self.autorefresh:
            static_file = await sync_to_async(self.find_file)(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            served: HttpResponseBase = await sync_to_async(self.serve)(static_file, request)
            return served
        response: HttpResponseBase = await self.get_response(request)
        return response
