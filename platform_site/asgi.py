"""The ASGI application (uvicorn: `make run`, `make serve`).

Django's handler gives every request its own thread for sync code (ORM calls included)
and starts two threads to do it: a third of a chat request's CPU at 500 in flight
(docs/performance.md, "Concurrency"). Here, unless ASGI_THREAD_PER_REQUEST=true, sync
code of all requests runs on asgiref's one shared thread instead, with one persistent
database connection. Keyroute's queries are a few primary-key reads per request; a site
adding slow queries to this process should turn the per-request threads back on.
"""

from __future__ import annotations

import os
from typing import Any

import django
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "platform_site.settings")
django.setup(set_prefix=False)


class SharedThreadASGIHandler(ASGIHandler):
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if settings.ASGI_THREAD_PER_REQUEST:
            await super().__call__(scope, receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)


application = SharedThreadASGIHandler()
