"""The admin site: Django's, answering tampered requests with a message, never a 500.

Django's admin trusts some parameters its own pages send, and a crafted request (or
tests/fuzz) makes it fail with a 500 in every ModelAdmin, Django's own (users, groups)
and django-axes' included:

- `?_to_field=` (empty) on a change, history or delete page: Django looks up a field
  named "" (FieldDoesNotExist);
- an action POST whose selected ids are not ids of the model ("x", or a UUID for an
  integer key): the filter on them raises (ValidationError, ValueError);
- a date hierarchy beyond year 9999 (`?created_at__year=9999`): the end of the period
  is out of range (ValueError, OverflowError);
- a search term holding NUL (the autocomplete's `term`): PostgreSQL refuses it;
- a lookup on a field with a value its column cannot hold (`?ip_address=0` on
  PostgreSQL): it fails when the page counts its rows.

`AdminSite.register` mixes `SturdyAdmin` into every ModelAdmin registered, so each of
them answers these as Django answers other bad input: a 404, a warning, `?e=1`.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.apps import AdminConfig as DjangoAdminConfig
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import ValidationError
from django.db import DataError
from django.http import HttpRequest, HttpResponse

BAD_SELECTION = "The selection holds items that do not exist: select them again."


class SturdyChangeList(ChangeList):
    """Lookups Django lets through and the database refuses are bad lookups too."""

    def get_filters(self, request: HttpRequest) -> Any:
        try:
            return super().get_filters(request)
        except (ValueError, OverflowError) as error:  # a date hierarchy out of range
            raise IncorrectLookupParameters(error) from error

    def get_results(self, request: HttpRequest) -> None:
        # E.g. ?ip_address=0 on PostgreSQL, which casts the value to inet when counting.
        try:
            super().get_results(request)
        except (ValueError, OverflowError, DataError) as error:
            raise IncorrectLookupParameters(error) from error


_sturdy_changelists: dict[type[ChangeList], type[ChangeList]] = {}


def _sturdy(changelist: type[ChangeList]) -> type[ChangeList]:
    """`changelist` (Django's or a ModelAdmin's own) with SturdyChangeList's checks."""
    if issubclass(changelist, SturdyChangeList):
        return changelist
    if changelist not in _sturdy_changelists:
        sturdy = type(changelist.__name__, (SturdyChangeList, changelist), {})
        _sturdy_changelists[changelist] = sturdy
    return _sturdy_changelists[changelist]


class SturdyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """What `AdminSite.register` adds to every ModelAdmin (see the module)."""

    def get_object(self, request: HttpRequest, object_id: str, from_field: Any = None) -> Any:
        return super().get_object(request, object_id, from_field or None)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return _sturdy(super().get_changelist(request, **kwargs))

    def get_search_results(self, request: HttpRequest, queryset: Any, search_term: str) -> Any:
        return super().get_search_results(request, queryset, search_term.replace("\x00", ""))

    def response_action(self, request: HttpRequest, queryset: Any) -> HttpResponse | None:
        key = self.model._meta.pk
        try:
            for selected in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME):
                key.get_prep_value(key.to_python(selected))
        except (ValidationError, ValueError, TypeError, OverflowError):
            self.message_user(request, BAD_SELECTION, messages.WARNING)
            return None
        return super().response_action(request, queryset)


class AdminSite(admin.AdminSite):
    def register(self, model_or_iterable: Any, admin_class: Any = None, **options: Any) -> None:
        base = admin_class or admin.ModelAdmin
        sturdy = type(
            base.__name__,
            (SturdyAdmin, base),
            {"__module__": base.__module__, "__qualname__": base.__qualname__},
        )
        super().register(model_or_iterable, sturdy, **options)


class AdminConfig(DjangoAdminConfig):
    default_site = "platform_site.admin_site.AdminSite"
