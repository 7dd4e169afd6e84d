"""Reports over the usage records: what the admin shows for a credential.

A credential is charged for the calls its key paid for: those it served, its own or as
another's fallback, not those a fallback served for it (`paid_by`).
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from llm.models import UsageRecord

PERIODS = {"24 h": timedelta(hours=24), "7 days": timedelta(days=7), "30 days": timedelta(days=30)}


def paid_by(credential_id: Any) -> Q:
    """The records whose cost the credential's account bore. Records written before
    failover existed name no serving credential: the chosen one served them."""
    return Q(serving_credential_id=credential_id) | Q(
        serving_credential__isnull=True, credential_id=credential_id, failed_over=False
    )


def credential_totals(credential_id: Any) -> list[dict[str, Any]]:
    """Calls, tokens and cost of one credential over the last 24 h, 7 and 30 days."""
    now = timezone.now()
    rows = []
    for label, period in PERIODS.items():
        totals = UsageRecord.objects.filter(
            paid_by(credential_id), created_at__gte=now - period
        ).aggregate(calls=Count("id"), tokens=Sum("total_tokens"), cost=Sum("cost_usd"))
        rows.append({"period": label, **totals, "tokens": totals["tokens"] or 0})
    return rows


def daily_cost(credential_id: Any, days: int = 30) -> list[tuple[Any, Decimal]]:
    """(date, cost) for each of the last `days` days, oldest first, zeros included."""
    today = timezone.localdate()
    start = today - timedelta(days=days - 1)
    found = dict(
        UsageRecord.objects.filter(paid_by(credential_id), created_at__date__gte=start)
        .annotate(day=TruncDate("created_at"))
        .values_list("day")
        .annotate(cost=Sum("cost_usd"))
        .values_list("day", "cost")
    )
    return [
        (day, found.get(day) or Decimal(0))
        for day in (start + timedelta(days=n) for n in range(days))
    ]
