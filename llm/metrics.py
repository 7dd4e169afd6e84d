"""Prometheus metrics at /metrics: the calls, failovers, breakers, client cache and usage buffer.

Every name starts with `keyroute_`. No label holds a key, a user, a prompt or a
credential's title; the cost counter alone names a credential, by its id. Hosts are
host[:port] as configured, so each label takes a bounded set of values.

The hooks (`record_call`, `record_failover`, `breaker_changed`, `client_cache`,
`usage_buffer`) sit on every call's path, on the event loop and in threads. Each is a
few dictionary lookups and locked additions in memory (a memory-mapped file in
multiprocess mode): no network, no waiting. None raises: a metrics bug must not fail a
call, so a hook's first failure is logged with its traceback and the call goes on.

Several workers (`uvicorn --workers N`, as `make serve` runs): each worker is a process
with counters of its own, and a scrape reaches whichever worker accepts it. With
PROMETHEUS_MULTIPROC_DIR set, prometheus_client keeps each process's values in files
named after its pid in that folder, and /metrics adds up the files of every process
(`MultiProcessCollector`): each scrape gives the whole site's totals, whichever worker
answers. The folder must be emptied before the site starts (`make serve` does), or the
last run's counters are added in; it is created here if missing.

Dead workers: uvicorn's supervisor starts a new worker when one dies, but has no hook
to run on a child's exit, which is where prometheus_client expects
`mark_process_dead(pid)`. Instead each worker, at import and at every scrape, reads the
pids the files are named after and marks those whose process is gone
(`forget_dead_workers`). That deletes their live gauges (a dead worker holds no clients
and no buffered records), while their counter and histogram files stay: totals do not
drop when a worker dies. A dead worker's pid given meanwhile to another process looks
alive, and its gauges stay until that process ends too.

How gauges combine across live workers: the client-cache size and the usage-buffer
depth add up (`livesum`). Each worker has its own view of each breaker (llm/breaker.py)
and reports its changes; `keyroute_breaker_state` shows the highest among live workers
(`livemax`): 2 while any worker keeps calls away from the host, 0 once all send to it.

Without PROMETHEUS_MULTIPROC_DIR (`make run`, the tests), a process counts alone, in
prometheus_client's default registry, with its process_* and python_* metrics.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import math
import os
from typing import Generic, TypeVar

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET

log = logging.getLogger(__name__)


def _prepare_folder() -> str:
    """The multiprocess folder, created if missing; "" when each process counts alone.

    prometheus_client chooses its mode from the environment when first imported, and
    takes PROMETHEUS_MULTIPROC_DIR set to "" as set. The setting (which also reads .env
    and counts empty as unset) decides, and the environment is made to agree before the
    import below.
    """
    folder: str = settings.PROMETHEUS_MULTIPROC_DIR
    if folder:
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as error:
            log.error(
                "PROMETHEUS_MULTIPROC_DIR=%s cannot be created or written (%s): /metrics "
                "shows only the worker that answers it.",
                folder,
                error.strerror or error,
            )
            folder = ""
    if folder:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    else:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return folder


MULTIPROC_DIR = _prepare_folder()

from prometheus_client import (  # noqa: E402 (after the environment is set)
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics import MetricWrapperBase  # noqa: E402

if bool(getattr(values.ValueClass, "_multiprocess", False)) != bool(MULTIPROC_DIR):
    # Imported earlier, under another environment: choose again, before any metric exists.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]

# ---- the metrics -----------------------------------------------------------------------

REQUESTS = Counter(
    "keyroute_llm_requests",
    "LLM calls by purpose, route source, host and outcome (ok, or the error's class).",
    ["purpose", "source", "host", "outcome"],
)
LATENCY = Histogram(
    "keyroute_llm_request_seconds",
    "Time from the start of an LLM call to its end, by purpose and host.",
    ["purpose", "host"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
TOKENS = Counter(
    "keyroute_llm_tokens",
    "Tokens the upstream reported, by kind (prompt, completion) and purpose.",
    ["kind", "purpose"],
)
COST = Counter(
    "keyroute_llm_cost_usd",
    "Cost in USD of the calls (the upstream's, else the price table's), by the id of the "
    "credential that paid (none: the global default).",
    ["credential"],
)
FAILOVERS = Counter(
    "keyroute_llm_failovers",
    "Calls served by another route because theirs was down, by from and to host.",
    ["from_host", "to_host"],
)
BREAKER_STATE = Gauge(
    "keyroute_breaker_state",
    "Circuit breaker per host: 0 closed, 1 half-open, 2 open (highest among live workers).",
    ["host"],
    multiprocess_mode="livemax",
)
BREAKER_TRANSITIONS = Counter(
    "keyroute_breaker_transitions",
    "Circuit breaker changes of state, by host and the state it went to.",
    ["host", "to"],
)
CLIENT_CACHE_SIZE = Gauge(
    "keyroute_client_cache_size",
    "OpenAI clients held for reuse (all live workers).",
    multiprocess_mode="livesum",
)
CLIENT_CACHE_EVICTIONS = Counter(
    "keyroute_client_cache_evictions",
    "Cached clients closed to make room (LLM_CLIENT_CACHE_SIZE).",
)
USAGE_BUFFER_DEPTH = Gauge(
    "keyroute_usage_buffer_depth",
    "Usage records waiting to be written (all live workers).",
    multiprocess_mode="livesum",
)
USAGE_RECORDS_DROPPED = Counter(
    "keyroute_usage_records_dropped",
    "Usage records dropped, oldest first, because the buffer was full (LLM_USAGE_BUFFER_SIZE).",
)
USAGE_RECORDS_UNSTORABLE = Counter(
    "keyroute_usage_records_unstorable",
    "Usage records dropped because the database refused them, by the error's class "
    "(the rest of their batch was written; the log says which record and why).",
    ["reason"],
)

# Spend control (llm.limits). The spend gauges show the shared counters as the worker
# that last charged a call (or reconciled) saw them: the most recent value wins.
CREDENTIAL_SPEND = Gauge(
    "keyroute_credential_spend_usd",
    "Spend this calendar month (UTC) of each credential with a budget, by credential id.",
    ["credential"],
    multiprocess_mode="mostrecent",
)
CREDENTIAL_BUDGET_REMAINING = Gauge(
    "keyroute_credential_budget_remaining_usd",
    "What is left this month of each credential's monthly budget, by credential id.",
    ["credential"],
    multiprocess_mode="mostrecent",
)
BUDGET_WARNINGS = Counter(
    "keyroute_budget_warnings",
    "Spend crossed LLM_BUDGET_WARNING_PERCENT of a budget, by credential id and whose "
    "budget (credential, or a user's cap on it).",
    ["credential", "budget"],
)
LIMIT_REFUSALS = Counter(
    "keyroute_limit_refusals",
    "Calls refused before they were sent, by limit (model, budget, tokens, requests).",
    ["limit"],
)
LIMITS_UNSHARED = Counter(
    "keyroute_limits_unshared",
    "Limit checks counted by this process alone because the shared cache did not answer.",
)

BREAKER_LEVELS = {"closed": 0, "half-open": 1, "open": 2}

M = TypeVar("M", bound=MetricWrapperBase)


class _Children(Generic[M]):
    """A labelled metric's children by label values.

    One dictionary lookup per use instead of `labels()`, which checks its arguments and
    takes a lock every time. Threads racing on a new child get the same one from
    `labels()`, and storing it in the dictionary is atomic.
    """

    __slots__ = ("children", "metric")

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = self.metric.labels(*labels)
        return child


_requests = _Children(REQUESTS)
_latency = _Children(LATENCY)
_tokens = _Children(TOKENS)
_cost = _Children(COST)
_failovers = _Children(FAILOVERS)
_breaker_state = _Children(BREAKER_STATE)
_breaker_transitions = _Children(BREAKER_TRANSITIONS)

_failed_hooks: set[str] = set()


def _failed(hook: str) -> None:
    """Log a hook's first failure, with its traceback; repeating it would flood the log."""
    if hook not in _failed_hooks:
        _failed_hooks.add(hook)
        log.exception("Metrics: %s failed (the call goes on; this metric may be off).", hook)


