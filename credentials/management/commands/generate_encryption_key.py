from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from credentials import crypto


class Command(BaseCommand):
    help = "Print a new Fernet key for CREDENTIALS_ENCRYPTION_KEYS."
    # It must work precisely when the keys are missing or malformed.
    requires_system_checks: list[str] = []

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(crypto.generate_key())
        self.stderr.write(
            "Put it first in CREDENTIALS_ENCRYPTION_KEYS, keep the old keys after it, "
            "then run: python manage.py rotate_credential_keys"
        )
