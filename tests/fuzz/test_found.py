"""Every 500 the fuzzing found, as its minimal input: one regression test each.

Found by tests/fuzz against the tree of issue 10 (through the ASGI application, as a
signed-in browser or admin). Each must now get a 4xx or a page, never a 500, and
nothing logged at ERROR.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.fuzz.conftest import Site, assert_fine
from tests.fuzz.strategies import ALICE, MINE, form_body

FORM = "application/x-www-form-urlencoded"
CREDENTIALS = "/admin/credentials/apikeycredentials/"
DEEP = b"[" * 5000 + b"]" * 5000

FOUND = {
    # The API read its body after Django's CSRF check had parsed it as a form.
    "multipart body to the API": (
        "POST",
        "/api/llm/chat",
        b"",
        b"\x00",
        "multipart/form-data; boundary=fuzz",
        "alice",
    ),
    "JSON nested 5,000 levels": ("POST", "/api/llm/chat", b"", DEEP, "application/json", "alice"),
    "a lone surrogate in a prompt": (
        "POST",
        "/llm/send",
        b"",
        json.dumps({"purpose": "chat", "prompt": "\ud800", "model": "gpt-test-mini"}).encode(),
        "application/json",
        "alice",
    ),
    "a lone surrogate in a model name": (
        "POST",
        "/api/llm/embeddings",
        b"",
        json.dumps({"model": "\ud800", "input": "hello there"}).encode(),
        "application/json",
        "alice",
    ),
    # Django looks up a field named "" for an empty _to_field, on every change page.
    "an empty _to_field on a change page": (
        "GET",
        f"{CREDENTIALS}{MINE}/change/",
        b"_to_field=",
        None,
        None,
        "admin",
    ),
    "an empty _to_field posted with a change": (
        "POST",
        f"{CREDENTIALS}{MINE}/change/",
        b"",
        form_body({"title": "t", "provider": "openai", "_to_field": ""}),
        FORM,
        "admin",
    ),
    "an empty _to_field on the user admin": (
        "GET",
        f"/admin/auth/user/{ALICE}/change/",
        b"_to_field=",
        None,
        None,
        "admin",
    ),
    # The selected ids of an action go unchecked into a filter on the primary key.
    "an action on an id that is not a UUID": (
        "POST",
        CREDENTIALS,
        b"",
        form_body({"action": "activate", "_selected_action": "x"}),
        FORM,
        "admin",
    ),
    "an action on an empty id": (
        "POST",
        CREDENTIALS,
        b"",
        form_body({"action": "activate", "_selected_action": ""}),
        FORM,
        "admin",
    ),
    "delete_selected on a group id that is not a number": (
        "POST",
        "/admin/auth/group/",
        b"",
        form_body({"action": "delete_selected", "_selected_action": "0b03a118"}),
        FORM,
        "admin",
    ),
    # The date hierarchy's end of period beyond year 9999.
    "the usage records of year 9999": (
        "GET",
        "/admin/llm/usagerecord/",
        b"created_at__year=9999",
        None,
        None,
        "admin",
    ),
    "the usage records of December 9999": (
        "GET",
        "/admin/llm/usagerecord/",
        b"created_at__year=9999&created_at__month=12",
        None,
        None,
        "admin",
    ),
    "the usage records of a year too large for a date": (
        "GET",
        "/admin/llm/usagerecord/",
        b"created_at__year=99999999999999999999",
        None,
        None,
        "admin",
    ),
    # PostgreSQL refuses NUL: the autocomplete searches with its term as it comes.
    "NUL in the autocomplete's term": (
        "GET",
        "/admin/autocomplete/",
        b"app_label=credentials&model_name=apikeycredentials&field_name=owner&term=%00",
        None,
        None,
        "admin",
    ),
    # django-axes (platform_site/throttle.py, admin.py). Django's sign-in form does not
    # limit the user name's length; axes stores it in 255 characters (PostgreSQL refused).
    "a user name longer than axes stores": (
        "POST",
        "/accounts/login/",
        b"",
        form_body({"username": "u" * 300, "password": "x"}),
        FORM,
        "anonymous",
    ),
    # axes' own action read request.axes_attempt_time, which only a sign-in sets.
    "axes' Clean up expired attempts on a selection": (
        "POST",
        "/admin/axes/accessattempt/",
        b"",
        form_body({"action": "cleanup_expired_attempts", "_selected_action": "1"}),
        FORM,
        "admin",
    ),
}


@pytest.mark.parametrize("case", FOUND.values(), ids=FOUND.keys())
def test_what_the_fuzzing_found_is_not_a_500(site: Site, case: tuple[Any, ...]) -> None:
    method, path, query, body, content_type, who = case
    answer = site.send(
        method, site.resolve_path(path), query=query, body=body, content_type=content_type, who=who
    )
    assert_fine(answer, api=path.startswith(("/api/", "/llm/")))
