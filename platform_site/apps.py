from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks


class SiteConfig(AppConfig):
    """The site itself: its serving model (asgi, middleware, sessions, copies) and checks."""

    name = "platform_site"
    verbose_name = "Keyroute site"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_delete, post_save

        from platform_site import copies
        from platform_site.checks import check_shared_cache

        def user_changed(sender: Any, update_fields: Any = None, **kwargs: Any) -> None:
            # Signing in only writes last_login, which no copy depends on.
            if update_fields is None or set(update_fields) != {"last_login"}:
                copies.bump()

        user = get_user_model()
        post_save.connect(user_changed, sender=user, weak=False)
        post_delete.connect(user_changed, sender=user, weak=False)
        checks.register(check_shared_cache, checks.Tags.caches, deploy=True)
