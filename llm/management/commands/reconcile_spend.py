from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from llm import limits


class Command(BaseCommand):
    help = (
        "Set this month's spend counters of every credential with a budget (and of each "
        "user with a cap) to the sum of its usage records."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            done = limits.reconcile(exact=True)
        except Exception as error:
            raise CommandError(
                f"Could not reconcile the spend counters ({type(error).__name__}: {error}). "
                "Is the database up, and the cache (CACHE_URL) reachable?"
            ) from None
        if not done:
            self.stdout.write("No credential has a budget: there is nothing to reconcile.")
            return
        for row in done:
            who = f"credential {row.credential.title!r}"
            if row.user_id is not None:
                who = f"user {row.user_id} on {who}"
            was = "missing" if row.was < 0 else limits.dollars(limits.usd(row.was))
            now = limits.dollars(limits.usd(row.now))
            change = "unchanged" if row.was == row.now else f"was {was}"
            self.stdout.write(f"{who}: {now} this month ({change})")
