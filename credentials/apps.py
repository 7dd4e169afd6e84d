from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.core import checks


class CredentialsConfig(AppConfig):
    name = "credentials"
    verbose_name = "Credentials"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from credentials.checks import check_encryption_keys, check_global_base_urls
        from credentials.models import APIKeyCredentials
        from credentials.signals import credentials_rotated
        from platform_site import copies

        checks.register(check_encryption_keys)
        checks.register(check_global_base_urls)

        def changed(sender: Any, **kwargs: Any) -> None:
            copies.bump()  # every worker loads its credentials afresh

        post_save.connect(changed, sender=APIKeyCredentials, weak=False)
        post_delete.connect(changed, sender=APIKeyCredentials, weak=False)
        credentials_rotated.connect(changed, weak=False)
