"""Fuzzing the admin (signed in as a superuser) and the login pages.

Every model the admin registers gets its changelist's GET parameters (search, ordering,
page, and lookups on each of its fields), its actions and its object pages fuzzed, so
models registered later (django-axes', say) are covered without a change here. The
credential's add and change forms, the autocomplete endpoint, the user's add form and
both login pages get strategies of their own. Forms are mostly valid ones with a field
or two spoiled (see `spoiled_form`), so the garbage gets past the first check.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.urls import reverse
from hypothesis import given
from hypothesis import strategies as st

from credentials.models import Provider
from tests.fuzz.conftest import Answer, Site, assert_fine, fuzz
from tests.fuzz.strategies import (
    ADMIN,
    ALICE,
    BOBS,
    INACTIVE,
    MINE,
    PLACEHOLDERS,
    SHARED,
    UPSTREAM,
    form_body,
    header_values,
    multipart_body,
    path_segment,
    query_garbage,
    query_texts,
    raw_queries,
    spoiled_form,
    texts,
)

BASE_URLS = [
    UPSTREAM,
    "",
    "http://127.0.0.1:9/v1",
    "https://api.openai.com/v1",
    "http://169.254.169.254/latest",
    "http://[::ffff:169.254.169.254]/",
    "http://[::1",
    "http://[fe80::1%25eth0]/",
    "http://xn--/",
    "http://xn--zz-zz.com/",
    "http://\u202eexample.com/",
    "http://a..b/",
    "http://" + "a" * 300 + ".com/",
    "http://" + "a." * 200 + "com/",
    "http://h:99999/",
    "http://h:-1/",
    "http://h:0/",
    "http://0x7f.1/",
    "http://2130706433/",
    "http://user:pass@127.0.0.1/",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "http://%00/",
    "http://a\x00b.com/",
    "http://例え.jp/",
    "http://\ud800.com/",
    "//example.com",
    "http:/example.com",
    "HTTP://EXAMPLE.COM:443/v1",
]
DATES = ["2030-01-01", "9999-12-31", "0001-01-01", "1970-01-01", "2030-02-30", "99999-1-1"]
TIMES = ["12:00:00", "23:59:59.999999", "24:00", "00:00", "-1:00"]

credential_forms = spoiled_form(
    {
        "title": st.just("Fuzzed"),
        "provider": st.sampled_from([p.value for p in Provider]),
        "api_key": st.just("sk-test-fake-fuzz-0000"),
        "base_url": st.sampled_from(BASE_URLS),
    },
    {
        "owner": st.sampled_from([ALICE, ADMIN, "", "0", "-1", str(2**63)]),
        "is_active": st.sampled_from(["on", ""]),
        "expires_at_0": st.sampled_from(DATES),
        "expires_at_1": st.sampled_from(TIMES),
        "fallback": st.one_of(st.sampled_from([*PLACEHOLDERS, ""]), st.uuids().map(str)),
        "_save": st.just("Save"),
        "_continue": st.just("Save and continue editing"),
        "_addanother": st.just("Save and add another"),
        "_popup": st.just("1"),
        "_to_field": st.sampled_from(["id", ""]),
        "_changelist_filters": st.just("q=x"),
    },
)
encodings = st.sampled_from(["urlencoded", "multipart"])


def post_form(
    site: Site, path: str, fields: dict[str, Any], encoding: str, **kwargs: Any
) -> Answer:
    fields = site.resolve(fields)
    if encoding == "multipart":
        body = multipart_body(fields)
        content_type = "multipart/form-data; boundary=fuzzboundary"
    else:
        body = form_body(fields)
        content_type = "application/x-www-form-urlencoded"
    return site.send("POST", path, body=body, content_type=content_type, **kwargs)


def changelist(model: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


CREDENTIALS = "/admin/credentials/apikeycredentials/"
CHANGELISTS = sorted(changelist(model) for model in admin.site._registry)


def test_the_credential_add_form_survives_any_input(site: Site) -> None:
    @fuzz(50)
    @given(fields=credential_forms, encoding=encodings)
    def example(fields: dict[str, Any], encoding: str) -> None:
        assert_fine(post_form(site, f"{CREDENTIALS}add/", fields, encoding, who="admin"))

    example()
    site.assert_usage_still_recorded()


def test_the_credential_change_form_survives_any_input(site: Site) -> None:
    @fuzz(40)
    @given(
        credential=st.sampled_from([MINE, SHARED, BOBS, INACTIVE]),
        fields=credential_forms,
        encoding=encodings,
    )
    def example(credential: str, fields: dict[str, Any], encoding: str) -> None:
        path = f"{CREDENTIALS}{site.resolve(credential)}/change/"
        assert_fine(post_form(site, path, fields, encoding, who="admin"))

    example()
    site.assert_usage_still_recorded()


def _lookups(model: Any) -> list[str]:
    """The GET parameters a changelist may meet: its own and lookups on every field."""
    names = ["q", "o", "p", "e", "all", "_popup", "_to_field", "_facets"]
    for field in model._meta.get_fields():
        name = field.name
        names += [f"{name}__exact", f"{name}__isnull", f"{name}__in", f"{name}__gte"]
        names += [f"{name}__lt", f"{name}__year", f"{name}__month", f"{name}__day"]
        if field.is_relation:
            names += [f"{name}__id__exact", f"{name}__pk__exact"]
    names += ["ownership", "expired"]
    return names


LOOKUPS = {changelist(model): _lookups(model) for model in admin.site._registry}
lookup_values = st.one_of(
    query_texts,
    st.sampled_from([*PLACEHOLDERS, ALICE, "1", "0", "-1", "yes", "no", "True", "", "2030"]),
    st.sampled_from(["99999999999999999999", "9999", "12", "31", "0", "1e9", "NaN", "1.-2.x"]),
    st.sampled_from(["2030-01-01", "2030-01-01 00:00:00+00:00", "9999-12-31", "0001-01-01"]),
    st.sampled_from(["1.2.-3", "-0", "99", "1.1.1.1", "0.", ".", "-"]),
)


@st.composite
def changelist_queries(draw: st.DrawFn) -> tuple[str, bytes | list[tuple[str, str]]]:
    path = draw(st.sampled_from(CHANGELISTS))
    if draw(st.booleans()):
        return path, draw(raw_queries)
    names = st.one_of(st.sampled_from(LOOKUPS[path]), texts)
    return path, draw(st.lists(st.tuples(names, lookup_values), max_size=4))


def test_every_changelist_survives_any_query(site: Site) -> None:
    """Search, filters, date hierarchy, ordering and page of every registered model."""
    site.assert_usage_still_recorded()  # a usage record to list

    @fuzz(120)
    @given(query=changelist_queries())
    def example(query: tuple[str, bytes | list[tuple[str, str]]]) -> None:
        path, params = query
        raw = params if isinstance(params, bytes) else form_body(site.resolve(params))
        assert_fine(site.send("GET", path, query=raw, who="admin"))

    example()
    site.assert_usage_still_recorded()


def _actions(model_admin: Any) -> list[str]:
    return ["delete_selected", *(getattr(a, "__name__", a) for a in model_admin.actions or [])]


ACTIONS = {changelist(model): _actions(each) for model, each in admin.site._registry.items()}
SELECTABLE = [*PLACEHOLDERS, ALICE, ADMIN]


@st.composite
def action_posts(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A changelist and an action's POST: the action, the selected ids, and the rest."""
    path = draw(st.sampled_from(sorted(ACTIONS)))
    fields = draw(
        spoiled_form(
            {
                "action": st.sampled_from(ACTIONS[path]),
                "_selected_action": st.lists(st.sampled_from(SELECTABLE), min_size=1, max_size=3),
            },
            {
                "select_across": st.sampled_from(["0", "1"]),
                "index": st.sampled_from(["0", "1", "-1", "99999999999999999999"]),
                "post": st.just("yes"),
            },
        )
    )
    return path, fields


