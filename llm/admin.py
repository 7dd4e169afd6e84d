from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from llm.models import UsageRecord


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin[UsageRecord]):
    """Read-only: records are written by llm.services, one per call."""

    list_display = [
        "created_at",
        "credential",
        "user",
        "purpose",
        "model",
        "route_host",
        "total_tokens",
        "cost_usd",
        "latency_display",
        "outcome",
        "failed_over",
        "serving_credential",
    ]
    list_filter = ["purpose", "outcome", "failed_over", "created_at", "credential", "user"]
    list_select_related = ["credential", "serving_credential", "user"]
    search_fields = ["model", "route_host", "credential__title", "user__username"]
    date_hierarchy = "created_at"

    @admin.display(description="latency", ordering="latency_ms")
    def latency_display(self, obj: UsageRecord) -> str:
        return f"{obj.latency_ms:.0f} ms"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
