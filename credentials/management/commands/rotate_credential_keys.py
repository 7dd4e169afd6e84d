from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from credentials import crypto
from credentials.fields import EncryptedSecret
from credentials.models import APIKeyCredentials
from credentials.signals import credentials_rotated


@dataclass
class Tally:
    total: int
    rotated: int = 0
    current: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return self.rotated + self.current + len(self.unreadable)


class Command(BaseCommand):
    help = "Re-encrypt every stored API key under the first key of CREDENTIALS_ENCRYPTION_KEYS."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--batch-size", type=int, default=500, help="Rows per transaction.")
        parser.add_argument("--dry-run", action="store_true", help="Count, change nothing.")
        parser.add_argument(
            "--pause",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="Wait between batches, to go easy on a busy database.",
        )

    def handle(
        self, *args: Any, batch_size: int, dry_run: bool, pause: float, **options: Any
    ) -> None:
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        if pause < 0:
            raise CommandError("--pause cannot be negative.")
        tally = Tally(total=APIKeyCredentials.objects.count())
        last_pk = None
        batch_number = 0
        while True:
            # Each batch is one transaction: killed at any moment, every row holds either
            # its old token or its new one, and both open with the configured keys.
            with transaction.atomic():
                rows = APIKeyCredentials.objects.order_by("pk").only("pk", "title", "api_key")
                if last_pk is not None:
                    rows = rows.filter(pk__gt=last_pk)
                batch = list(rows.select_for_update()[:batch_size])
                if not batch:
                    break
                changed = self.rotate_batch(batch, tally)
                if changed and not dry_run:
                    APIKeyCredentials.objects.bulk_update(changed, ["api_key"])
                    pks = [credential.pk for credential in changed]
                    transaction.on_commit(
                        partial(credentials_rotated.send, APIKeyCredentials, pks=pks)
                    )
            last_pk = batch[-1].pk
            batch_number += 1
            self.progress(batch_number, tally, dry_run)
            if pause:
                time.sleep(pause)
        self.report(tally, dry_run)

    def rotate_batch(self, batch: list[APIKeyCredentials], tally: Tally) -> list[APIKeyCredentials]:
        changed = []
        for credential in batch:
            assert isinstance(credential.api_key, EncryptedSecret)  # as loaded
            token = credential.api_key.token
            if crypto.is_current(token):
                tally.current += 1
                continue
            try:
                credential.api_key = EncryptedSecret(crypto.rotate(token))
            except crypto.DecryptionError:
                tally.unreadable.append((str(credential.pk), credential.title))
                continue
            tally.rotated += 1
            changed.append(credential)
        return changed

    def progress(self, batch_number: int, tally: Tally, dry_run: bool) -> None:
        verb = "to re-encrypt" if dry_run else "re-encrypted"
        line = (
            f"Batch {batch_number}: {tally.seen}/{tally.total} checked, {tally.rotated} {verb}, "
            f"{tally.current} already current, {len(tally.unreadable)} unreadable"
        )
        if self.stdout.isatty():
            self.stdout.write(f"\r{line}", ending="")
        else:
            self.stdout.write(line)
        self.stdout.flush()

    def report(self, tally: Tally, dry_run: bool) -> None:
        if self.stdout.isatty() and tally.seen:
            self.stdout.write("")
        verb = "would be re-encrypted" if dry_run else "re-encrypted"
        self.stdout.write(
            f"Done: {tally.rotated} {verb}, {tally.current} already under the current key, "
            f"{len(tally.unreadable)} unreadable, of {tally.total} credentials."
        )
        if tally.unreadable:
            listing = "\n".join(f"  {pk}  {title}" for pk, title in tally.unreadable)
            raise CommandError(
                f"{len(tally.unreadable)} credential(s) cannot be decrypted with any key in "
                f"CREDENTIALS_ENCRYPTION_KEYS and were left untouched:\n{listing}\n"
                f"{crypto.WHAT_TO_DO}"
            )
