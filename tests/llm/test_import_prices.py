"""manage.py import_model_prices: LiteLLM's price map into the admin's price table."""

from __future__ import annotations

import importlib.util
import io
import json
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from llm import prices
from llm.models import ModelPrice
from tests.litellm.proxy import PINS, _cache_dir

# The shape of LiteLLM's model_prices_and_context_window.json, with its own values.
PRICE_MAP = {
    "sample_spec": {
        "max_tokens": "LEGACY parameter. set to max_output_tokens if provider specifies it.",
        "input_cost_per_token": 0.0,
        "output_cost_per_token": 0.0,
        "litellm_provider": "one of https://docs.litellm.ai/docs/providers",
        "mode": "one of: chat, embedding, completion, image_generation, ...",
    },
    "gpt-4o": {
        "input_cost_per_token": 2.5e-06,
        "output_cost_per_token": 1e-05,
        "litellm_provider": "openai",
        "mode": "chat",
    },
    "gpt-4o-mini": {
        "input_cost_per_token": 1.5e-07,
        "output_cost_per_token": 6e-07,
        "litellm_provider": "openai",
        "mode": "chat",
    },
    "text-embedding-3-small": {
        "input_cost_per_token": 2e-08,
        "litellm_provider": "openai",
        "mode": "embedding",
    },
    "openrouter/anthropic/claude-3.5-sonnet": {
        "input_cost_per_token": 3e-06,
        "output_cost_per_token": 1.5e-05,
        "litellm_provider": "openrouter",
        "mode": "chat",
    },
    "dall-e-3": {"input_cost_per_pixel": 4.0054321e-08, "litellm_provider": "openai"},
    "whisper-1": {"input_cost_per_second": 0.0001, "litellm_provider": "openai"},
    "odd-output-only": {"output_cost_per_token": 1e-06, "litellm_provider": "openai"},
    "odd-negative": {"input_cost_per_token": -1e-06, "output_cost_per_token": 1e-06},
    "odd-text": {"input_cost_per_token": "0.000001", "output_cost_per_token": 1e-06},
}


