"""Spend control for the benchmarks: what bench/routing.py and bench/concurrency.py
configure to measure its cost, and upstreams whose answers carry a cost.

Both benchmarks run the credential path with spend control configured next to the same
path without it, in one run: a credential with an allow-list (exact names and a `*`
pattern, the call's model matched by the pattern), a monthly budget and a monthly cap
per user, and the four rate limits, all far too high to refuse (`SPEND_CONTROL`). Its
answers carry a cost (`x-litellm-response-cost`, as LiteLLM sends): the cost is charged
as it is. A third path has the same limits but answers without a cost, so the price
table prices every call (`add_price_table`: an imported price map's worth of exact rows
and patterns, the call's model matched by the pattern scanned last).

    python bench/limits.py fast PORT          bench/fast_upstream.py's answer, with a cost
    python bench/limits.py slow PORT DELAY    tests/upstream.py (answers after DELAY s), with a cost
"""

from __future__ import annotations

import asyncio
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent

COST = "0.00002"  # USD an answer, in the header: 2,000 of limits' units
BIG = 10**9  # requests or tokens per minute: never reached
SPEND_CONTROL: dict[str, Any] = {
    "allowed_models": ["gpt-4o", "gpt-4o-mini", "gpt-test-*"],
    "monthly_budget_usd": Decimal("100000"),  # the column's largest round figure
    "user_monthly_budget_usd": Decimal("100000"),
    "requests_per_minute": BIG,
    "tokens_per_minute": BIG,
    "user_requests_per_minute": BIG,
    "user_tokens_per_minute": BIG,
}
# The price rows: many exact names (what import_model_prices stores) and patterns with
# more literal characters than the one that prices the call, so all are tried first.
EXACT_PRICES = 1000
OTHER_PATTERNS = 19
PRICED_BY = "gpt-test-*"


def describe() -> str:
    shown = ", ".join(f"{name}={value}" for name, value in SPEND_CONTROL.items())
    return f"spend control: {shown}"


def add_price_table() -> list[int]:
    """The price rows (bulk, then every process's table is reloaded); returns their ids."""
    from llm.models import ModelPrice
    from platform_site import copies

    rows = [
        ModelPrice(
            model=f"bench-exact-model-{n:04d}",
            input_usd_per_million=Decimal("0.15"),
            output_usd_per_million=Decimal("0.60"),
        )
        for n in range(EXACT_PRICES)
    ]
    rows += [
        ModelPrice(
            model=f"bench-provider-{n:02d}/family-*",
            input_usd_per_million=Decimal("1"),
            output_usd_per_million=Decimal("2"),
        )
        for n in range(OTHER_PATTERNS)
    ]
    rows.append(
        ModelPrice(
            model=PRICED_BY,
            input_usd_per_million=Decimal("2.50"),
            output_usd_per_million=Decimal("10.00"),
        )
    )
    made = ModelPrice.objects.bulk_create(rows)
    copies.bump()
    return [row.pk for row in made]


def price_table_text() -> str:
    return (
        f"price table: {EXACT_PRICES} exact rows, {OTHER_PATTERNS + 1} patterns; "
        f"the call is priced by {PRICED_BY!r}, the last pattern tried"
    )


def remove_price_table(ids: list[int]) -> None:
    from llm.models import ModelPrice

    ModelPrice.objects.filter(pk__in=ids).delete()


def spent(credential_id: Any) -> tuple[Decimal | None, Decimal]:
    """A credential's spend counter this month (None: not readable from this process, as
    with a local-memory cache in another process) and the sum of its usage records."""
    from django.db.models import Sum
    from django.utils import timezone

    from llm import limits
    from llm.models import UsageRecord

    store = limits.counters()
    key = limits.spend_key(limits.month_of(timezone.now())[0], credential_id)
    counter = store.get(key)
    records = UsageRecord.objects.filter(credential_id=credential_id).aggregate(
        cost=Sum("cost_usd")
    )["cost"]
    # SQLite sums the decimals as floats: back to the column's precision.
    total = Decimal(records or 0).quantize(limits.UNIT)
    return (None if counter is None else limits.usd(counter)), total


def forget_counters(credential_ids: list[Any]) -> int:
    """Delete the counters of these credentials from Redis (they would live 40 days)."""
    from django.core.cache import caches
    from django.core.cache.backends.redis import RedisCache

    backend = caches["default"]
    if not isinstance(backend, RedisCache):
        return 0
    client = backend._cache.get_client(write=True)  # type: ignore[attr-defined]
    keys = [key for cid in credential_ids for key in client.scan_iter(match=f"*{cid.hex}*")]
    return int(client.delete(*keys)) if keys else 0


def cache_text() -> str:
    from django.conf import settings

    config: dict[str, Any] = settings.CACHES["default"]
    backend = str(config["BACKEND"]).rsplit(".", 1)[-1]
    where = config.get("LOCATION") or ""
    if "Redis" in backend:
        flush = settings.LLM_CHARGE_FLUSH_SECONDS
        charges = f"charges batched every {flush:g} s" if flush else "each call sends its charge"
        return f"{backend} {where} (counters shared: admit is a Lua script a call; {charges})"
    return f"{backend} (counters in the process's memory)"


# ---- upstreams with a cost ---------------------------------------------------------------


def serve_fast(port: int) -> None:
    """bench/fast_upstream.py, its canned answer with the cost header."""
    sys.path.insert(0, str(PROJECT / "bench"))
    import fast_upstream

    body = fast_upstream.COMPLETION
    fast_upstream.RESPONSE = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"x-litellm-response-cost: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (COST.encode(), len(body), body)
    )
    asyncio.run(fast_upstream.serve(port))


def serve_slow(port: int, delay: float) -> None:
    """tests/upstream.py as `python -m tests.upstream` runs it, with the cost header."""
    sys.path.insert(0, str(PROJECT))
    from aiohttp import web

    from tests.upstream import Upstream, _NotKept

    upstream = Upstream(cost=COST)
    upstream.respond(delay=delay)
    upstream.requests = _NotKept()
    web.run_app(
        upstream.app(), host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096
    )


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "fast":
        serve_fast(int(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "slow":
        serve_slow(int(sys.argv[2]), float(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
