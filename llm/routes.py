"""Which base URL and key a call uses: a pure function of settings and one credential."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import urlsplit

from django.conf import settings

from credentials.crypto import DecryptionError
from credentials.models import PLATFORM, APIKeyCredentials
from credentials.secret import Secret
from llm.errors import CredentialUnavailable

Purpose = Literal["chat", "code", "embeddings"]
Source = Literal["credential", "global", "internal", "failover"]
PURPOSES: tuple[Purpose, ...] = ("chat", "code", "embeddings")
# How far a call follows a credential's fallbacks (fallback of the fallback, ...).
MAX_FALLBACK_HOPS = 3


@dataclass(frozen=True)
class Route:
    purpose: Purpose
    base_url: str
    api_key: Secret
    source: Source
    credential_id: uuid.UUID | None = None
    credential_title: str | None = None

    @property
    def host(self) -> str:
        """host[:port] as configured: what error messages and metrics may show."""
        return urlsplit(self.base_url).netloc


def _default(purpose: Purpose) -> tuple[str, str, Source, str]:
    if purpose == "embeddings":
        return (
            settings.OPENAI_INTERNAL_BASE_URL,
            settings.OPENAI_INTERNAL_API_KEY,
            "internal",
            "OPENAI_INTERNAL_API_KEY",
        )
    return settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY, "global", "OPENAI_API_KEY"


UNUSABLE = {
    # Someone else's credential is indistinguishable from one that does not exist.
    "not_yours": ("No such credential: choose one of your own or a shared one.", 404),
    "inactive": (
        "Credential {title!r} is inactive: choose another one, or ask an admin to activate it.",
        403,
    ),
    "expired": (
        "Credential {title!r} expired: choose another one, or ask an admin to renew it.",
        403,
    ),
}


def resolve_route(
    purpose: Purpose,
    credential: APIKeyCredentials | None = None,
    *,
    user: Any,
    allow_inactive: bool = False,
) -> Route:
    """The route for `purpose`: the credential's, or the purpose's global default.

    `user` is who the call is for: a credential they may not use (someone else's, or any
    credential when `user` is None) raises CredentialUnavailable, and so does an inactive
    or expired one (unless `allow_inactive`, for an admin's connection test) or one whose
    key cannot be decrypted. `user=PLATFORM` (credentials.models) is the platform's own
    call, which skips the ownership check. A credential never falls back to the global
    key: that would bill the wrong account.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"Unknown purpose {purpose!r}: use one of {', '.join(PURPOSES)}.")
    base_url, key, source, key_name = _default(purpose)
    if credential is None:
        if not key:
            raise CredentialUnavailable(
                f"No credential was chosen and {key_name} is not set: choose a credential, "
                f"or set {key_name} for calls without one.",
                reason="no_default_key",
                status=503,
            )
        return Route(purpose=purpose, base_url=base_url, api_key=Secret(key), source=source)
    reason = credential.unusable_by(user)
    if reason and not (allow_inactive and reason in ("inactive", "expired")):
        message, status = UNUSABLE[reason]
        raise CredentialUnavailable(
            message.format(title=credential.title), reason=reason, status=status
        )
    try:
        plaintext = credential.api_key.get_secret_value()
    except DecryptionError as error:
        raise CredentialUnavailable(str(error), reason="undecryptable", status=503) from None
    return Route(
        purpose=purpose,
        base_url=credential.base_url or base_url,
        api_key=Secret(plaintext),
        source="credential",
        credential_id=credential.pk,
        credential_title=credential.title,
    )


def fallback_route(purpose: Purpose, credential: APIKeyCredentials) -> Route | None:
    """The route through a fallback credential, or None when it cannot serve.

    The admin chose the fallback for the credential it backs, so it serves whoever may
    use that one (no ownership check). An inactive, expired or undecryptable fallback
    is skipped: the call goes on along the chain.
    """
    try:
        route = resolve_route(purpose, credential, user=PLATFORM)
    except CredentialUnavailable:
        return None
    return replace(route, source="failover")


def failover_route(purpose: Purpose) -> Route | None:
    """The last resort of every call, when LLM_FAILOVER_BASE_URL and _API_KEY are set."""
    if not (settings.LLM_FAILOVER_BASE_URL and settings.LLM_FAILOVER_API_KEY):
        return None
    return Route(
        purpose=purpose,
        base_url=settings.LLM_FAILOVER_BASE_URL,
        api_key=Secret(settings.LLM_FAILOVER_API_KEY),
        source="failover",
    )
