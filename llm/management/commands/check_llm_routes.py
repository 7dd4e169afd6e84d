from __future__ import annotations

import json
import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from credentials.models import APIKeyCredentials
from llm import doctor
from llm.doctor import Finding

COLUMNS = ("route", "source", "host", "reachable", "key accepted", "models", "latency", "breaker")


class Command(BaseCommand):
    help = (
        "Check every LLM route (the global, internal and failover defaults and the live "
        "credentials): GET /models with its key and LiteLLM's /health/liveliness, never a "
        "completion. Exit status 1 when any route fails."
    )
    # The doctor must run precisely when the configuration is wrong: a base URL the
    # policy refuses is one of its findings, not a reason to refuse to start.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--credential",
            action="append",
            metavar="ID",
            help="Check only this credential (any state, not the defaults); repeatable.",
        )
        parser.add_argument(
            "--model", metavar="NAME", help="Fail the routes whose model list lacks NAME."
        )
        parser.add_argument(
            "--json",
            action="store_true",
            dest="as_json",
            help="Print the findings as one JSON list (no key in it, ever).",
        )

    def handle(
        self,
        *args: Any,
        credential: list[str] | None,
        model: str | None,
        as_json: bool,
        **options: Any,
    ) -> None:
        if credential:
            targets = doctor.routes(self._credentials(credential), defaults=False)
        else:
            targets = doctor.routes()
        findings = doctor.diagnose(targets, model=model)
        doctor.remember_findings(findings)
        if as_json:
            self._print_json(findings)
        else:
            self._print_table(findings)
        failed = [finding for finding in findings if not finding.ok]
        if failed:
            raise CommandError(
                f"{len(failed)} of {len(findings)} routes fail: see the hint under each.",
                returncode=1,
            )

    @staticmethod
    def _credentials(ids: list[str]) -> list[APIKeyCredentials]:
        found = []
        for given in ids:
            try:
                pk = uuid.UUID(given.strip())
                found.append(APIKeyCredentials.objects.get(pk=pk))
            except (ValueError, APIKeyCredentials.DoesNotExist):
                raise CommandError(
                    f"No credential has the id {given!r}: the admin's change page of a "
                    "credential shows it in its address."
                ) from None
        return found

    def _print_json(self, findings: list[Finding]) -> None:
        self.stdout.write(json.dumps([finding.as_json() for finding in findings], indent=2))

    def _print_table(self, findings: list[Finding]) -> None:
        if not findings:
            self.stdout.write("No routes to check: no default has a key and no credential is live.")
            return
        rows = [_row(finding) for finding in findings]
        widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

        self.stdout.write(line(COLUMNS).rstrip())
        for finding, row in zip(findings, rows, strict=True):
            self.stdout.write(line(row).rstrip())
            if finding.hint and (not finding.ok or not finding.configured):
                self.stdout.write(f"    {finding.fault_name or 'failed'}: {finding.hint}")
        working = sum(1 for f in findings if f.ok and f.configured)
        idle = sum(1 for f in findings if not f.configured)
        failed = len(findings) - working - idle
        if not failed:
            tail = f"; {idle} not configured" if idle else ""
            self.stdout.write(f"\n{working} route(s) work{tail}.")
        else:
            self.stdout.write("")


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def _row(finding: Finding) -> tuple[str, ...]:
    if not finding.configured:
        reachable, key, models, latency = "not configured", "-", "-", "-"
    else:
        reachable, key = _yes_no(finding.reachable), _yes_no(finding.key_accepted)
        models = str(len(finding.models)) if finding.key_accepted else "-"
        latency = f"{finding.latency_ms:.0f} ms" if finding.latency_ms is not None else "-"
    return (
        finding.label,
        finding.source,
        finding.host,
        reachable,
        key,
        models,
        latency,
        finding.breaker,
    )
