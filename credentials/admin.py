from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_permission_codename
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.timesince import timesince
from django.views.decorators.debug import sensitive_post_parameters

from credentials.fields import KeyChoiceField
from credentials.models import APIKeyCredentials

if TYPE_CHECKING:
    from llm.breaker import Status

    # The breaker of a credential's base URL, and its last probe (None: never probed).
    Health = tuple[Status, dict[str, Any] | None]

sensitive_key = method_decorator(sensitive_post_parameters("api_key"))
# Where a changelist row keeps its health (breaker status, last probe), read for the
# whole page at once in get_changelist_instance.
HEALTH = "_keyroute_health"
# The name of the changelist's annotation: this month's spend of each credential.
MONTH_SPEND = "month_spend"
SUGGEST_URL = "admin:credentials_apikeycredentials_models"


class ModelListWidget(forms.Textarea):
    """The allowed models' text box, with a button that lists the credential's /models
    as chips that add a name to the box (`suggest_url`: None before the first save)."""

    template_name = "admin/credentials/model_list_widget.html"

    def __init__(self, suggest_url: str | None = None, attrs: dict[str, Any] | None = None):
        super().__init__(attrs)
        self.suggest_url = suggest_url

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        context = super().get_context(name, value, attrs)
        context["widget"]["suggest_url"] = self.suggest_url
        return context


class CredentialForm(forms.ModelForm[APIKeyCredentials]):
    class Meta:
        model = APIKeyCredentials
        fields = [
            "title",
            "provider",
            "owner",
            "is_active",
            "expires_at",
            "api_key",
            "base_url",
            "fallback",
            "allowed_models",
            "monthly_budget_usd",
            "user_monthly_budget_usd",
            "requests_per_minute",
            "tokens_per_minute",
            "user_requests_per_minute",
            "user_tokens_per_minute",
        ]
        # Garbage in a choice (words, NUL, a number beyond the column) is a form error,
        # never a query: see KeyChoiceField.
        field_classes = {"owner": KeyChoiceField, "fallback": KeyChoiceField}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "api_key" in self.fields:
            field = self.fields["api_key"]
            field.required = self.instance._state.adding
            if not field.required:
                field.help_text = (
                    f"Stored, ending in …{self.instance.key_hint or '?'}. Leave blank to keep it; "
                    "enter it again when you change the base URL."
                )
        if "fallback" in self.fields and self.instance.pk:
            fallback: Any = self.fields["fallback"]
            fallback.queryset = fallback.queryset.exclude(pk=self.instance.pk)
        if "allowed_models" in self.fields:
            field = self.fields["allowed_models"]
            adding = self.instance._state.adding
            url = None if adding else reverse(SUGGEST_URL, args=[self.instance.pk])
            field.widget = ModelListWidget(suggest_url=url, attrs=field.widget.attrs)
        for name in ("monthly_budget_usd", "user_monthly_budget_usd"):
            # 10, not the column's 10.00000000.
            amount = self.initial.get(name)
            if name in self.fields and isinstance(amount, Decimal):
                self.initial[name] = Decimal(_plain(amount))


class OwnershipFilter(admin.SimpleListFilter):
    title = "ownership"
    parameter_name = "ownership"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("shared", "Shared"), ("owned", "Owned by a user")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "shared":
            return queryset.filter(owner__isnull=True)
        if self.value() == "owned":
            return queryset.filter(owner__isnull=False)
        return queryset


class ExpiryFilter(admin.SimpleListFilter):
    title = "expiry"
    parameter_name = "expired"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Expired"), ("no", "Not expired")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        expired = APIKeyCredentials.objects.expired()
        if self.value() == "yes":
            return queryset.filter(pk__in=expired)
        if self.value() == "no":
            return queryset.exclude(pk__in=expired)
        return queryset


