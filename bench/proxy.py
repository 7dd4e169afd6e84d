"""Keyroute through the real LiteLLM Proxy: what llm.services adds to a proxied call.

    python bench/proxy.py [--calls 150] [--rounds 8] [--in-flight 100]
                          [--in-flight-calls 400]

Starts, each in its own process on 127.0.0.1: bench/fast_upstream.py (a canned chat
completion with usage, as fast as this machine can answer) and the real LiteLLM Proxy
(tests/litellm/proxy.py: litellm from its cached environment, deploy/litellm/config.yaml)
forwarding to it. The same chat call (model CHAT_MODEL, the proxy's virtual key KEY_B,
one short message, no other option) is made three ways:

(u) a reused direct client straight to the upstream, no proxy: for context only;
(a) the same reused direct client, through the proxy;
(b) llm.services.chat (sequential) / llm.services.achat (in flight) through the proxy,
    with a credential whose base_url is the proxy and api_key KEY_B, for the platform
    (user=PLATFORM): a fresh model instance per call (as a query loads it: the key still
    encrypted), the route, decryption (memoized), the cached client and its lease, the
    circuit breaker (on, the default), the metrics and the usage record (buffered:
    LLM_USAGE_FLUSH_SECONDS as by default).

The direct clients are built as llm/clients.py builds the project's own: openai.OpenAI on
openai.DefaultHttpx2Client (sequential) and openai.AsyncOpenAI on
openai.DefaultAioHttpClient (in flight: the aiohttp transport the site's async calls
use), with the same HTTP options (shared SSL context, timeouts, no redirects, no
environment proxies) and no retries (max_retries=0; LLM_MAX_RETRIES=0 for (b)).

The sequential rounds come first (--calls calls a path a round, one after another: the
sync clients), then the in-flight rounds (--in-flight-calls calls a path a round,
--in-flight at a time, on one uvloop event loop: the async clients). In each round (u)
goes first, then (a) and (b), (b) first every other round: sequentially in blocks of 10
calls, ABBA (a b b a a b ...); in flight one block each (a b, then b a, ...). So the
proxy's slow and fast stretches fall on both alike. In flight, a pool sits idle either
for (u)'s block alone or for two blocks of the other path (over 10 s with the default
400 calls; keep a block over 5 s): pooled connections idle for 3.5-5 s meet the proxy's
keep-alive timeout (uvicorn's 5 s) while its loop is busy, and calls sent on them fail
(docs/performance.md). Each mode has its warm-up (in flight: one unmeasured round). The
usage records an in-flight (b) block leaves in the buffer are written at its end, after
its last call (its CPU, not its latency, and not the next block's); the CPU of the
background threads (the usage flusher, the breaker's refresh: only (b) starts them) is
charged to (b).

Prints per path the median round of: the mean and median latency of a call (in flight
also the throughput and p99) and the CPU a call of this process and of the proxy. Then,
per mode, the latency (b) adds to (a): the median of the rounds' ratios of mean latency
(target: at most 3%), with a distribution-free interval of that median (the proxy's own
speed wanders by several percent from one block to the next: the interval says whether
the run was long enough to tell), and the CPU (b) costs this process a call. For context,
the proxy's own overhead: (a) over (u). The summary says which targets are met; the exit
status does not. The default run takes 2.5-3.5 minutes on 2 cores; the upstream and the
proxy are stopped on the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(1, str(PROJECT / "bench"))  # its sibling scripts, as bench/failover.py does

from concurrency import (  # noqa: E402 (after the path is set)
    cpu_seconds,
    free_port,
    machine,
    spawn,
    stop,
    tail,
    verdict,
    versions,
    wait_until,
)
from routing import credential_loader, setup_django  # noqa: E402

from tests.litellm.proxy import CHAT_MODEL, KEY_B, LiteLLMProxy, proxy_python  # noqa: E402

TARGET_ADDED = 0.03  # (b) over (a), mean latency of a call, in both modes
MAX_IN_FLIGHT = 1000
SEQUENTIAL_BLOCK = 10  # calls: (a) and (b) alternate this often, one call at a time
MESSAGES = [{"role": "user", "content": "ping"}]
PATHS = ("u", "a", "b")
LABELS = {
    "u": "(u) direct client -> upstream, no proxy",
    "a": "(a) direct client -> LiteLLM proxy",
    "b": "(b) llm.services -> LiteLLM proxy",
}


# ---- measuring -------------------------------------------------------------------------


@dataclass
class Phase:
    """One path in one mode of one round: the sum of its blocks."""

    calls: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, calls that answered
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # the first of each kind
    wall: float = 0.0  # seconds, from each block's first call sent to its last answer
    client_cpu: float = 0.0  # seconds of the thread making the calls (this one)
    background_cpu: float = 0.0  # seconds of this process's other threads
    proxy_cpu: float = 0.0  # seconds of the proxy process

    def failed(self, error: Exception) -> None:
        kind = type(error).__name__
        self.errors[kind] += 1
        self.examples.setdefault(kind, describe(error))

    @property
    def mean_ms(self) -> float:
        return 1000 * statistics.fmean(self.latencies) if self.latencies else float("nan")

    @property
    def p50_ms(self) -> float:
        return 1000 * statistics.median(self.latencies) if self.latencies else float("nan")

    @property
    def p99_ms(self) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall else float("nan")

    @property
    def client_cpu_ms(self) -> float:
        """This process's CPU a call: its own thread's, and the background threads'."""
        return 1000 * (self.client_cpu + self.background_cpu) / self.calls

    @property
    def proxy_cpu_ms(self) -> float:
        return 1000 * self.proxy_cpu / self.calls