def test_every_changelist_action_survives_any_post(site: Site) -> None:
    @fuzz(50)
    @given(post=action_posts(), encoding=encodings, query=st.one_of(st.just(b""), raw_queries))
    def example(post: tuple[str, dict[str, Any]], encoding: str, query: bytes) -> None:
        path, fields = post
        assert_fine(post_form(site, path, fields, encoding, who="admin", query=query))

    example()
    site.assert_usage_still_recorded()


object_ids = st.one_of(
    st.sampled_from(SELECTABLE),
    st.uuids().map(str),
    texts.filter(bool),
    st.sampled_from(["0", "-1", "99999999999999999999", "1e3", "_5F", "_", "%", "..", "add"]),
)


def test_object_pages_survive_any_id(site: Site) -> None:
    @fuzz(60)
    @given(
        path=st.sampled_from(CHANGELISTS),
        object_id=object_ids,
        page=st.sampled_from(["change/", "history/", "delete/", ""]),
        params=st.dictionaries(
            st.sampled_from(["_to_field", "_popup", "_changelist_filters", "q"]),
            st.one_of(st.sampled_from(["id", "pk", "username", "1"]), query_texts),
            max_size=2,
        ),
    )
    def example(path: str, object_id: str, page: str, params: dict[str, Any]) -> None:
        url = f"{path}{path_segment(site.resolve(object_id))}/{page}"
        assert_fine(site.send("GET", url, query=form_body(params), who="admin"))

    example()
    site.assert_usage_still_recorded()


