"""The price table in the admin, and where each usage record's cost came from.

Records come from real calls to loopback upstreams: one that reports a cost (LiteLLM's
header), one that reports none, so the price table prices it, or nothing does.
"""

from __future__ import annotations

import re
from decimal import Decimal
from html import unescape

import pytest
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.urls import reverse

from credentials.models import PLATFORM
from llm import prices, services
from llm.models import ModelPrice, UsageRecord
from tests.conftest import FAKE_KEY

RECORDS_URL = reverse("admin:llm_usagerecord_changelist")
PRICES_URL = reverse("admin:llm_modelprice_changelist")
ADD_PRICE_URL = reverse("admin:llm_modelprice_add")
CELL = r'<t[dh] class="field-([a-z_]+)[^"]*"[^>]*>(.*?)</t[dh]>'
HELLO = [{"role": "user", "content": "hello there"}]  # 2 tokens in, 3 out


@pytest.fixture(autouse=True)
def _own_cache(private_cache):
    """The price table is reloaded through the cache's stamp: a cache of the test's own."""


@pytest.fixture
def plain(start_upstream):
    """An upstream that reports no cost (direct OpenAI, OpenRouter)."""
    return start_upstream()


def chat(credential, model: str) -> None:
    services.chat(messages=HELLO, model=model, credential=credential, user=PLATFORM)


def rows(response) -> list[dict[str, str]]:
    """The list's rows: column class -> text."""
    found = []
    for row in re.findall(r"<tr>(.*?)</tr>", response.content.decode(), flags=re.S):
        cells = re.findall(CELL, row, flags=re.S)
        if cells:
            found.append(
                {
                    name: " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())
                    for name, html in cells
                }
            )
    return found


@pytest.fixture
def calls(credential_factory, costly, plain):
    """Three calls: priced by the upstream, by the price table, by nothing."""
    ModelPrice.objects.create(
        model="gpt-test-*", provider="", input_usd_per_million=1, output_usd_per_million=2
    )
    reporting = credential_factory(title="Reports cost", base_url=costly.base_url)
    silent = credential_factory(title="Says nothing", base_url=plain.base_url)
    chat(reporting, "gpt-test-mini")
    chat(silent, "gpt-test-large")
    chat(silent, "mystery-model")
    return reporting, silent


# ---- usage records: the cost and where it came from ------------------------------------


def test_each_record_says_where_its_cost_came_from(admin_client, calls):
    listed = rows(admin_client.get(RECORDS_URL))

    assert [(r["model"], r["cost_display"], r["cost_source_display"]) for r in listed] == [
        ("mystery-model", "unpriced", "none"),
        ("gpt-test-large", "0.00000800", "price table"),
        ("gpt-test-mini", "0.00420000", "upstream"),
    ]