def cost_chart(days: list[tuple[Any, Decimal]]) -> dict[str, Any]:
    """Bars of daily cost for a small inline SVG: heights in pixels, with their labels."""
    height, width = 60, 8
    top = max((cost for _, cost in days), default=Decimal(0))
    bars = []
    for index, (day, cost) in enumerate(days):
        bar_height = int(height * cost / top) if top else 0
        bars.append(
            {
                "x": index * (width + 2),
                "y": height - bar_height,
                "height": bar_height,
                "label": f"{day:%Y-%m-%d}: ${cost:.4f}",
            }
        )
    return {
        "bars": bars,
        "width": len(days) * (width + 2),
        "height": height,
        "bar_width": width,
        "top": top,
        "first": days[0][0] if days else None,
        "last": days[-1][0] if days else None,
    }


def _health(credentials: list[APIKeyCredentials]) -> dict[Any, Health]:
    """(breaker status, last probe or None) of each credential, by pk, in order: one
    cache read for the probes, one per distinct base URL for the breakers."""
    from llm import breaker, doctor

    probes = doctor.last_probes(credential.pk for credential in credentials)
    urls = {credential.effective_base_url for credential in credentials}
    states = {url: breaker.status(url) for url in urls}
    return {
        credential.pk: (states[credential.effective_base_url], probes.get(str(credential.pk)))
        for credential in credentials
    }


def _meter(spent: Decimal, budget: Decimal) -> dict[str, str]:
    """A <meter>'s numbers, plain (never localized): yellow from the spend warning
    (LLM_BUDGET_WARNING_PERCENT) on, full at the budget."""
    warning = Decimal(str(settings.LLM_BUDGET_WARNING_PERCENT))
    low = budget * warning / 100 if 0 < warning < 100 else budget
    return {"value": _plain(min(spent, budget)), "max": _plain(budget), "low": _plain(low)}


def _plain(amount: Decimal) -> str:
    """3.75, 10: the digits that count, whatever precision the database answered with."""
    return f"{amount.quantize(Decimal('0.00000001')).normalize():f}"


def _ago(when: datetime) -> str:
    if (timezone.now() - when).total_seconds() < 60:
        return "just now"
    return f"{timesince(when)} ago"


def _probe_summary(result: Any) -> str:
    """A Test connection result in a few words (its error's first sentence)."""
    if not result.error:
        return f"OK: {len(result.models)} model(s) in {result.latency_ms:.0f} ms"
    first = str(result.error).split(". ")[0]
    return f"failed: {first[:117] + '...' if len(first) > 120 else first}"


def _renamed(field: Any, names: dict[str, str]) -> Any:
    """A fieldsets entry (a name, or a tuple of names on one line) with names replaced."""
    if isinstance(field, tuple):
        return tuple(names.get(f, f) for f in field)
    return names.get(field, field)


def _budget_in_words(budget: Decimal | None) -> str:
    from llm import limits

    return "No limit" if budget is None else limits.dollars(budget)


