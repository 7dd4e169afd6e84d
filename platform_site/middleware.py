"""Django's own middleware, with its hooks run on the event loop under ASGI.

`settings.MIDDLEWARE` names Django's classes, so Django's checks (`check --deploy`) see
exactly what Django expects. Under ASGI, Django would run every `process_request` and
`process_response` of a `MiddlewareMixin` through `sync_to_async`: a thread hop each,
a dozen per request. These hooks do no I/O, so platform_site.asgi builds its chain from
the same list with the twins below (ON_THE_LOOP), which inherit everything from Django's
classes and differ only in how the hooks are called:

- security, common, CSRF, authentication and X-Frame-Options run in place;
- the session is saved in the request's own thread, and only when it changed;
- messages are stored in the request's own thread, and only when some were added or read;
- WhiteNoise serves static paths (in a thread) and lets every other request pass by.

The CSRF twin assumes the token lives in its cookie (CSRF_USE_SESSIONS is never set):
reading it from the session would be I/O. Under WSGI and the test client, Django's
classes run as Django ships them.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.csrf import CsrfViewMiddleware
from django.middleware.security import SecurityMiddleware
from whitenoise.middleware import WhiteNoiseMiddleware


class _OnTheLoop:
    """`process_request` and `process_response` called in place, without a hop."""

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
    async def __acall__(self, request: HttpRequest) -> Any:
        self.process_request(request)  # creates the session lazily: no I/O
        response: Any = await self.get_response(request)  # type: ignore[misc]
        session = request.session
        if session.accessed and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST):
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)


class Messages(MessageMiddleware):
    async def __acall__(self, request: HttpRequest) -> Any:
        self.process_request(request)  # creates the storage lazily: no I/O
        response: Any = await self.get_response(request)  # type: ignore[misc]
        storage: Any = getattr(request, "_messages", None)
        if storage is not None and (storage.used or storage.added_new):
            # Storing may write the session.
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)


class StaticFiles(WhiteNoiseMiddleware):  # type: ignore[misc]
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any, settings: Any = settings) -> None:
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


# Django's class, as settings.MIDDLEWARE names it -> its twin in this module.
ON_THE_LOOP: dict[str, str] = {
    "django.middleware.security.SecurityMiddleware": f"{__name__}.Security",
    "whitenoise.middleware.WhiteNoiseMiddleware": f"{__name__}.StaticFiles",
    "django.contrib.sessions.middleware.SessionMiddleware": f"{__name__}.Session",
    "django.middleware.common.CommonMiddleware": f"{__name__}.Common",
    "django.middleware.csrf.CsrfViewMiddleware": f"{__name__}.Csrf",
    "django.contrib.auth.middleware.AuthenticationMiddleware": f"{__name__}.Authentication",
    "django.contrib.messages.middleware.MessageMiddleware": f"{__name__}.Messages",
    "django.middleware.clickjacking.XFrameOptionsMiddleware": f"{__name__}.XFrameOptions",
    # Async-capable already, and reads nothing unless a sign-in was refused: its own twin.
    "axes.middleware.AxesMiddleware": "axes.middleware.AxesMiddleware",
}