# ---- the hooks -------------------------------------------------------------------------


def record_call(
    *,
    purpose: str,
    source: str,
    host: str,
    outcome: str,
    latency_seconds: float,
    prompt_tokens: int,
    completion_tokens: int,
    cost_usd: float | None,
    credential_id: str | None,
) -> None:
    """One finished call, whatever its outcome: counted, timed, its tokens and cost added."""
    try:
        _requests(purpose, source, host, outcome).inc()
        _latency(purpose, host).observe(latency_seconds)
        if prompt_tokens > 0:
            _tokens("prompt", purpose).inc(prompt_tokens)
        if completion_tokens > 0:
            _tokens("completion", purpose).inc(completion_tokens)
        # NaN, infinite or negative costs would spoil the counter for good.
        if cost_usd is not None and 0 <= cost_usd < math.inf:
            _cost(str(credential_id) if credential_id else "none").inc(cost_usd)
    except Exception:
        _failed("record_call")


def record_failover(*, from_host: str, to_host: str) -> None:
    """A call served by `to_host` because `from_host` was down."""
    try:
        _failovers(from_host, to_host).inc()
    except Exception:
        _failed("record_failover")


def breaker_changed(*, host: str, state: str) -> None:
    """This process's breaker for `host` is now `state` (closed, half-open or open)."""
    try:
        _breaker_state(host).set(BREAKER_LEVELS[state])
        _breaker_transitions(host, state).inc()
    except Exception:
        _failed("breaker_changed")