def describe(error: BaseException) -> str:
    """The error and what caused it, innermost last, shortened."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(parts) < 5:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}: {' '.join(str(current).split())[:120]}")
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


@dataclass(frozen=True)
class Watched:
    proxy_pid: int
    flush: Callable[[], object]  # writes the usage records waiting in the buffer


@contextlib.contextmanager
def accounted(phase: Phase, watched: Watched, calls: int, *, flush: bool) -> Iterator[None]:
    """CPU of this thread, of the others and of the proxy across one block; with `flush`,
    the usage records the block left in the buffer are written at its end, in this
    thread (after its last call: its CPU, not its latency)."""
    thread, process = time.thread_time(), time.process_time()
    proxy = cpu_seconds(watched.proxy_pid)
    yield
    if flush:
        watched.flush()
    own = time.thread_time() - thread
    phase.calls += calls
    phase.client_cpu += own
    phase.background_cpu += time.process_time() - process - own
    phase.proxy_cpu += cpu_seconds(watched.proxy_pid) - proxy


def sequential(phase: Phase, call: Callable[[], object], calls: int, watched: Watched) -> None:
    """One block: `calls` calls one after another, added to `phase`."""
    with accounted(phase, watched, calls, flush=False):
        started = time.perf_counter()
        for _ in range(calls):
            sent = time.perf_counter()
            try:
                call()
            except Exception as error:  # counted; the comparison holds only without them
                phase.failed(error)
            else:
                phase.latencies.append(time.perf_counter() - sent)
        phase.wall += time.perf_counter() - started


def in_flight(
    phase: Phase,
    loop: asyncio.AbstractEventLoop,
    call: Callable[[], Awaitable[object]],
    calls: int,
    width: int,
    watched: Watched,
    *,
    flush: bool,
) -> None:
    """One block: `calls` calls on `loop`, `width` at a time (`width` workers, each one
    call after another), added to `phase`. The accounting runs outside the loop: the
    flush is sync code."""
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            sent = time.perf_counter()
            try:
                await call()
            except Exception as error:
                phase.failed(error)
            else:
                phase.latencies.append(time.perf_counter() - sent)

    async def drive() -> None:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(width, calls))))
        phase.wall += time.perf_counter() - started

    with accounted(phase, watched, calls, flush=flush):
        loop.run_until_complete(drive())


def blocks(total: int, count: int) -> list[int]:
    """`total` calls in `count` blocks (as even as can be)."""
    count = max(1, min(count, total))
    return [total // count + (1 if k < total % count else 0) for k in range(count)]


def pairs(number: int, sizes: list[int], *, mirrored: bool) -> list[tuple[str, int]]:
    """The (a) and (b) blocks of round `number`, (a) first in even rounds and (b) first in
    odd ones; `mirrored`: ABBA (a b b a a b ...), else ABAB (a b a b ...). The k-th blocks
    of (a) and (b) have the same size."""
    first, second = ("a", "b") if number % 2 == 0 else ("b", "a")
    order: list[tuple[str, int]] = []
    for k, size in enumerate(sizes):
        names = (second, first) if mirrored and k % 2 else (first, second)
        order += [(name, size) for name in names]
    return order


def charge_background(phases: dict[str, Phase]) -> None:
    """Only (b) starts background threads (the usage flusher, the breaker's refresh):
    their CPU during the (u) and (a) blocks of a round is (b)'s."""
    for name in ("u", "a"):
        phases["b"].background_cpu += phases[name].background_cpu
        phases[name].background_cpu = 0.0


# ---- processes -------------------------------------------------------------------------


def start_upstream(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """bench/fast_upstream.py in its own process (SIGTERMed if this benchmark dies)."""
    port = free_port()
    proc = spawn([sys.executable, str(PROJECT / "bench" / "fast_upstream.py"), str(port)], env, log)

    def ready() -> bool:
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True

    wait_until(ready, proc, "bench/fast_upstream.py", log)
    return proc, f"http://127.0.0.1:{port}/v1"


def proc_status(pid: int) -> str:
    """Resident memory and threads of a process, from /proc."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    rss = int(fields.get("VmRSS", "0 kB").split()[0]) // 1024
    return f"RSS {rss} MB, {fields.get('Threads', '?')} threads"


def litellm_version() -> str:
    code = "from importlib.metadata import version; print(version('litellm'))"
    result = subprocess.run(
        [str(proxy_python()), "-c", code], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or "unknown"


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the run as Ctrl-C does: through every `finally` on the way out."""

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- main ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=150, help="sequential calls a path a round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=100, help="calls at a time (async)")
    parser.add_argument(
        "--in-flight-calls",
        type=int,
        default=400,
        help="calls a path a round, in flight (one block: keep it over 5 s)",
    )
    args = parser.parse_args()
    if min(args.calls, args.rounds, args.in_flight, args.in_flight_calls) < 1:
        parser.error("--calls, --rounds, --in-flight and --in-flight-calls must be >= 1")
    if args.in_flight > MAX_IN_FLIGHT:
        parser.error(f"--in-flight is at most {MAX_IN_FLIGHT} (the SDK's connection limit)")
    return args


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()  # before this run adds its own
    with sigterm_interrupts(), tempfile.TemporaryDirectory(prefix="keyroute-bench-") as name:
        tmp = Path(name)
        setup_django(tmp)
        env = dict(os.environ)
        upstream: subprocess.Popen[bytes] | None = None
        proxy: LiteLLMProxy | None = None
        try:
            upstream, upstream_url = start_upstream(env, tmp / "upstream.log")
            proxy = LiteLLMProxy(upstream_base_url=upstream_url, log=tmp / "proxy.log")
            started = time.perf_counter()
            proxy.start()
            startup = time.perf_counter() - started
            run(args, proxy, upstream_url, startup, load_before)
        finally:
            if proxy is not None:
                proxy.stop()
            if upstream is not None:
                stop(upstream)
            from llm import usage

            with contextlib.suppress(Exception):
                usage.flush()  # before the temporary database goes away


def run(
    args: argparse.Namespace,
    proxy: LiteLLMProxy,
    upstream_url: str,
    startup: float,
    load_before: tuple[float, float, float],
) -> None:
    import openai
    import uvloop
    from django.conf import settings

    from credentials.models import PLATFORM
    from llm import services, usage
    from llm.clients import ClientOptions, shared_ssl_context
    from llm.models import UsageRecord

    assert proxy.process is not None
    watched = Watched(proxy.process.pid, usage.flush)
    load = credential_loader(title="Bench proxy", api_key=KEY_B, base_url=proxy.base_url)

    # The HTTP options llm.clients gives the project's own clients.
    options = ClientOptions.from_settings()
    http: dict[str, Any] = {
        "verify": shared_ssl_context(),
        "timeout": options.httpx_timeout(),
        "follow_redirects": False,
        "trust_env": options.trust_env,
    }
    sdk: dict[str, Any] = {"api_key": KEY_B, "timeout": options.httpx_timeout(), "max_retries": 0}

    def sync_client(base_url: str) -> openai.OpenAI:
        http_client = openai.DefaultHttpx2Client(**http)
        return openai.OpenAI(base_url=base_url, http_client=http_client, **sdk)

    def async_client(base_url: str) -> openai.AsyncOpenAI:
        http_client = openai.DefaultAioHttpClient(**http)
        return openai.AsyncOpenAI(base_url=base_url, http_client=http_client, **sdk)

    direct = {"u": sync_client(upstream_url), "a": sync_client(proxy.base_url)}
    sync_calls: dict[str, Callable[[], object]] = {
        "u": lambda: direct["u"].chat.completions.create(model=CHAT_MODEL, messages=MESSAGES),  # type: ignore[arg-type]
        "a": lambda: direct["a"].chat.completions.create(model=CHAT_MODEL, messages=MESSAGES),  # type: ignore[arg-type]
        "b": lambda: services.chat(
            messages=MESSAGES, model=CHAT_MODEL, credential=load(), user=PLATFORM
        ),
    }

    loop = uvloop.new_event_loop()

    # Built on the loop that uses them, as llm.clients builds its own.
    async def build_async() -> dict[str, openai.AsyncOpenAI]:
        return {"u": async_client(upstream_url), "a": async_client(proxy.base_url)}

    adirect = loop.run_until_complete(build_async())
    async_calls: dict[str, Callable[[], Awaitable[object]]] = {
        "u": lambda: adirect["u"].chat.completions.create(model=CHAT_MODEL, messages=MESSAGES),  # type: ignore[arg-type]
        "a": lambda: adirect["a"].chat.completions.create(model=CHAT_MODEL, messages=MESSAGES),  # type: ignore[arg-type]
        "b": lambda: services.achat(
            messages=MESSAGES, model=CHAT_MODEL, credential=load(), user=PLATFORM
        ),
    }

    print(f"Machine: {machine()}")
    print(f"Load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    print(f"Client: {versions()}, uvloop loop")
    print(
        f"Proxy: LiteLLM {litellm_version()}, deploy/litellm/config.yaml, 1 process "
        f"(pid {proxy.process.pid}), alive {startup:.1f} s after start, "
        f"{proc_status(proxy.process.pid)}, {proxy.base_url}"
    )
    print(f"Upstream: bench/fast_upstream.py in its own process ({upstream_url})")
    print(f"Call: chat.completions.create, model {CHAT_MODEL}, key KEY_B, messages {MESSAGES}")
    print(
        "Direct clients (u), (a): openai.OpenAI on DefaultHttpx2Client (sequential), "
        "openai.AsyncOpenAI on DefaultAioHttpClient (in flight), llm.clients' options"
    )
    flush_seconds = settings.LLM_USAGE_FLUSH_SECONDS
    print(
        f"(b): services.chat / achat, credential -> proxy, user=PLATFORM, breaker on "
        f"(LLM_BREAKER_FAILURES={settings.LLM_BREAKER_FAILURES}), usage records buffered "
        f"(LLM_USAGE_FLUSH_SECONDS={flush_seconds:g}), SQLite"
    )
    print(
        f"{args.rounds} rounds of {args.calls} sequential calls a path (blocks of "
        f"{SEQUENTIAL_BLOCK}, a b b a ...), then {args.rounds} rounds of {args.in_flight_calls} "
        f"calls a path at {args.in_flight} in flight (a b, b a, ...); "
        "(u) first in each round, (b) first in every other round\n"
    )

    # Every path answers, and (b) reads what the proxy says (tokens, cost).
    answer = services.chat(messages=MESSAGES, model=CHAT_MODEL, credential=load(), user=PLATFORM)
    assert answer.usage.total_tokens > 0, answer
    print(
        f"Smoke test: (b) answered {answer.text!r}, {answer.usage.total_tokens} tokens, "
        f"cost {answer.cost_usd} USD (x-litellm-response-cost), route {answer.route.host}"
    )
    seq: dict[str, list[Phase]] = {name: [] for name in PATHS}
    par: dict[str, list[Phase]] = {name: [] for name in PATHS}
    seq_sizes = blocks(args.calls, math.ceil(args.calls / SEQUENTIAL_BLOCK))
    par_sizes = [args.in_flight_calls]  # one block a path a round: see the warm-up below

    def sequential_block(phase: Phase, name: str, size: int) -> None:
        sequential(phase, sync_calls[name], size, watched)

    def in_flight_block(phase: Phase, name: str, size: int) -> None:
        # (b)'s records are written at the end of its block, not during the next one.
        call, width = async_calls[name], args.in_flight
        in_flight(phase, loop, call, size, width, watched, flush=name == "b")

    def measure(
        mode: str,
        block: Callable[[Phase, str, int], None],
        order: list[tuple[str, int]],
    ) -> dict[str, Phase]:
        """One round: (u)'s blocks (the sizes of (a)'s), then (a)'s and (b)'s in `order`."""
        phases = {name: Phase() for name in PATHS}
        for name, size in order:
            if name == "a":
                block(phases["u"], "u", size)
        for name, size in order:
            block(phases[name], name, size)
        charge_background(phases)
        a, b = phases["a"], phases["b"]
        print(
            f"  {mode}: a {a.mean_ms:.2f} / b {b.mean_ms:.2f} ms "
            f"({b.mean_ms / a.mean_ms - 1:+.1%})",
            flush=True,
        )
        return phases

    def written() -> int:
        usage.flush()
        return UsageRecord.objects.count()

    # The modes one after the other, each with its warm-up: an async pool left idle
    # through a whole sequential section would meet the proxy's keep-alive (below).
    for name in PATHS:
        sequential(Phase(), sync_calls[name], max(10, args.calls // 10), watched)
    records = -written()
    for number in range(args.rounds):
        order = pairs(number, seq_sizes, mirrored=True)
        phases = measure(f"sequential round {number + 1}", sequential_block, order)
        for name in PATHS:
            seq[name].append(phases[name])
    records += written()
    # One unmeasured round warms the async pools, (b) first: then every pooled connection
    # sits idle either for (u)'s block alone or for two blocks of the other path (over
    # 10 s here), never for 3.5-5 s: idle that long, pooled connections meet the proxy's
    # keep-alive timeout (uvicorn's 5 s) which, its loop busy with the other requests,
    # closes them under the requests sent on them: those calls fail, and (b)'s breaker
    # opens (docs/performance.md).
    measure("in-flight warm-up", in_flight_block, pairs(1, par_sizes, mirrored=False))
    records -= written()
    for number in range(args.rounds):
        order = pairs(number, par_sizes, mirrored=False)
        mode = f"{args.in_flight} in flight, round {number + 1}"
        phases = measure(mode, in_flight_block, order)
        for name in PATHS:
            par[name].append(phases[name])
    records += written()
    b_calls = args.rounds * (args.calls + args.in_flight_calls)

    for client in adirect.values():
        loop.run_until_complete(client.close())
    loop.run_until_complete(loop.shutdown_asyncgens())  # closes (b)'s clients of this loop
    loop.close()
    for sync in direct.values():
        sync.close()
    load_after = os.getloadavg()
    proxy_after = proc_status(proxy.process.pid)

    print()
    report_sequential(seq, args)
    report_in_flight(par, args)
    checks = ratios(seq, par, args)
    errors = sum(sum(p.errors.values()) for p in (*_all(seq), *_all(par)))
    print(
        f"\nUsage records written by (b) in the measured rounds: {records} "
        f"for {b_calls} calls ({sum(len(p.latencies) for p in seq['b'] + par['b'])} answered)"
    )
    print(f"Proxy at the end: {proxy_after}, still alive: {proxy.alive}")
    print(f"Load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    if errors:
        print("Errors:")
        for mode, results in (("sequential", seq), (f"{args.in_flight} in flight", par)):
            for name in PATHS:
                kinds: Counter[str] = Counter()
                examples: dict[str, str] = {}
                for phase in results[name]:
                    kinds.update(phase.errors)
                    for kind, text in phase.examples.items():
                        examples.setdefault(kind, text)
                for kind, count in kinds.most_common():
                    print(f"  ({name}) {mode}: {kind} x{count}, e.g. {examples[kind]}")
        print(f"The proxy's log ends with:\n{tail(proxy.log)}")
    checks.append((errors == 0, f"{errors} failed calls (the comparison holds only at 0)"))
    print("\nSummary:")
    verdict(checks)


def _latencies(rounds: list[Phase]) -> list[float]:
    return [latency for phase in rounds for latency in phase.latencies]


def _all(phases: dict[str, list[Phase]]) -> list[Phase]:
    return [phase for rounds in phases.values() for phase in rounds]


def _median(rounds: list[Phase], metric: Callable[[Phase], float]) -> float:
    return statistics.median(metric(phase) for phase in rounds)


def report_sequential(seq: dict[str, list[Phase]], args: argparse.Namespace) -> None:
    print(f"Sequential, one call at a time (median of {args.rounds} rounds of {args.calls}):")
    print(
        f"{'path':<42} {'mean ms':>8} {'p50 ms':>8} {'calls/s':>8} "
        f"{'client CPU':>11} {'proxy CPU':>10} {'errors':>7}"
    )
    for name in PATHS:
        rounds = seq[name]
        print(
            f"{LABELS[name]:<42} {_median(rounds, lambda p: p.mean_ms):>8.3f} "
            f"{_median(rounds, lambda p: p.p50_ms):>8.3f} "
            f"{_median(rounds, lambda p: p.rate):>8.1f} "
            f"{_median(rounds, lambda p: p.client_cpu_ms):>8.3f} ms "
            f"{_median(rounds, lambda p: p.proxy_cpu_ms):>7.3f} ms "
            f"{sum(sum(p.errors.values()) for p in rounds):>7}"
        )


def report_in_flight(par: dict[str, list[Phase]], args: argparse.Namespace) -> None:
    print(
        f"\nAt {args.in_flight} in flight (median of {args.rounds} rounds "
        f"of {args.in_flight_calls}):"
    )
    print(
        f"{'path':<42} {'calls/s':>8} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'client CPU':>11} {'proxy CPU':>10} {'errors':>7}"
    )
    for name in PATHS:
        rounds = par[name]
        print(
            f"{LABELS[name]:<42} {_median(rounds, lambda p: p.rate):>8.1f} "
            f"{_median(rounds, lambda p: p.mean_ms):>8.1f} "
            f"{_median(rounds, lambda p: p.p50_ms):>8.1f} "
            f"{_median(rounds, lambda p: p.p99_ms):>8.1f} "
            f"{_median(rounds, lambda p: p.client_cpu_ms):>8.3f} ms "
            f"{_median(rounds, lambda p: p.proxy_cpu_ms):>7.3f} ms "
            f"{sum(sum(p.errors.values()) for p in rounds):>7}"
        )


def interval(values: list[float]) -> tuple[float, float, float]:
    """A distribution-free interval for the median of `values`: the k-th smallest and
    k-th largest, k as large as keeps the coverage >= 90%; and that coverage."""
    ordered, n = sorted(values), len(values)

    def coverage(k: int) -> float:  # P(x(k) <= median <= x(n-k+1))
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / (1 << n)

    k = 1
    while k + 1 <= n - k and coverage(k + 1) >= 0.90:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


def ratios(
    seq: dict[str, list[Phase]], par: dict[str, list[Phase]], args: argparse.Namespace
) -> list[tuple[bool, str]]:
    """(b) over (a) in each mode, the targets; (a) over (u), the proxy's own cost."""
    checks = []
    print(
        "\nAdded latency of (b) over (a), mean latency of a call: the median of the rounds' "
        "ratios (a round's (a) and (b) blocks alternate), with its interval"
    )
    for mode, phases in (("sequential", seq), (f"{args.in_flight} in flight", par)):
        pairs = list(zip(phases["a"], phases["b"], strict=True))
        by_round = [pb.mean_ms / pa.mean_ms - 1 for pa, pb in pairs]
        added = statistics.median(by_round)
        low, high, coverage = interval(by_round)
        a = _median(phases["a"], lambda p: p.mean_ms)
        b = _median(phases["b"], lambda p: p.mean_ms)
        p50 = statistics.median(pb.p50_ms / pa.p50_ms - 1 for pa, pb in pairs)
        rate = statistics.median(pb.rate / pa.rate for pa, pb in pairs)
        thread = statistics.median(
            1000 * (pb.client_cpu / pb.calls - pa.client_cpu / pa.calls) for pa, pb in pairs
        )
        background = statistics.median(1000 * pb.background_cpu / pb.calls for pb in phases["b"])
        pooled = statistics.fmean(_latencies(phases["b"])) / statistics.fmean(
            _latencies(phases["a"])
        )
        print(
            f"  {mode}: {added:+.1%} ({coverage:.0%} interval {low:+.1%} .. {high:+.1%}); "
            f"all calls pooled {pooled - 1:+.1%}; median rounds {a:.3f} -> {b:.3f} ms "
            f"({b / a - 1:+.1%}); p50 {p50:+.1%}; throughput (b)/(a) {rate:.3f}"
        )
        share = (
            f"{thread / a:+.1%} of (a)'s latency"
            if phases is seq
            else f"{(thread + background) * _median(phases['b'], lambda p: p.rate) / 1000:.1%} "
            "of a core at (b)'s rate"
        )
        print(
            f"    CPU (b) adds in this process: {thread:+.3f} ms a call in the calls' thread "
            f"({share}), {background:.3f} ms in background threads"
        )
        print(f"    by round: {' '.join(f'{r:+.1%}' for r in by_round)}")
        undecided = low <= TARGET_ADDED < high
        checks.append(
            (
                added <= TARGET_ADDED,
                f"(b) over (a), {mode}: {added:+.1%} mean latency "
                f"(target <= {TARGET_ADDED:.0%} added; {coverage:.0%} interval "
                f"{low:+.1%} .. {high:+.1%}{': not decided by this run' if undecided else ''})",
            )
        )
    print("The proxy's own overhead, (a) over (u) (context, no target):")
    for mode, phases in (("sequential", seq), (f"{args.in_flight} in flight", par)):
        u = _median(phases["u"], lambda p: p.mean_ms)
        a = _median(phases["a"], lambda p: p.mean_ms)
        rate_u = _median(phases["u"], lambda p: p.rate)
        rate_a = _median(phases["a"], lambda p: p.rate)
        print(
            f"  {mode}: {u:.3f} -> {a:.3f} ms a call, +{a - u:.3f} ms ({a / u - 1:+.0%}); "
            f"{rate_u:.0f} -> {rate_a:.0f} calls/s"
        )
    return checks


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\nInterrupted; the upstream and the proxy are stopped.", file=sys.stderr)
        sys.exit(130)
