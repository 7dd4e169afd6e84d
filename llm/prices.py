"""What a call cost when its answer does not say: the admin's price table (ModelPrice).

An answer's own cost (LiteLLM's x-litellm-response-cost header, or `usage.cost` in a
streamed answer's last chunk) wins. Without it (direct OpenAI, OpenRouter, a proxy that
sends none for streamed answers), or when it is zero for a call that used tokens (what
LiteLLM sends for a model it has no price for), the price table prices the call:

    cost = prompt tokens * input price / 1M + completion tokens * output price / 1M

The row for the model the answer names is looked up first, then for the model asked
for; for each, an exact name before a `*` pattern (the pattern with the most literal
characters first), and a row for the credential's provider before one for any provider.
A call with tokens that nothing prices has no cost: its usage record says so
(`cost_source` "none", shown as "unpriced"), and the first such call of each model in a
process logs a warning.

The table is kept in every process and reloaded when a price is saved or deleted (the
copies' stamp, platform_site.copies): pricing a call reads no database.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from decimal import Decimal

from llm.models import CostSource, ModelPrice
from platform_site import copies
from platform_site.copies import LocalCopies

log = logging.getLogger(__name__)

MILLION = Decimal(1_000_000)
# Lookups a table keeps (model names come from users: bounded).
MAX_FOUND = 10_000
# Sync code asks whether the table changed at most this often (a cache read each time).
SYNC_CHECK_SECONDS = 1.0
# Costs are kept to the usage column's precision.
CENT_MILLIONTH = Decimal("0.00000001")


@dataclass(frozen=True)
class Price:
    input_per_million: Decimal
    output_per_million: Decimal

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        cost = (
            prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        ) / MILLION
        return cost.quantize(CENT_MILLIONTH)


class PriceTable:
    """The admin's prices, ready to look up: `price(model, provider)`."""

    def __init__(self, rows: list[ModelPrice]) -> None:
        self.exact: dict[tuple[str, str], Price] = {}
        patterns: list[tuple[int, str, re.Pattern[str], Price]] = []
        for row in rows:
            price = Price(row.input_usd_per_million, row.output_usd_per_million)
            if "*" in row.model:
                parts = row.model.split("*")
                regex = re.compile(".*".join(map(re.escape, parts)))
                patterns.append((len(row.model) - len(parts) + 1, row.provider, regex, price))
            else:
                self.exact[row.model, row.provider] = price
        # Most literal characters first; a provider's row before any provider's.
        patterns.sort(key=lambda p: (-p[0], p[1] == ""))
        self.patterns = [(provider, regex, price) for _, provider, regex, price in patterns]
        self._found: dict[tuple[str, str | None], Price | None] = {}

    def __len__(self) -> int:
        return len(self.exact) + len(self.patterns)

    def price(self, model: str, provider: str | None) -> Price | None:
        """The price of `model` for a credential of `provider` (kept once looked up)."""
        key = (model, provider)
        if key not in self._found:
            if len(self._found) > MAX_FOUND:
                self._found.clear()
            self._found[key] = self._look_up(model, provider)
        return self._found[key]

    def _look_up(self, model: str, provider: str | None) -> Price | None:
        providers = (provider, "") if provider else ("",)
        for name in providers:
            if (found := self.exact.get((model, name))) is not None:
                return found
        for row_provider, regex, price in self.patterns:
            if row_provider in providers and regex.fullmatch(model):
                return price
        return None


def _load(_: str) -> PriceTable:
    return PriceTable(list(ModelPrice.objects.all()))


_tables: LocalCopies[str, PriceTable] = LocalCopies("prices", _load)
_warned: set[str] = set()


_sync_table: tuple[float, PriceTable] | None = None


def table() -> PriceTable:
    """The table, for sync code: a change reaches it within SYNC_CHECK_SECONDS."""
    global _sync_table
    now = time.monotonic()
    if _sync_table is None or now - _sync_table[0] >= SYNC_CHECK_SECONDS:
        _sync_table = (now, _tables.get("all") or PriceTable([]))
    return _sync_table[1]


def changed() -> None:
    """Prices were saved or deleted: every worker reloads its table (the copies' stamp),
    this process at once, sync code included."""
    copies.bump()
    forget()


def forget() -> None:
    """Sync code in this process reads the table again at its next call."""
    global _sync_table
    _sync_table = None


async def atable() -> PriceTable:
    return await _tables.aget("all") or PriceTable([])


def answered(cost: float | None, tokens: tuple[int, int]) -> bool:
    """Whether the answer's own `cost` is usable: present, and not zero for a call that
    used tokens. `tokens`: (prompt, completion)."""
    return cost is not None and (cost > 0 or not any(tokens))


def cost_of(
    prices: PriceTable, *, models: tuple[str, str], provider: str | None, tokens: tuple[int, int]
) -> tuple[float | None, CostSource]:
    """A call's cost in USD from the price table, and where it came from (none: unpriced).

    `models`: the model the answer names and the one asked for; `tokens`: (prompt,
    completion).
    """
    for model in dict.fromkeys(name for name in models if name):
        price = prices.price(model, provider)
        if price is not None:
            return float(price.cost(*tokens)), CostSource.PRICE_TABLE
    if any(tokens):
        unpriced(models[0] or models[1])
    return None, CostSource.NONE


def unpriced(model: str) -> None:
    if model in _warned:
        return
    _warned.add(model)
    log.warning(
        "Calls of the model %r have no cost: the answer carries none and the price table "
        "has no row for it. Add its price in the admin (Model prices), or import a price "
        "map: manage.py import_model_prices PATH.",
        model,
    )
