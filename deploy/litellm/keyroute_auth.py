"""LiteLLM custom_auth: a small table of virtual keys, each limited to its models.

KEYROUTE_VIRTUAL_KEYS holds the table as JSON:
    {"<virtual key>": {"alias": "team-a", "models": ["gpt-4o-mini"]}, ...}
LITELLM_MASTER_KEY is accepted as the proxy's administrator (every model). Any other
key is refused with a 401. Which models a key may use is LiteLLM's own check
(general_settings.custom_auth_run_common_checks), so a refusal reads as LiteLLM's.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from fastapi import Request
from litellm.proxy._types import LitellmUserRoles, ProxyErrorTypes, ProxyException, UserAPIKeyAuth


def _digest(key: str) -> str:
    # Looked up by digest: comparing the digest of a guess leaks nothing about the keys.
    return hashlib.sha256(key.encode()).hexdigest()


def _table() -> dict[str, dict[str, Any]]:
    raw = os.environ.get("KEYROUTE_VIRTUAL_KEYS", "").strip() or "{}"
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as error:
        raise RuntimeError(f"KEYROUTE_VIRTUAL_KEYS is not JSON: {error.msg}") from None
    if not isinstance(entries, dict):
        raise RuntimeError("KEYROUTE_VIRTUAL_KEYS must be a JSON object: key -> entry")
    table = {}
    for key, entry in entries.items():
        models = entry.get("models") if isinstance(entry, dict) else None
        if not isinstance(models, list) or not models:
            raise RuntimeError(f"KEYROUTE_VIRTUAL_KEYS: the key {key[-4:]!r} needs models")
        table[_digest(key)] = {"alias": str(entry.get("alias") or key[-4:]), "models": models}
    return table


KEYS = _table()


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    master = os.environ.get("LITELLM_MASTER_KEY", "")
    if master and api_key == master:
        return UserAPIKeyAuth(api_key=api_key, user_role=LitellmUserRoles.PROXY_ADMIN)
    entry = KEYS.get(_digest(api_key or ""))
    if entry is None:
        raise ProxyException(
            message="Authentication Error: this key is not one of the proxy's keys.",
            type=ProxyErrorTypes.auth_error,
            param="api_key",
            code=401,
        )
    return UserAPIKeyAuth(api_key=api_key, key_alias=entry["alias"], models=list(entry["models"]))