@admin.register(APIKeyCredentials)
class APIKeyCredentialsAdmin(admin.ModelAdmin[APIKeyCredentials]):
    form = CredentialForm
    list_display = [
        "title",
        "owner_display",
        "provider",
        "base_url_display",
        "key_display",
        "is_active",
        "expires_at",
        "last_used_at",
        "month_spend_display",
        "health",
    ]
    list_filter = ["provider", "is_active", OwnershipFilter, ExpiryFilter]
    search_fields = ["title", "owner__username", "base_url"]
    list_select_related = ["owner"]
    autocomplete_fields = ["owner"]
    actions = ["test_connection", "diagnose", "activate", "deactivate"]
    readonly_fields = [
        "effective_route",
        "key_display",
        "created_at",
        "updated_at",
        "last_used_at",
        "spend_this_month",
        "usage",
    ]
    fieldsets = [
        (None, {"fields": ["title", "provider", "owner", "is_active", "expires_at"]}),
        ("Route", {"fields": ["api_key", "base_url", "effective_route", "fallback"]}),
        (
            "Limits",
            {
                "description": "Checked before each call with this credential. Budgets are "
                "in USD per calendar month (UTC) and reset on the 1st at 00:00 UTC; rates "
                "are per minute. Empty: no limit.",
                "fields": [
                    "allowed_models",
                    ("monthly_budget_usd", "user_monthly_budget_usd"),
                    ("requests_per_minute", "tokens_per_minute"),
                    ("user_requests_per_minute", "user_tokens_per_minute"),
                ],
            },
        ),
        ("Spend this month", {"fields": ["spend_this_month"]}),
        ("History", {"fields": ["key_display", "created_at", "updated_at", "last_used_at"]}),
        ("Usage", {"fields": ["usage"]}),
    ]

    # A view-only page shows these limits in words, not as the stored values Django's
    # read-only display would print (a JSON list, a budget with eight decimals).
    IN_WORDS = {
        "allowed_models": "allowed_models_in_words",
        "monthly_budget_usd": "monthly_budget_in_words",
        "user_monthly_budget_usd": "user_monthly_budget_in_words",
    }

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or self.has_change_permission(request, obj):
            return fieldsets
        words = self.IN_WORDS
        return [
            (name, {**options, "fields": [_renamed(f, words) for f in options["fields"]]})
            for name, options in fieldsets
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and not self.has_change_permission(request, obj):
            fields += self.IN_WORDS.values()
        return fields

    @admin.display(description="allowed models")
    def allowed_models_in_words(self, obj: APIKeyCredentials) -> str:
        return ", ".join(obj.allowed_models) if obj.allowed_models else "Any model"

    @admin.display(description="monthly budget (USD)")
    def monthly_budget_in_words(self, obj: APIKeyCredentials) -> str:
        return _budget_in_words(obj.monthly_budget_usd)

    @admin.display(description="monthly cap per user (USD)")
    def user_monthly_budget_in_words(self, obj: APIKeyCredentials) -> str:
        return _budget_in_words(obj.user_monthly_budget_usd)

    @admin.display(description="owner", ordering="owner__username")
    def owner_display(self, obj: APIKeyCredentials) -> str:
        return str(obj.owner) if obj.owner_id else "shared"

    @admin.display(description="base URL")
    def base_url_display(self, obj: APIKeyCredentials) -> str:
        source = "credential" if obj.base_url else "global default OPENAI_BASE_URL"
        return format_html('{}<br><small class="quiet">{}</small>', obj.effective_base_url, source)

    @admin.display(description="key")
    def key_display(self, obj: APIKeyCredentials) -> str:
        return f"…{obj.key_hint}" if obj.key_hint else "…"

    @admin.display(description="effective route")
    def effective_route(self, obj: APIKeyCredentials) -> str:
        if obj.base_url:
            return f"Every purpose: {obj.base_url} (credential) with this credential's key."
        public, internal = settings.OPENAI_BASE_URL, settings.OPENAI_INTERNAL_BASE_URL
        if public == internal:
            return (
                f"Every purpose: {public} (global default OPENAI_BASE_URL) "
                "with this credential's key."
            )
        return (
            f"Chat and code: {public} (global default OPENAI_BASE_URL); embeddings: "
            f"{internal} (global default OPENAI_INTERNAL_BASE_URL); with this credential's key."
        )

    @admin.display(description="usage")
    def usage(self, obj: APIKeyCredentials) -> str:
        if obj._state.adding:
            return "No calls yet."
        from llm import reports  # the admin is a page: it may read usage through llm

        return render_to_string(
            "admin/credentials/usage.html",
            {
                "totals": reports.credential_totals(obj.pk),
                "chart": cost_chart(reports.daily_cost(obj.pk)),
                "records_url": reverse("admin:llm_usagerecord_changelist")
                + f"?credential__id__exact={obj.pk}",
            },
        )

    @admin.display(description="spend this month")
    def spend_this_month(self, obj: APIKeyCredentials) -> str:
        """This month's spend against the budget (a bar), the cap per user, and who and
        which models spent most: the calls made with this credential, as budgets count."""
        if obj._state.adding:
            return "No calls yet."
        from llm import limits, reports

        start, end = reports.month_bounds()
        spent = reports.month_spend(obj.pk)
        budget, cap = obj.monthly_budget_usd, obj.user_monthly_budget_usd
        users = reports.top_users(obj.pk)
        for row in users:
            row["share"] = f"{100 * row['cost'] / cap:.0f}%" if cap else None
        records = reverse("admin:llm_usagerecord_changelist")
        return render_to_string(
            "admin/credentials/spend.html",
            {
                "month": f"{start:%B %Y}",
                "spent": limits.dollars(spent),
                "budget": None if budget is None else limits.dollars(budget),
                "percent": f"{100 * spent / budget:.0f}%" if budget else None,
                "over": budget is not None and spent >= budget,
                "meter": _meter(spent, budget) if budget else None,
                "resets": f"{end.day} {end:%B %Y} 00:00 UTC",
                "cap": None if cap is None else limits.dollars(cap),
                "users": [{**row, "cost": limits.dollars(row["cost"])} for row in users],
                "models": [
                    {**row, "cost": limits.dollars(row["cost"])}
                    for row in reports.top_models(obj.pk)
                ],
                "records_url": records
                + "?"
                + urlencode(
                    {
                        "credential__id__exact": str(obj.pk),
                        "created_at__gte": start.isoformat(),
                        "created_at__lt": end.isoformat(),
                    }
                ),
            },
        )

    @admin.display(description="spend this month", ordering=MONTH_SPEND)
    def month_spend_display(self, obj: APIKeyCredentials) -> str:
        from llm import limits, reports

        spent = getattr(obj, MONTH_SPEND, None)
        if spent is None:
            spent = reports.month_spend(obj.pk)
        if obj.monthly_budget_usd is None:
            return limits.dollars(spent)
        return f"{limits.dollars(spent)} / {limits.dollars(obj.monthly_budget_usd)}"

    def get_queryset(self, request: HttpRequest) -> QuerySet[APIKeyCredentials]:
        from llm import reports

        return super().get_queryset(request).annotate(**{MONTH_SPEND: reports.month_spend_column()})

    def get_urls(self) -> list[URLPattern]:
        name = f"{self.opts.app_label}_{self.opts.model_name}_models"
        # Before the admin's own: its "<path:object_id>/" would take this address.
        return [
            path(
                "<path:object_id>/models/",
                self.admin_site.admin_view(self.models_view),
                name=name,
            ),
            *super().get_urls(),
        ]

    def models_view(self, request: HttpRequest, object_id: str) -> JsonResponse:
        """The credential's /models, for the allowed models' suggestions: GET /models with
        its stored key at its stored base URL, hence the test permission."""
        if request.method != "GET":
            return JsonResponse({"error": "Only GET lists the models."}, status=405)
        if not self.has_test_permission(request):
            return JsonResponse(
                {
                    "error": "Listing a credential's models sends its key to its base URL: "
                    "that needs the permission to test or to change API key credentials."
                },
                status=403,
            )
        credential = self.get_object(request, unquote(object_id))
        if credential is None:
            return JsonResponse({"error": "There is no credential with this id."}, status=404)
        from llm import doctor, services

        (result,) = services.probe([credential])
        summary = _probe_summary(result)
        doctor.remember(credential.pk, ok=not result.error, summary=summary)
        self.log_change(request, credential, f"Listed its models: {summary}")
        if result.error:
            return JsonResponse({"error": result.error}, status=502)
        return JsonResponse({"models": list(result.models)})

    def has_test_permission(self, request: HttpRequest) -> bool:
        """May run the probes that send a stored key to its base URL (Test connection,
        Diagnose): the custom permission `test_apikeycredentials`, or change (whoever
        may change a credential may test it)."""
        codename = get_permission_codename("test", self.opts)
        return bool(
            request.user.has_perm(f"{self.opts.app_label}.{codename}")
        ) or self.has_change_permission(request)

    @admin.action(
        description="Test connection (GET /models with the credential's key)",
        permissions=["test"],
    )
    def test_connection(self, request: HttpRequest, queryset: QuerySet[APIKeyCredentials]) -> None:
        # The admin is a page: it may call the services (and the doctor), and nothing
        # below them. The probes run at once, each within LLM_PROBE_TIMEOUT_SECONDS; each
        # result is remembered for the health column and written to the history.
        from llm import doctor, services

        credentials = list(queryset)
        results = services.probe(credentials)
        summaries = {
            credential.pk: (not result.error, _probe_summary(result))
            for credential, result in zip(credentials, results, strict=True)
        }
        doctor.remember_many(summaries)
        for credential in credentials:
            self.log_change(
                request, credential, f"Tested the connection: {summaries[credential.pk][1]}"
            )
        for result in results:
            if result.error:
                self.message_user(request, f"{result.title}: {result.error}", messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"{result.title}: OK, {result.host} answered in {result.latency_ms:.0f} ms "
                    f"with {len(result.models)} model(s).",
                    messages.SUCCESS,
                )

    @admin.action(
        description="Diagnose (the doctor: /models, /health/liveliness, breaker)",
        permissions=["test"],
    )
    def diagnose(
        self, request: HttpRequest, queryset: QuerySet[APIKeyCredentials]
    ) -> TemplateResponse:
        """`manage.py check_llm_routes` for the selected credentials, as a page.

        Only the credentials: the defaults are the environment's, which the command
        checks where the environment is. It sends each stored key, hence the test
        permission, and each finding goes to the credential's history.
        """
        from llm import doctor

        credentials = list(queryset.order_by("title", "pk"))
        findings = doctor.diagnose(doctor.routes(credentials, defaults=False))
        doctor.remember_findings(findings)
        found = {finding.credential_id: finding for finding in findings}
        for credential in credentials:
            finding = found.get(str(credential.pk))
            if finding is not None:
                self.log_change(request, credential, f"Diagnosed: {finding.summary}")
        context = {
            **self.admin_site.each_context(request),
            "title": "Diagnosis",
            "opts": self.opts,
            "findings": findings,
            "failed": sum(1 for finding in findings if not finding.ok),
            "probe_timeout": settings.LLM_PROBE_TIMEOUT_SECONDS,
        }
        return TemplateResponse(request, "admin/credentials/diagnose.html", context)

    @admin.display(description="health")
    def health(self, obj: APIKeyCredentials) -> str:
        """The breaker of the credential's base URL, and its last probe (Test connection,
        Diagnose or check_llm_routes)."""
        state, probe = obj.__dict__.get(HEALTH) or _health([obj])[obj.pk]
        breaker = f"breaker {state.state}"
        if state.state == "open":
            breaker += f" ({state.failures} failures, retry in {state.retry_in:.0f} s)"
        if probe is None:
            last = "not tested yet"
        else:
            when = f", {_ago(probe['when'])}" if probe.get("when") else ""
            last = f"{probe.get('summary', '')}{when}"
        return format_html('{}<br><small class="quiet">{}</small>', breaker, last)

    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        changelist = super().get_changelist_instance(request)
        page = list(changelist.result_list)  # evaluated once; the rows render these objects
        health = _health(page)
        for credential in page:
            credential.__dict__[HEALTH] = health[credential.pk]
        return changelist

    @admin.action(description="Activate selected credentials", permissions=["change"])
    def activate(self, request: HttpRequest, queryset: QuerySet[APIKeyCredentials]) -> None:
        count = self._set_active(request, queryset, True)
        self.message_user(request, f"{count} credential(s) activated.", messages.SUCCESS)

    @admin.action(description="Deactivate selected credentials", permissions=["change"])
    def deactivate(self, request: HttpRequest, queryset: QuerySet[APIKeyCredentials]) -> None:
        count = self._set_active(request, queryset, False)
        self.message_user(request, f"{count} credential(s) deactivated.", messages.SUCCESS)

    def _set_active(
        self, request: HttpRequest, queryset: QuerySet[APIKeyCredentials], active: bool
    ) -> int:
        # Saved one by one, not update(): saving is what tells every worker (and the
        # client cache) that a credential changed. Each change goes to its history, as
        # an edit on the form would.
        changed = [credential for credential in queryset if credential.is_active != active]
        for credential in changed:
            credential.is_active = active
            credential.save(update_fields=["is_active", "updated_at"])
            self.log_change(request, credential, "Activated." if active else "Deactivated.")
        return len(changed)

    def lookup_allowed(self, lookup: str, value: str, request: Any = None) -> bool:
        if lookup.split("__")[0] in {"api_key", "key_hint"}:
            return False
        return super().lookup_allowed(lookup, value, request)

    @sensitive_key
    def add_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return super().add_view(request, *args, **kwargs)

    @sensitive_key
    def change_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return super().change_view(request, *args, **kwargs)
