"""Fixtures the LLM tests share: alice's credential on an upstream that reports
a cost (x-litellm-response-cost: 0.0042)."""

from __future__ import annotations

import pytest


@pytest.fixture
def costly(start_upstream):
    return start_upstream(cost="0.0042")


@pytest.fixture
def credential(credential_factory, alice, costly):
    return credential_factory(title="Alice proxy", owner=alice, base_url=costly.base_url)
