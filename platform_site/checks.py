from __future__ import annotations

from typing import Any

from django.core import checks
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache


def check_shared_cache(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    if not isinstance(caches["default"], LocMemCache):
        return []
    return [
        checks.Warning(
            "CACHE_URL is local memory: each worker process has its own. With more than "
            "one worker, a changed user or credential reaches the other workers only "
            "within a minute, and a sign-out not until the session expires.",
            hint="Run one worker, or share Redis between them: CACHE_URL=redis://HOST:6379/0",
            id="platform_site.W001",
        )
    ]
