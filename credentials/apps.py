from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class CredentialsConfig(AppConfig):
    name = "credentials"
    verbose_name = "Credentials"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from credentials.checks import check_encryption_keys, check_global_base_urls

        checks.register(check_encryption_keys)
        checks.register(check_global_base_urls)
