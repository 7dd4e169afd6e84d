from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache


def check_shared_cache(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    """Several workers must share their cache; one worker on local memory is fine."""
    workers = settings.WEB_CONCURRENCY
    if workers <= 1 or not isinstance(caches["default"], LocMemCache):
        return []
    return [
        checks.Warning(
            f"CACHE_URL is local memory, and WEB_CONCURRENCY={workers} workers each have "
            "their own: a changed user or credential reaches the other workers only within "
            "a minute, a sign-out not until the session expires, and each worker admits "
            "a credential's full rate limit (llm.limits).",
            hint="Share Redis between them (CACHE_URL=redis://HOST:6379/0), or run one worker.",
            id="platform_site.W001",
        )
    ]
