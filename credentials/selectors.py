"""Reads of credentials for a user, by the one rule: `CredentialQuerySet.usable_by`.

The async lookup serves a credential from this process's copies (platform_site.copies),
so the API's hot path reads no database; sync code reads the database.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from credentials.models import APIKeyCredentials
from platform_site.copies import LocalCopies


def usable_credentials(user: Any) -> QuerySet[APIKeyCredentials]:
    """The credentials `user` may use: their own and the shared ones, live."""
    return APIKeyCredentials.objects.usable_by(user)


def usable_credential(user: Any, credential_id: uuid.UUID | str) -> APIKeyCredentials | None:
    """The credential if `user` may use it; None alike for foreign and missing ones."""
    try:
        return usable_credentials(user).get(pk=credential_id)
    except (APIKeyCredentials.DoesNotExist, ValidationError, ValueError, TypeError):
        return None


def _load(credential_id: uuid.UUID) -> APIKeyCredentials | None:
    return APIKeyCredentials.objects.filter(pk=credential_id).first()


_copies: LocalCopies[uuid.UUID, APIKeyCredentials] = LocalCopies("credentials", _load)


async def acredential(credential_id: uuid.UUID) -> APIKeyCredentials | None:
    """Any credential by id, whoever may use it (a fallback), from this process's copies."""
    return await _copies.aget(credential_id)


async def ausable_credential(user: Any, credential_id: uuid.UUID | str) -> APIKeyCredentials | None:
    """`usable_credential` for async code, without a thread hop while the copy is fresh."""
    try:
        pk = credential_id if isinstance(credential_id, uuid.UUID) else uuid.UUID(credential_id)
    except (ValueError, TypeError, AttributeError):
        return None
    credential = await _copies.aget(pk)
    if credential is None or credential.unusable_by(user) is not None:
        return None
    return credential