def test_autocomplete_survives_any_term(site: Site) -> None:
    @fuzz(30)
    @given(
        params=spoiled_form(
            {
                "app_label": st.sampled_from(["credentials", "auth", "llm"]),
                "model_name": st.sampled_from(["apikeycredentials", "user"]),
                "field_name": st.sampled_from(["owner", "fallback", "user"]),
                "term": st.one_of(st.just("ali"), query_texts),
            },
            {"page": st.sampled_from(["1", "2", "0", "-1", "x"])},
            garbage=query_garbage,
        )
    )
    def example(params: dict[str, Any]) -> None:
        query = form_body(params)
        assert_fine(site.send("GET", "/admin/autocomplete/", query=query, who="admin"))

    example()
    site.assert_usage_still_recorded()


def test_the_user_add_form_survives_any_input(site: Site) -> None:
    @fuzz(25)
    @given(
        fields=spoiled_form(
            {
                "username": st.just("fuzzed-user"),
                "password1": st.just("a long fuzz passphrase 1"),
                "password2": st.just("a long fuzz passphrase 1"),
            },
            {"usable_password": st.sampled_from(["true", "false"]), "_save": st.just("Save")},
        ),
        encoding=encodings,
    )
    def example(fields: dict[str, Any], encoding: str) -> None:
        assert_fine(post_form(site, "/admin/auth/user/add/", fields, encoding, who="admin"))

    example()
    site.assert_usage_still_recorded()


def test_the_login_pages_survive_any_input(site: Site, reset_login_throttle) -> None:
    """Each example comes from an address of its own, with the throttle's memory reset:
    what is fuzzed is the input, not the lockout (tests/site/test_login_throttle.py)."""

    @fuzz(30)
    @given(
        path=st.sampled_from(["/accounts/login/", "/admin/login/"]),
        fields=spoiled_form(
            {
                "username": st.sampled_from(["admin", "alice", "nobody"]),
                "password": st.sampled_from(["fuzz-admin-pass", "wrong"]),
            },
            {"next": st.sampled_from(["/llm/", "//evil.example/", ""])},
        ),
        encoding=encodings,
        address=st.ip_addresses().map(str),
        headers=st.dictionaries(
            st.sampled_from(["User-Agent", "X-Forwarded-For", "X-Real-IP", "Referer"]),
            header_values,
            max_size=3,
        ),
        query=st.one_of(st.just(b""), raw_queries),
    )
    def example(
        path: str,
        fields: dict[str, Any],
        encoding: str,
        address: str,
        headers: dict[str, str],
        query: bytes,
    ) -> None:
        reset_login_throttle()
        answer = post_form(
            site,
            path,
            fields,
            encoding,
            who="anonymous",
            headers=headers,
            client=(address, 50000),
            query=query,
        )
        assert_fine(answer)

    example()
    site.assert_usage_still_recorded()