def write(tmp_path: Path, data: object, name: str = "prices.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("import_model_prices", *args, stdout=out)
    return out.getvalue().strip()


def table() -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
    return {
        (row.model, row.provider): (row.input_usd_per_million, row.output_usd_per_million)
        for row in ModelPrice.objects.all()
    }


@pytest.mark.django_db
def test_it_imports_per_token_prices_as_exact_prices_per_million(tmp_path):
    output = run(str(write(tmp_path, PRICE_MAP)))

    assert output == (
        "Imported 4 prices (4 new, 0 updated); skipped 5 entries without per-token prices."
    )
    assert table() == {
        ("gpt-4o", ""): (Decimal("2.5"), Decimal("10")),
        ("gpt-4o-mini", ""): (Decimal("0.15"), Decimal("0.6")),
        ("text-embedding-3-small", ""): (Decimal("0.02"), Decimal("0")),
        ("anthropic/claude-3.5-sonnet", "openrouter"): (Decimal("3"), Decimal("15")),
    }
    mini = ModelPrice.objects.get(model="gpt-4o-mini")
    assert str(mini.input_usd_per_million) == "0.150000"  # no float noise (0.15000000000000002)


@pytest.mark.django_db
def test_importing_again_updates_the_rows_and_counts_them(tmp_path):
    ModelPrice.objects.create(
        model="gpt-4o", provider="", input_usd_per_million=1, output_usd_per_million=1
    )
    ModelPrice.objects.create(
        model="my-own", provider="", input_usd_per_million=7, output_usd_per_million=7
    )

    output = run(str(write(tmp_path, PRICE_MAP)))

    assert output.startswith("Imported 4 prices (3 new, 1 updated);")
    assert table()["gpt-4o", ""] == (Decimal("2.5"), Decimal("10"))
    assert table()["my-own", ""] == (Decimal(7), Decimal(7))  # rows it does not name stay
    assert run(str(write(tmp_path, PRICE_MAP))).startswith("Imported 4 prices (0 new, 4 updated);")
    assert ModelPrice.objects.count() == 5


@pytest.mark.django_db
def test_a_provider_given_applies_to_every_row(tmp_path):
    output = run(str(write(tmp_path, PRICE_MAP)), "--provider", "litellm")

    assert output.startswith("Imported 4 prices (4 new, 0 updated);")
    assert set(table()) == {
        ("gpt-4o", "litellm"),
        ("gpt-4o-mini", "litellm"),
        ("text-embedding-3-small", "litellm"),
        ("openrouter/anthropic/claude-3.5-sonnet", "litellm"),
    }


@pytest.mark.django_db
def test_openrouter_as_the_provider_drops_the_prefix_and_keeps_the_first_of_two(tmp_path):
    clash = {
        "anthropic/claude-3.5-sonnet": {"input_cost_per_token": 1e-06},
        **PRICE_MAP,
    }

    output = run(str(write(tmp_path, clash)), "--provider", "openrouter")

    assert output.startswith("Imported 4 prices (4 new, 0 updated);")
    assert table()["anthropic/claude-3.5-sonnet", "openrouter"] == (Decimal(1), Decimal(0))


@pytest.mark.django_db
def test_every_worker_prices_with_the_imported_table(tmp_path, private_cache):
    assert prices.table().price("gpt-4o", "litellm") is None

    run(str(write(tmp_path, PRICE_MAP)))

    price = prices.table().price("gpt-4o", "litellm")
    assert price is not None
    assert price.cost(1000, 100) == Decimal("0.0035")


@pytest.mark.django_db
def test_an_unknown_provider_is_refused():
    with pytest.raises(CommandError, match="invalid choice: 'azure'"):
        run("prices.json", "--provider", "azure")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist."),
        ("{not json", "is not JSON (Expecting property name enclosed in double quotes at line 1"),
        ("[1, 2]", "holds a JSON array, not an object of models: expected LiteLLM's"),
        ('"text"', "holds a JSON string, not an object of models"),
        ("null", "holds a JSON null, not an object of models"),
    ],
)
def test_a_file_that_is_no_price_map_is_a_sentence(tmp_path, content, message):
    path = tmp_path / "prices.json"
    if content is not None:
        path.write_text(content)

    with pytest.raises(CommandError) as raised:
        run(str(path))

    assert str(raised.value).startswith(str(path))
    assert message in str(raised.value)
    assert ModelPrice.objects.count() == 0


@pytest.mark.django_db
def test_a_directory_is_a_sentence(tmp_path):
    with pytest.raises(CommandError, match="is a directory, not LiteLLM's price map"):
        run(str(tmp_path))


def bundled_price_map() -> Path | None:
    """The price map the litellm package bundles: in this environment, or in the LiteLLM
    proxy's environment the tests build (tests/litellm/proxy.py)."""
    name = "model_prices_and_context_window_backup.json"
    spec = importlib.util.find_spec("litellm")
    if spec is not None and spec.origin:
        here = Path(spec.origin).parent / name
        if here.exists():
            return here
    found = sorted(_cache_dir(PINS).glob(f"lib/python*/site-packages/litellm/{name}"))
    return found[0] if found else None


@pytest.mark.django_db
def test_it_imports_the_price_map_litellm_bundles():
    path = bundled_price_map()
    if path is None:
        pytest.skip("litellm is not installed here (requirements-litellm.txt builds it)")
    entries = json.loads(path.read_text())

    output = run(str(path))

    imported = ModelPrice.objects.count()
    assert output.startswith(f"Imported {imported} prices ({imported} new, 0 updated);")
    assert imported > 500
    gpt = ModelPrice.objects.get(model="gpt-4o-mini", provider="")
    expected = Decimal(str(entries["gpt-4o-mini"]["input_cost_per_token"])) * 1_000_000
    assert gpt.input_usd_per_million == expected
    prefixed = ModelPrice.objects.filter(provider="openrouter", model__startswith="openrouter/")
    assert not prefixed.exists()