def client_cache(*, size: int, evicted: int = 0) -> None:
    """The client cache now holds `size` clients, after closing `evicted` of them."""
    try:
        CLIENT_CACHE_SIZE.set(size)
        if evicted > 0:
            CLIENT_CACHE_EVICTIONS.inc(evicted)
    except Exception:
        _failed("client_cache")


def usage_buffer(*, depth: int, dropped: int = 0) -> None:
    """`depth` usage records wait to be written, after dropping `dropped` of them."""
    try:
        USAGE_BUFFER_DEPTH.set(depth)
        if dropped > 0:
            USAGE_RECORDS_DROPPED.inc(dropped)
    except Exception:
        _failed("usage_buffer")


def usage_unstorable(*, reason: str) -> None:
    """A usage record was dropped: the database refused it with an error of class `reason`."""
    try:
        USAGE_RECORDS_UNSTORABLE.labels(reason).inc()
    except Exception:
        _failed("usage_unstorable")


def credential_spend(*, credential_id: str, spent: float, budget: float | None) -> None:
    """A credential's spend this month is `spent` (of `budget`, if it has one)."""
    try:
        CREDENTIAL_SPEND.labels(credential_id).set(spent)
        if budget is not None:
            CREDENTIAL_BUDGET_REMAINING.labels(credential_id).set(max(0.0, budget - spent))
    except Exception:
        _failed("credential_spend")


def budget_warning(*, credential_id: str, per_user: bool) -> None:
    try:
        BUDGET_WARNINGS.labels(credential_id, "user" if per_user else "credential").inc()
    except Exception:
        _failed("budget_warning")


def limit_refused(*, kind: str) -> None:
    try:
        LIMIT_REFUSALS.labels(kind).inc()
    except Exception:
        _failed("limit_refused")


def limits_unshared() -> None:
    try:
        LIMITS_UNSHARED.inc()
    except Exception:
        _failed("limits_unshared")


# ---- dead workers ----------------------------------------------------------------------


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def forget_dead_workers(folder: str = MULTIPROC_DIR) -> list[int]:
    """Mark the processes that left files in `folder` but no longer run as dead.

    Their live gauges go; their counters stay (see the module's docstring). Returns the
    pids marked.
    """
    pids = set()
    for name in os.listdir(folder):
        stem, _, extension = name.rpartition(".")
        number = stem.rpartition("_")[2]  # counter_123.db, gauge_livesum_123.db
        if extension == "db" and number.isdigit():
            pids.add(int(number))
    dead = sorted(pid for pid in pids if not _running(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
    return dead


if MULTIPROC_DIR:
    try:
        forget_dead_workers()
    except OSError as error:
        log.error("Metrics: cannot read PROMETHEUS_MULTIPROC_DIR (%s).", error)


# ---- the view --------------------------------------------------------------------------

REFUSED = (
    "Metrics are not public. Scrape from an address in METRICS_ALLOWED_IPS, or set "
    "METRICS_TOKEN and send it as 'Authorization: Bearer <token>'.\n"
)
UNREADABLE = "The metrics files in PROMETHEUS_MULTIPROC_DIR cannot be read: see the log.\n"


@functools.lru_cache(maxsize=8)
def _networks(
    allowed: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for entry in allowed:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            log.warning("METRICS_ALLOWED_IPS: %r is not an address or a network.", entry)
    return tuple(networks)


def _from_allowed_address(request: HttpRequest) -> bool:
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 from a dual-stack socket
    networks = _networks(tuple(settings.METRICS_ALLOWED_IPS))
    return any(address in network for network in networks)


def _with_token(request: HttpRequest) -> bool:
    token: str = settings.METRICS_TOKEN
    if not token:
        return False
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The metrics, for Prometheus: from METRICS_ALLOWED_IPS or with METRICS_TOKEN."""
    if not (_from_allowed_address(request) or _with_token(request)):
        return HttpResponse(REFUSED, status=403, content_type="text/plain; charset=utf-8")
    if not MULTIPROC_DIR:
        return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
    try:
        forget_dead_workers()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=MULTIPROC_DIR)  # type: ignore[no-untyped-call]
        output = generate_latest(registry)
    except (OSError, ValueError):  # the folder was removed or a file is damaged
        log.exception("Metrics: the files in PROMETHEUS_MULTIPROC_DIR cannot be read.")
        return HttpResponse(UNREADABLE, status=503, content_type="text/plain; charset=utf-8")
    return HttpResponse(output, content_type=CONTENT_TYPE_LATEST)
