"""manage.py import_model_prices PATH [--provider P]: LiteLLM's price map into the price table.

PATH is LiteLLM's `model_prices_and_context_window.json` (or the backup copy its package
bundles): {"model": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
"litellm_provider": "openai", ...}, "sample_spec": {...}}.

- An entry needs a per-token input cost; a missing output cost counts as 0 (embeddings
  and rerankers price only their input). Entries priced otherwise (per image, second or
  character), "sample_spec", and costs that are no number from 0 up are skipped.
- USD per token becomes USD per million tokens exactly (the JSON's decimal text times
  1,000,000, no float noise), to the column's 6 decimal places.
- Without --provider, a row applies to any provider, but OpenRouter's entries
  ("openrouter/openai/gpt-4o") are stored as OpenRouter's API names the model
  ("openai/gpt-4o"), for OpenRouter credentials only. --provider P sets P on every row
  (the prefix is still dropped when P is openrouter).
- One transaction: a row per (model, provider), inserted or updated in bulk; the first
  entry wins when two give the same row. Every worker reloads its prices afterwards.
"""

from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from credentials.models import Provider
from llm import prices
from llm.models import ModelPrice

MILLION = Decimal(1_000_000)
PLACES = Decimal("0.000001")  # the price columns' precision
# The price columns hold at most 14 digits, 6 of them decimals.
TOO_DEAR = Decimal(10) ** 8
NAME_LENGTH = ModelPrice._meta.get_field("model").max_length or 200
OPENROUTER_PREFIX = "openrouter/"
JSON_TYPES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def per_million(value: Any) -> Decimal | None:
    """USD per token (a JSON number) as USD per million tokens; None: not a price."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        price = (Decimal(str(value)) * MILLION).quantize(PLACES, rounding=ROUND_HALF_UP)
    except InvalidOperation:
        return None
    return price if 0 <= price < TOO_DEAR else None


def row_of(name: str, entry: Any, provider: str | None) -> tuple[str, str, Decimal, Decimal] | None:
    """(model, provider, input, output) of one entry of the map; None: skipped."""
    if name == "sample_spec" or not isinstance(entry, dict):
        return None
    price_in = per_million(entry.get("input_cost_per_token"))
    output = entry.get("output_cost_per_token", 0)
    price_out = per_million(output if output is not None else 0)
    if price_in is None or price_out is None:
        return None
    if provider is None:
        openrouter = entry.get("litellm_provider") == Provider.OPENROUTER
        provider = Provider.OPENROUTER.value if openrouter else ""
    model = name
    if provider == Provider.OPENROUTER and model.startswith(OPENROUTER_PREFIX):
        model = model.removeprefix(OPENROUTER_PREFIX)
    model = model.strip()
    if not model or len(model) > NAME_LENGTH:
        return None
    return model, provider, price_in, price_out


class Command(BaseCommand):
    help = "Import model prices from LiteLLM's model_prices_and_context_window.json."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", help="LiteLLM's model_prices_and_context_window.json")
        parser.add_argument(
            "--provider",
            choices=Provider.values,
            help="The provider of every row (default: any provider; OpenRouter's own "
            "entries for OpenRouter).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        price_map = self.read(Path(options["path"]))
        rows: dict[tuple[str, str], ModelPrice] = {}
        skipped = 0
        for name, entry in price_map.items():
            row = row_of(name, entry, options["provider"])
            if row is None:
                skipped += name != "sample_spec"
                continue
            model, provider, price_in, price_out = row
            rows.setdefault(
                (model, provider),
                ModelPrice(
                    model=model,
                    provider=provider,
                    input_usd_per_million=price_in,
                    output_usd_per_million=price_out,
                ),
            )
        with transaction.atomic():
            existing = set(ModelPrice.objects.values_list("model", "provider"))
            ModelPrice.objects.bulk_create(
                list(rows.values()),
                batch_size=500,
                update_conflicts=True,
                unique_fields=["model", "provider"],
                update_fields=["input_usd_per_million", "output_usd_per_million", "updated_at"],
            )
            prices.changed()  # bulk writes send no signal
        updated = len(existing & rows.keys())
        self.stdout.write(
            f"Imported {len(rows)} prices ({len(rows) - updated} new, {updated} updated); "
            f"skipped {skipped} entries without per-token prices."
        )

    def read(self, path: Path) -> dict[str, Any]:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CommandError(f"{path} does not exist.") from None
        except IsADirectoryError:
            raise CommandError(f"{path} is a directory, not LiteLLM's price map.") from None
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"Could not read {path}: {error}.") from None
        try:
            prices = json.loads(text)
        except json.JSONDecodeError as error:
            raise CommandError(
                f"{path} is not JSON ({error.msg} at line {error.lineno}, column "
                f"{error.colno}): expected LiteLLM's model_prices_and_context_window.json."
            ) from None
        if not isinstance(prices, dict):
            raise CommandError(
                f"{path} holds a JSON {JSON_TYPES.get(type(prices), 'value')}, not an object "
                "of models: "
                "expected LiteLLM's model_prices_and_context_window.json."
            )
        return prices
