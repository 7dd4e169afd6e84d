"""Who may use which credential: the one place that answers it."""

from __future__ import annotations

import uuid
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet
from django.utils import timezone

from credentials.models import APIKeyCredentials


def usable_credentials(user: Any) -> QuerySet[APIKeyCredentials]:
    """Active, unexpired credentials that `user` owns or that are shared; none if anonymous."""
    if user is None or not user.is_authenticated:
        return APIKeyCredentials.objects.none()
    return APIKeyCredentials.objects.filter(
        Q(owner=user) | Q(owner__isnull=True),
        Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()),
        is_active=True,
    )


def usable_credential(user: Any, credential_id: uuid.UUID | str) -> APIKeyCredentials | None:
    """The credential if `user` may use it; None alike for foreign and missing ones."""
    try:
        return usable_credentials(user).get(pk=credential_id)
    except (APIKeyCredentials.DoesNotExist, ValidationError, ValueError, TypeError):
        return None


async def ausable_credential(user: Any, credential_id: uuid.UUID | str) -> APIKeyCredentials | None:
    try:
        return await usable_credentials(user).aget(pk=credential_id)
    except (APIKeyCredentials.DoesNotExist, ValidationError, ValueError, TypeError):
        return None
