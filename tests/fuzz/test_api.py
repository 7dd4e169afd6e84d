"""Fuzzing the JSON API and the playground's send (which posts JSON, as the page does).

Each test ends with one more real chat call, which must be recorded.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import EXPLORE, Site, assert_fine, fuzz
from tests.fuzz.strategies import (
    content_types,
    credential_refs,
    form_body,
    header_values,
    nested,
    raw_bodies,
    raw_queries,
    salted,
    shaped,
    with_slot,
)

JSON_ENDPOINTS = ["/api/llm/chat", "/api/llm/embeddings", "/llm/send"]


@pytest.mark.parametrize(
    ("path", "examples"),
    [("/api/llm/chat", 80), ("/api/llm/embeddings", 40), ("/llm/send", 60)],
)
def test_json_endpoints_survive_any_json(site: Site, path: str, examples: int) -> None:
    """Valid bodies with a part spoiled, and objects of any shape."""

    @fuzz(examples)
    @given(body=shaped(path))
    def example(body: Any) -> None:
        assert_fine(site.post_json(path, body), api=True)

    example()
    # Garbage refused at the first check tests nothing behind it: enough examples must
    # be valid enough to reach the upstream (through the SDK, the breaker, the usage).
    reached = len(site.upstream.requests)
    assert reached >= (EXPLORE or examples) // 8, f"only {reached} examples reached the upstream"
    site.assert_usage_still_recorded()


def test_json_endpoints_survive_odd_characters_anywhere(site: Site) -> None:
    """A lone surrogate, NUL, a bidi mark... in any string of a valid body, or a name."""

    @fuzz(60)
    @given(data=st.data(), path=st.sampled_from(JSON_ENDPOINTS))
    def example(data: st.DataObject, path: str) -> None:
        assert_fine(site.post_json(path, data.draw(salted(path), label="body")), api=True)

    example()
    site.assert_usage_still_recorded()


def test_json_endpoints_survive_any_bytes(site: Site) -> None:
    """Deep nesting, huge numbers, surrogates (escaped, as UTF-8 bytes, in UTF-16),
    invalid UTF-8, trailing junk, bodies around the size limit, any content type."""

    @fuzz(120)
    @given(data=st.data(), path=st.sampled_from(JSON_ENDPOINTS), content_type=content_types)
    def example(data: st.DataObject, path: str, content_type: str | None) -> None:
        body = data.draw(raw_bodies(path), label="body")
        answer = site.send("POST", path, body=body, content_type=content_type)
        assert_fine(answer, api=True)

    example()
    site.assert_usage_still_recorded()


def test_json_endpoints_survive_deep_nesting(site: Site) -> None:
    """Nesting alone (1 to 5,000 levels, in every field): other bugs cannot hide it."""

    @fuzz(30)
    @given(
        path=st.sampled_from(JSON_ENDPOINTS),
        slot=st.sampled_from([None, "model", "messages", "input", "prompt", "unknown"]),
        raw=nested(),
    )
    def example(path: str, slot: str | None, raw: str) -> None:
        body = with_slot(path, slot, raw).encode()
        answer = site.send("POST", path, body=body, content_type="application/json")
        assert_fine(answer, api=True)

    example()
    site.assert_usage_still_recorded()


def test_get_endpoints_survive_any_query(site: Site) -> None:
    @fuzz(40)
    @given(
        path=st.sampled_from(
            ["/api/llm/credentials", "/api/llm/models", "/api/llm/budget", "/llm/", "/healthz"]
        ),
        query=st.one_of(raw_queries, credential_refs),
    )
    def example(path: str, query: Any) -> None:
        if not isinstance(query, bytes):  # a credential reference, of any JSON type
            value = query if isinstance(query, str) else str(query)
            query = form_body({"credential": site.resolve(value)})
        answer = site.send("GET", path, query=query)
        assert_fine(answer, api=path.startswith("/api/"))

    example()
    site.assert_usage_still_recorded()


def test_the_api_answers_signed_out_callers_and_bad_tokens_in_json(site: Site) -> None:
    @fuzz(20)
    @given(
        path=st.sampled_from(JSON_ENDPOINTS),
        who=st.sampled_from(["anonymous", "alice", "alice without token"]),
        token=st.one_of(st.none(), header_values),
    )
    def example(path: str, who: str, token: str | None) -> None:
        answer = site.send(
            "POST",
            path,
            body=b'{"model": "gpt-test-mini", "prompt": "hi", "input": "hi"}',
            content_type="application/json",
            who=who,
            headers={} if token is None else {"X-CSRFToken": token},
        )
        assert_fine(answer, api=True)

    example()
    site.assert_usage_still_recorded()
