from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest

from credentials.models import APIKeyCredentials, Provider
from llm.models import CostSource, ModelPrice, UsageRecord

# The cost sources, shortly, for the list's column.
SOURCES = {CostSource.HEADER: "upstream", CostSource.PRICE_TABLE: "price table"}


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


class UnpricedFilter(admin.SimpleListFilter):
    title = "priced"
    parameter_name = "unpriced"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Unpriced (tokens, no cost)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return queryset.filter(total_tokens__gt=0, cost_source=CostSource.NONE)
        return queryset


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
        "cost_display",
        "cost_source_display",
        "latency_display",
        "outcome",
        "failed_over",
        "serving_display",
    ]
    list_filter = [
        "purpose",
        "outcome",
        "failed_over",
        "cost_source",
        UnpricedFilter,
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
        "cost_display",
        "cost_source",
        "latency_display",
        "outcome",
        "failed_over",
    ]
    readonly_fields = [
        "credential_display",
        "serving_display",
        "user_display",
        "cost_display",
        "latency_display",
    ]

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

    @admin.display(description="cost (USD)", ordering="cost_usd")
    def cost_display(self, obj: UsageRecord) -> Any:
        if obj.cost_usd is None and obj.total_tokens and obj.cost_source == CostSource.NONE:
            return "unpriced"
        return obj.cost_usd

    @admin.display(description="cost from", ordering="cost_source")
    def cost_source_display(self, obj: UsageRecord) -> str:
        return SOURCES.get(CostSource(obj.cost_source), "none")

    @admin.display(description="latency", ordering="latency_ms")
    def latency_display(self, obj: UsageRecord) -> str:
        return f"{obj.latency_ms:.0f} ms"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class PriceProviderFilter(admin.SimpleListFilter):
    """By provider, "any provider" (an empty provider) included."""

    title = "provider"
    parameter_name = "provider"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("any", "Any provider"), *Provider.choices]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "any":
            return queryset.filter(provider="")
        if value in Provider.values:
            return queryset.filter(provider=value)
        return queryset


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin[ModelPrice]):
    """The price table: what prices a call whose answer carries no cost (llm.prices)."""

    list_display = [
        "model",
        "provider_display",
        "input_usd_per_million",
        "output_usd_per_million",
        "updated_at",
    ]
    list_filter = [PriceProviderFilter]
    search_fields = ["model"]
    fieldsets = [
        (
            None,
            {
                "description": "Prices a call whose answer carries no cost (direct OpenAI, "
                "OpenRouter, a proxy that sends none): prompt tokens times the input price "
                "plus completion tokens times the output price, per million tokens. The "
                "most specific row wins: an exact name before a * pattern, the "
                "credential's provider before any provider. A free model gets 0 and 0. "
                "manage.py import_model_prices loads LiteLLM's price map.",
                "fields": ["model", "provider", "input_usd_per_million", "output_usd_per_million"],
            },
        )
    ]

    @admin.display(description="provider", ordering="provider")
    def provider_display(self, obj: ModelPrice) -> str:
        return obj.get_provider_display() if obj.provider else "any"
