"""Reports over the usage records: what the admin shows for a credential.

A credential is charged for the calls its key paid for: those it served, its own or as
another's fallback, not those a fallback served for it (`paid_by`). Its budget, though,
counts the calls made with it, whoever served them (`this_month`, as llm.limits counts).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Count, DecimalField, OuterRef, Q, Subquery, Sum, Value
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from llm import limits
from llm.models import UsageRecord

# The usage records' cost column.
COST: DecimalField[Decimal, Decimal] = DecimalField(max_digits=14, decimal_places=8)
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


# ---- this month's spend, as budgets count it ---------------------------------------------
#
# Budgets count against the credential the user chose (`credential_id`), whoever's key
# paid, per calendar month in UTC (llm.limits): these reports do the same, from the usage
# records. The counters llm.limits keeps may be ahead of them by the calls of the last
# LLM_USAGE_FLUSH_SECONDS, not yet written.

TOP = 5


def month_bounds(now: datetime | None = None) -> tuple[datetime, datetime]:
    """The calendar month (UTC) holding `now` (default: now): its start and the next's."""
    return limits.month_of(now or timezone.now())


def this_month(credential_id: Any, now: datetime | None = None) -> Q:
    """The records counted against the credential's budget this month."""
    start, end = month_bounds(now)
    return Q(credential_id=credential_id, created_at__gte=start, created_at__lt=end)


def _cost() -> Coalesce:
    return Coalesce(Sum("cost_usd"), Value(Decimal(0)), output_field=COST)


def month_spend(
    credential_id: Any, *, user_id: int | None = None, now: datetime | None = None
) -> Decimal:
    """What calls with the credential cost this month (only `user_id`'s, when given)."""
    records = UsageRecord.objects.filter(this_month(credential_id, now))
    if user_id is not None:
        records = records.filter(user_id=user_id)
    spent: Decimal = records.aggregate(spent=_cost())["spent"]
    return spent


def month_spend_column(now: datetime | None = None) -> Coalesce:
    """This month's spend of each credential, as an annotation of a credential queryset:
    one subquery in the list's own query, none per row."""
    start, end = month_bounds(now)
    spent = (
        UsageRecord.objects.filter(
            credential_id=OuterRef("pk"), created_at__gte=start, created_at__lt=end
        )
        .order_by()
        .values("credential_id")
        .annotate(spent=Sum("cost_usd"))
        .values("spent")[:1]
    )
    return Coalesce(Subquery(spent, output_field=COST), Value(Decimal(0)), output_field=COST)


def _top(credential_id: Any, by: str, limit: int, now: datetime | None) -> list[dict[str, Any]]:
    return list(
        UsageRecord.objects.filter(this_month(credential_id, now))
        .order_by()
        .values(by)
        .annotate(calls=Count("id"), tokens=Coalesce(Sum("total_tokens"), 0), cost=_cost())
        .order_by("-cost", "-calls", by)[:limit]
    )


def top_users(
    credential_id: Any, limit: int = TOP, now: datetime | None = None
) -> list[dict[str, Any]]:
    """The users who spent most with the credential this month: user_id, user (a name:
    the username, "#7 (deleted)", or "no user" for the platform's calls and deleted
    users' records), calls, tokens, cost."""
    rows = _top(credential_id, "user_id", limit, now)
    user_model = get_user_model()
    ids = [row["user_id"] for row in rows if row["user_id"] is not None]
    names = dict(
        user_model._default_manager.filter(pk__in=ids).values_list("pk", user_model.USERNAME_FIELD)
    )
    for row in rows:
        user_id = row["user_id"]
        if user_id is None:
            row["user"] = "no user (the platform, or a deleted user)"
        else:
            row["user"] = names.get(user_id, f"#{user_id} (deleted)")
    return rows


def top_models(
    credential_id: Any, limit: int = TOP, now: datetime | None = None
) -> list[dict[str, Any]]:
    """The models that cost most with the credential this month: model, calls, tokens,
    cost."""
    return _top(credential_id, "model", limit, now)