def test_a_failed_call_without_tokens_is_not_called_unpriced(admin_client, credential_factory):
    from tests.upstream import free_port

    down = credential_factory(title="Down", base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(services.LLMError):
        chat(down, "gpt-test-mini")

    (row,) = rows(admin_client.get(RECORDS_URL))

    assert (row["outcome"], row["cost_display"], row["cost_source_display"]) == (
        "ProxyUnreachable",
        "-",
        "none",
    )


def test_the_unpriced_filter_lists_the_calls_nothing_priced(admin_client, calls):
    listed = rows(admin_client.get(RECORDS_URL + "?unpriced=yes"))

    assert [r["model"] for r in listed] == ["mystery-model"]
    assert "Unpriced (tokens, no cost)" in admin_client.get(RECORDS_URL).content.decode()


@pytest.mark.parametrize(
    ("source", "models"),
    [
        ("header", ["gpt-test-mini"]),
        ("price_table", ["gpt-test-large"]),
        ("none", ["mystery-model"]),
    ],
)
def test_the_records_filter_by_cost_source(admin_client, calls, source, models):
    listed = rows(admin_client.get(f"{RECORDS_URL}?cost_source__exact={source}"))

    assert [r["model"] for r in listed] == models


def test_a_records_page_shows_its_cost_source(admin_client, calls):
    record = UsageRecord.objects.get(model="gpt-test-large")

    page = admin_client.get(reverse("admin:llm_usagerecord_change", args=[record.pk]))

    text = " ".join(unescape(re.sub(r"<[^>]+>", " ", page.content.decode())).split())
    assert "Cost (USD): 0.00000800" in text
    assert "Cost source: the price table" in text
    assert FAKE_KEY not in page.content.decode()


# ---- the price table ------------------------------------------------------------------------


@pytest.fixture
def table(db):
    for model, provider, price_in, price_out in [
        ("gpt-4o", "", "2.5", "10"),
        ("gpt-4o", "openai", "2.4", "9.6"),
        ("anthropic/*", "openrouter", "3", "15"),
        ("text-embedding-3-small", "litellm", "0.02", "0"),
    ]:
        ModelPrice.objects.create(
            model=model,
            provider=provider,
            input_usd_per_million=Decimal(price_in),
            output_usd_per_million=Decimal(price_out),
        )


def test_the_price_list_shows_model_provider_and_prices(admin_client, table):
    listed = rows(admin_client.get(PRICES_URL))

    assert [
        (r["model"], r["provider_display"], r["input_usd_per_million"], r["output_usd_per_million"])
        for r in listed
    ] == [
        ("anthropic/*", "OpenRouter", "3.000000", "15.000000"),
        ("gpt-4o", "any", "2.500000", "10.000000"),
        ("gpt-4o", "OpenAI", "2.400000", "9.600000"),
        ("text-embedding-3-small", "LiteLLM Proxy", "0.020000", "0.000000"),
    ]
    assert all(r["updated_at"] for r in listed)


@pytest.mark.parametrize(
    ("query", "models"),
    [
        ("?q=gpt", ["gpt-4o", "gpt-4o"]),
        ("?q=anthropic", ["anthropic/*"]),
        ("?provider=any", ["gpt-4o"]),
        ("?provider=openai", ["gpt-4o"]),
        ("?provider=litellm", ["text-embedding-3-small"]),
        ("?provider=other", []),
    ],
)
def test_prices_are_searched_by_model_and_filtered_by_provider(admin_client, table, query, models):
    assert [r["model"] for r in rows(admin_client.get(PRICES_URL + query))] == models


def test_a_price_added_in_the_admin_prices_the_next_call(admin_client, credential_factory, plain):
    page = admin_client.get(ADD_PRICE_URL).content.decode()
    assert "Prices a call whose answer carries no cost" in page
    assert "A model name as the calls name it (gpt-4o-mini), or a pattern with *" in page

    response = admin_client.post(
        ADD_PRICE_URL,
        {
            "model": "gpt-test-mini",
            "provider": "",
            "input_usd_per_million": "1000",
            "output_usd_per_million": "2000",
        },
    )

    assert response.status_code == 302
    assert prices.table().price("gpt-test-mini", "litellm") is not None
    chat(credential_factory(title="Says nothing", base_url=plain.base_url), "gpt-test-mini")
    record = UsageRecord.objects.get()
    assert (record.cost_usd, record.cost_source) == (Decimal("0.008"), "price_table")


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"input_usd_per_million": "-1"}, "Ensure this value is greater than or equal to 0."),
        ({"output_usd_per_million": "abc"}, "Enter a number."),
        ({"model": ""}, "This field is required."),
        (
            {"provider": "azure"},
            "Select a valid choice. azure is not one of the available choices.",
        ),
        ({"model": "gpt-4o"}, "Model price with this Model and Provider already exists."),
    ],
)
def test_a_bad_price_is_a_sentence(admin_client, table, overrides, error):
    data = {
        "model": "new-model",
        "provider": "",
        "input_usd_per_million": "1",
        "output_usd_per_million": "2",
        **overrides,
    }

    response = admin_client.post(ADD_PRICE_URL, data)

    assert response.status_code == 200
    assert error in unescape(response.content.decode())
    assert ModelPrice.objects.count() == 4


def test_a_view_only_staff_user_reads_prices_but_cannot_change_them(
    client, django_user_model, table
):
    user = django_user_model.objects.create_user("reader", is_staff=True)
    user.user_permissions.add(
        Permission.objects.get(
            codename="view_modelprice", content_type=ContentType.objects.get_for_model(ModelPrice)
        )
    )
    client.force_login(user)
    price = ModelPrice.objects.get(model="gpt-4o", provider="")

    assert client.get(PRICES_URL).status_code == 200
    assert client.get(ADD_PRICE_URL).status_code == 403
    change = reverse("admin:llm_modelprice_change", args=[price.pk])
    response = client.post(
        change,
        {
            "model": "gpt-4o",
            "provider": "",
            "input_usd_per_million": "0",
            "output_usd_per_million": "0",
        },
    )
    assert response.status_code == 403
    price.refresh_from_db()
    assert price.input_usd_per_million == Decimal("2.5")
