"""Authentication that serves the signed-in user without a database read.

Django's `ModelBackend`, except that async code (the API, the playground) gets the user
from this process's copies (platform_site.copies): a user saved or deleted anywhere is
loaded afresh on the next request. Sync code (the admin) reads the database as usual,
and each request gets its own copy, so permission caches never outlive a request.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend

from platform_site.copies import LocalCopies


def _load(user_id: Any) -> Any:
    return get_user_model()._default_manager.filter(pk=user_id).first()


_users: LocalCopies[Any, Any] = LocalCopies("users", _load)


class CopiedUserBackend(ModelBackend):
    async def aget_user(self, user_id: Any) -> Any:
        user = await _users.aget(user_id)
        return user if user is not None and self.user_can_authenticate(user) else None
