from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks


def check_failover_route(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    """One of LLM_FAILOVER_BASE_URL and LLM_FAILOVER_API_KEY alone is no failover route."""
    url, key = settings.LLM_FAILOVER_BASE_URL, settings.LLM_FAILOVER_API_KEY
    if bool(url) == bool(key):
        return []
    unset = "LLM_FAILOVER_API_KEY" if url else "LLM_FAILOVER_BASE_URL"
    return [
        checks.Warning(
            f"{unset} is empty, so there is no failover route: calls whose proxy is down "
            "fail once their credential's fallbacks are down too.",
            hint="Set both LLM_FAILOVER_BASE_URL and LLM_FAILOVER_API_KEY, or neither.",
            id="llm.W001",
        )
    ]
