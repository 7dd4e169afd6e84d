from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest

from credentials.models import APIKeyCredentials
from llm.models import UsageRecord


def _title_now(field: str) -> Subquery:
    """The title today of the credential in `field`; NULL once it is deleted."""
    return Subquery(
        APIKeyCredentials.objects.filter(pk=OuterRef(f"{field}_id")).values("title")[:1]
    )


def _named(record: UsageRecord, field: str) -> str | None:
    """A credential as the admin shows it: its title today, or, once it is deleted, its
    title at the call (or its id) marked "(deleted)". Never `record.credential`, which
    raises for a deleted credential."""
    if getattr(record, f"{field}_id") is None:
        return None
    title_now: str | None = getattr(record, f"{field}_now", None)
    if title_now is not None:
        return title_now
    return f"{getattr(record, f'{field}_title') or getattr(record, f'{field}_id')} (deleted)"


class KeptRelatedFilter(admin.RelatedFieldListFilter):
    """Filters by a credential (or user) given in the address even once none is left to
    choose from: Django drops a filter without choices, and its parameter with it, which
    would list every record as if it were the deleted credential's."""

    def has_output(self) -> bool:
        given = self.lookup_val is not None or self.lookup_val_isnull is not None
        return given or super().has_output()


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin[UsageRecord]):
    """Read-only: records are written by llm.services, one per call.

    Records outlive their credentials and users (llm.models): what they name is read
    with subqueries and shown from the ids and titles they keep, never through the
    foreign keys, which raise for a deleted credential.
    """

    list_display = [
        "created_at",
        "credential_display",
        "user_display",
        "purpose",
        "model",
        "route_host",
        "total_tokens",
        "cost_usd",
        "latency_display",
        "outcome",
        "failed_over",
        "serving_display",
    ]
    list_filter = [
        "purpose",
        "outcome",
        "failed_over",
        "created_at",
        ("credential", KeptRelatedFilter),
        ("user", KeptRelatedFilter),
    ]
    search_fields = [
        "model",
        "route_host",
        "credential_title",
        "serving_credential_title",
        "user__username",
    ]
    date_hierarchy = "created_at"
    # The change page (view only): the foreign keys as the list shows them.
    fields = [
        "created_at",
        "credential_display",
        "serving_display",
        "user_display",
        "purpose",
        "model",
        "route_source",
        "route_host",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost_usd",
        "latency_display",
        "outcome",
        "failed_over",
    ]
    readonly_fields = ["credential_display", "serving_display", "user_display", "latency_display"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[UsageRecord]:
        user_model = get_user_model()
        username = user_model.objects.filter(pk=OuterRef("user_id")).values(
            user_model.USERNAME_FIELD
        )[:1]
        return (
            super()
            .get_queryset(request)
            .annotate(
                credential_now=_title_now("credential"),
                serving_credential_now=_title_now("serving_credential"),
                user_now=Subquery(username),
            )
        )

    @admin.display(description="credential", ordering="credential_title")
    def credential_display(self, obj: UsageRecord) -> str | None:
        return _named(obj, "credential")

    @admin.display(description="served by", ordering="serving_credential_title")
    def serving_display(self, obj: UsageRecord) -> str | None:
        return _named(obj, "serving_credential")

    @admin.display(description="user", ordering="user_id")
    def user_display(self, obj: UsageRecord) -> str | None:
        if obj.user_id is None:
            return None
        username: str | None = getattr(obj, "user_now", None)
        return username if username is not None else f"#{obj.user_id} (deleted)"

    @admin.display(description="latency", ordering="latency_ms")
    def latency_display(self, obj: UsageRecord) -> str:
        return f"{obj.latency_ms:.0f} ms"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
