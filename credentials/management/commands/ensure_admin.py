from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Create a superuser with a generated password, printed once, if there is none."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--username", default="admin")

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        users = get_user_model()
        if users.objects.filter(is_superuser=True).exists():
            self.stdout.write("A superuser exists already; nothing to do.")
            return
        if users.objects.filter(username=username).exists():
            raise CommandError(
                f"A user named {username!r} exists but is not a superuser. Make one with: "
                "python manage.py createsuperuser, or run ensure_admin --username <another name>."
            )
        password = secrets.token_urlsafe(12)
        users.objects.create_superuser(username=username, email="", password=password)
        self.stdout.write(
            self.style.SUCCESS(f"Created superuser {username!r} with password: {password}")
        )
        self.stdout.write("It is shown only this once: write it down or change it in the admin.")
