"""What an admin reads about a credential's usage: totals, a daily cost chart, the records.

Usage records are created directly, spread over the last 40 days.
"""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal
from html import unescape

import pytest
from django.urls import reverse
from django.utils import timezone

from llm.models import UsageRecord

RECORDS_URL = reverse("admin:llm_usagerecord_changelist")


def change_url(credential) -> str:
    return reverse("admin:credentials_apikeycredentials_change", args=[credential.pk])


@pytest.fixture
def credential(credential_factory):
    return credential_factory(title="Team proxy", base_url="http://litellm:4000/v1")


@pytest.fixture
def other(credential_factory):
    return credential_factory(title="Someone else", base_url="http://litellm:4000/v1")


@pytest.fixture
def now():
    return timezone.now()


@pytest.fixture
def records(credential, other, now):
    """(days ago, tokens, cost, outcome, purpose) for `credential`, and noise for `other`."""
    spread = [
        (timedelta(0), 100, "0.5", "ok", "chat"),
        (timedelta(hours=2), 0, None, "ProxyUnreachable", "embeddings"),
        (timedelta(days=2), 50, "0.25", "ok", "code"),
        (timedelta(days=2), 150, "1.0", "ok", "chat"),
        (timedelta(days=10), 400, "2.0", "ok", "chat"),
        (timedelta(days=40), 800, "8.0", "ok", "chat"),
    ]
    made = [
        UsageRecord.objects.create(
            credential=credential,
            purpose=purpose,
            model="gpt-test-mini",
            route_source="credential",
            route_host="litellm:4000",
            total_tokens=tokens,
            cost_usd=Decimal(cost) if cost else None,
            outcome=outcome,
            latency_ms=12.0,
            created_at=now - ago,
        )
        for ago, tokens, cost, outcome, purpose in spread
    ]
    UsageRecord.objects.create(
        credential=other,
        purpose="chat",
        model="gpt-test-large",
        total_tokens=9999,
        cost_usd=Decimal("99"),
        created_at=now,
    )
    return made


def totals_table(html: str) -> dict[str, tuple[int, int, str]]:
    rows = re.findall(
        r"<tr><td>(24 h|7 days|30 days)</td><td>(\d+)</td><td>(\d+)</td><td>([^<]*)</td></tr>",
        html,
    )
    return {period: (int(calls), int(tokens), cost) for period, calls, tokens, cost in rows}


def chart_svg(html: str) -> str:
    svg = re.search(r'<svg [^>]*aria-label="Daily cost.*?</svg>', html, re.DOTALL)
    assert svg is not None
    return svg[0]


def bars(html: str) -> list[tuple[int, str]]:
    """(height, title) of each bar of the cost chart."""
    found = re.findall(
        r'<rect [^>]*height="(\d+)"[^>]*><title>([^<]*)</title></rect>', chart_svg(html)
    )
    return [(int(height), unescape(title)) for height, title in found]


def test_the_change_page_shows_the_totals_of_24_hours_7_and_30_days(
    admin_client, credential, records
):
    response = admin_client.get(change_url(credential))

    assert response.status_code == 200
    assert totals_table(response.content.decode()) == {
        "24 h": (2, 100, "0.5000"),
        "7 days": (4, 300, "1.7500"),
        "30 days": (5, 700, "3.7500"),
    }


def test_the_change_page_charts_30_days_of_cost(admin_client, credential, records, now):
    html = admin_client.get(change_url(credential)).content.decode()

    chart = bars(html)
    assert len(chart) == 30
    assert chart_svg(html).count("<rect") == 30
    today = timezone.localdate(now)

    def label(days_ago: int) -> str:
        return f"{today - timedelta(days=days_ago):%Y-%m-%d}"

    titles = [title for _, title in chart]
    assert titles[0].startswith(label(29))
    assert titles[-1] == f"{label(0)}: $0.5000"
    assert f"{label(2)}: $1.2500" in titles
    assert f"{label(10)}: $2.0000" in titles
    assert f"{label(1)}: $0.0000" in titles
    assert not any(label(40) in title for title in titles)
    # The costliest day is the full height; a day without cost has no bar.
    heights = dict((title, height) for height, title in chart)
    assert heights[f"{label(10)}: $2.0000"] == max(heights.values()) > 0
    assert heights[f"{label(2)}: $1.2500"] < heights[f"{label(10)}: $2.0000"]
    assert heights[f"{label(1)}: $0.0000"] == 0
    assert "highest $2.0000" in html


def test_the_change_page_links_to_the_credentials_usage_records(admin_client, credential, records):
    html = admin_client.get(change_url(credential)).content.decode()

    link = f"{RECORDS_URL}?credential__id__exact={credential.pk}"
    assert f'href="{link}"' in html
    listed = admin_client.get(link)
    assert listed.status_code == 200
    assert listed.context["cl"].result_count == 6
    assert "6 usage records" in listed.content.decode()
    assert "gpt-test-large" not in listed.content.decode()


def test_a_credential_without_usage_shows_zeros(admin_client, credential):
    html = admin_client.get(change_url(credential)).content.decode()

    assert totals_table(html) == {
        "24 h": (0, 0, "–"),
        "7 days": (0, 0, "–"),
        "30 days": (0, 0, "–"),
    }
    assert len(bars(html)) == 30
    assert all(height == 0 for height, _ in bars(html))


def test_the_usage_records_are_listed_and_filtered(admin_client, records, other):
    everything = admin_client.get(RECORDS_URL)
    assert everything.status_code == 200
    assert everything.context["cl"].result_count == 7
    page = everything.content.decode()
    assert "Team proxy" in page
    assert "Someone else" in page
    assert "12 ms" in page
    # The filters are offered as links in the sidebar.
    assert "?outcome=ProxyUnreachable" in page
    assert "?purpose__exact=code" in page

    failed = admin_client.get(RECORDS_URL, {"outcome": "ProxyUnreachable"})
    assert failed.status_code == 200
    assert [r.outcome for r in failed.context["cl"].result_list] == ["ProxyUnreachable"]

    code = admin_client.get(RECORDS_URL, {"purpose__exact": "code"})
    assert [r.purpose for r in code.context["cl"].result_list] == ["code"]

    chats = admin_client.get(RECORDS_URL, {"purpose__exact": "chat", "outcome": "ok"})
    assert chats.context["cl"].result_count == 5


def test_usage_records_cannot_be_added_changed_or_deleted(admin_client, records):
    record = records[0]
    listing = admin_client.get(RECORDS_URL).content.decode()
    add_url = reverse("admin:llm_usagerecord_add")
    change = reverse("admin:llm_usagerecord_change", args=[record.pk])
    delete = reverse("admin:llm_usagerecord_delete", args=[record.pk])

    assert add_url not in listing
    assert "delete_selected" not in listing
    assert admin_client.get(add_url).status_code == 403
    assert admin_client.post(add_url, {"purpose": "chat", "model": "x"}).status_code == 403
    assert UsageRecord.objects.count() == 7

    view = admin_client.get(change)
    assert view.status_code == 200
    assert 'name="_save"' not in view.content.decode()
    assert admin_client.post(change, {"model": "changed"}).status_code == 403
    record.refresh_from_db()
    assert record.model == "gpt-test-mini"

    assert admin_client.get(delete).status_code == 403
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert UsageRecord.objects.filter(pk=record.pk).exists()
