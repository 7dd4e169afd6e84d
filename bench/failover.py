"""Failover under load: a proxy killed while clients chat, then brought back, in one run.

    python bench/failover.py [--clients 100] [--duration 30] [--kill-at 5] [--revive-at 15]
                             [--cooldown 5] [--delay 0.2]

The issue's "done when", measured: with a proxy killed under load, users whose
credential has a fallback see no failures, and the dead proxy is not hammered.

Starts, each in its own process on 127.0.0.1: two tests/upstream.py servers answering
every chat completion after --delay seconds, P (the primary proxy) and F (the
fallback); and the site under uvicorn with 2 workers (uvloop, httptools, as `make serve`
runs it; DEBUG=false), its cache and the circuit breakers shared through Redis at
127.0.0.1:6379 db 14 (emptied at the start and at the end), its metrics summed across
the workers (PROMETHEUS_MULTIPROC_DIR in a temporary folder), with LLM_MAX_RETRIES=0,
LLM_CONNECT_TIMEOUT_SECONDS=2, LLM_BREAKER_FAILURES=3, LLM_BREAKER_COOLDOWN_SECONDS
--cooldown and LLM_BREAKER_REFRESH_SECONDS=1. A temporary SQLite database (or
DATABASE_URL, when set: the rows made are removed afterwards) holds a signed-in user
and two credentials of theirs: A on P, whose fallback is B on F.

--clients virtual clients (aiohttp, in this process) loop on POST /api/llm/chat with A
for --duration seconds, as the playground sends it (session cookie, CSRF token), and
record each answer: when, its status, `route.source` and
`route.failed_over_from.reason`. At --kill-at seconds P is killed (SIGKILL) and a
DeadPort (tests/upstream.py: accepts each connection and closes it at once) takes its
port in a thread of this process, timing every knock; at --revive-at seconds the
DeadPort closes and P starts again on the same port. Meanwhile /metrics (open to
127.0.0.1) is read every 0.2 s for `keyroute_breaker_state` of P's host.

It prints, by phase (before the kill, while P is dead, after P is back, split at the
moments the answers arrive): answers/s, errors (non-200 answers and failed requests),
the share served by the fallback, p50/p99 latency. Then: the time from the kill to the
breaker opening, as first seen (an answer saying "circuit breaker open", or
keyroute_breaker_state 2 in /metrics); the knocks at the dead port, in total and after
that moment; the calls that tried P after it, told apart by the answers (a call's
`failed_over_from.reason` says whether P failed it or its breaker was open, and its
send time whether it was already on its way); how often the breaker closed while P was
dead; the time from P's return (its port accepting again) to the first answer P served;
and, scraped at the end, keyroute_llm_failovers_total, the calls by outcome, the
breaker's transitions and the usage records written. --dump PATH writes the raw record.

Targets (the exit status is 1 when one is missed), with D = revive - kill:
  - 0 errors over the whole run;
  - calls sent after the breaker opened that still tried P (before P's return)
    <= ceil(D / cooldown) + 2 x 3: one half-open probe per cooldown across both workers
    (the probe is claimed with an atomic add in the cache; a failed one reopens the
    breaker for a fresh cooldown), plus, per worker, one failure streak
    (LLM_BREAKER_FAILURES) from a worker that had not opened or heard yet (it opens
    after its own 3 failures in a row, or learns at its next refresh);
  - knocks at the dead port after the breaker opened <= that bound + the calls that were
    on their way then (sent before it, answered after it, failed by P: admitted while
    the breaker was closed, they still go out; on 2 busy cores, dozens may);
  - the first answer by P within cooldown + 2 x LLM_BREAKER_REFRESH_SECONDS of P's
    return: the last failed probe was before P came back, the next comes one cooldown
    later (a worker that loses the claim retries after one refresh), and its answer
    closes the breaker.
The defaults take about 35 s; every process started is stopped on the way out, Ctrl-C
and errors included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
# bench/ is a folder of scripts (no __init__.py): its helpers are imported as the
# top-level modules they are to mypy (`bench.concurrency` would be the same file under a
# second name). Run as a script, this folder is on the path already.
sys.path.insert(1, str(PROJECT / "bench"))

from concurrency import (  # noqa: E402 (after the project is on the path)
    CHAT_BODY,
    MODEL,
    Fixtures,
    free_port,
    machine,
    make_fixtures,
    remove_fixtures,
    running,
    setup_django,
    spawn,
    stop,
    tail,
    verdict,
    versions,
    wait_until,
)

from tests.upstream import DeadPort  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/14"
WORKERS = 2
FAILURES = 3  # LLM_BREAKER_FAILURES
REFRESH = 1.0  # LLM_BREAKER_REFRESH_SECONDS
CONNECT_TIMEOUT = 2.0  # LLM_CONNECT_TIMEOUT_SECONDS
KEY_B = "sk-test-fake-bench-failover-b-0002"
METRICS_EVERY = 0.2  # seconds between reads of /metrics while driving
OPEN_REASON = "circuit breaker open"
PHASES = ("before the kill", "P dead", "P back")


# ---- processes -------------------------------------------------------------------------


def accepts(port: int) -> bool:
    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    return True


def start_upstream(
    port: int, delay: float, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "tests.upstream", "--port", str(port), "--delay", str(delay)]
    return spawn(args, env, log)


def start_site(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The site under uvicorn with WORKERS workers, as `make serve` runs it."""
    port = free_port()
    args = [
        *(sys.executable, "-m", "uvicorn", "platform_site.asgi:application"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS)),
        *("--loop", "uvloop", "--http", "httptools", "--no-access-log"),
    ]
    return spawn(args, env, log), f"http://127.0.0.1:{port}"


def site_ready(base: str, log: Path) -> bool:
    """/healthz answers, and every worker has finished starting (one listening socket is
    shared: a worker still importing would leave the first seconds to the other)."""
    with urllib.request.urlopen(f"{base}/healthz", timeout=1) as answer:  # noqa: S310
        if answer.status != 200:
            return False
    return log.read_text(errors="replace").count("Application startup complete") >= WORKERS


def bind_dead_port(port: int) -> DeadPort:
    """The port P left; retried briefly, should the kernel not have released it yet."""
    deadline = time.monotonic() + 2
    while True:
        try:
            return DeadPort(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


# ---- the run ---------------------------------------------------------------------------


@dataclass(slots=True)
class Answer:
    sent: float  # seconds since the start of the drive
    done: float
    status: int  # 0: the request failed without an answer
    error: str | None = None  # "HTTP 503", or the exception's class
    source: str | None = None  # route.source: "credential", or "failover"
    reason: str | None = None  # route.failed_over_from.reason


@dataclass
class Run:
    """What happened, in seconds since the start of the drive."""

    answers: list[Answer] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    kill: float = math.nan  # P killed
    dead_bound: float = math.nan  # the DeadPort listening on P's port
    revive: float = math.nan  # the DeadPort closed, P started again
    back: float = math.nan  # P's port accepting again
    knocks: list[float] = field(default_factory=list)
    # /metrics on change: (t, keyroute_breaker_state, closes so far) of P's host
    breaker: list[tuple[float, float, float]] = field(default_factory=list)
    metrics_errors: int = 0
    end: float = math.nan  # the last answer came


@dataclass
class Upstreams:
    port: int  # P's
    delay: float
    env: dict[str, str]
    tmp: Path
    procs: list[subprocess.Popen[bytes]]  # every process started (stopped on the way out)
    primary: subprocess.Popen[bytes]
    dead: DeadPort | None = None


async def drive(
    args: argparse.Namespace, base: str, fixtures: Fixtures, ups: Upstreams, host: str
) -> Run:
    """The clients, the kill and the revival on schedule, and the /metrics watch."""
    run = Run()
    url = f"{base}/api/llm/chat"
    body = CHAT_BODY % (MODEL.encode(), fixtures.credential_id.encode())
    headers = {**fixtures.headers, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=args.clients, limit_per_host=0)
    async with (
        aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=30),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as watcher,
    ):
        started = time.perf_counter()
        stop_at = started + args.duration

        def now() -> float:
            return time.perf_counter() - started

        async def client() -> None:
            while (sent := time.perf_counter()) < stop_at:
                answer = Answer(sent - started, math.nan, 0)
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        raw = await response.read()
                        answer.status = response.status
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    answer.error = type(exc).__name__
                answer.done = now()
                run.answers.append(answer)
                if answer.status == 200:
                    try:
                        route = json.loads(raw)["route"]
                        answer.source = route["source"]
                        answer.reason = (route.get("failed_over_from") or {}).get("reason")
                        continue
                    except (ValueError, KeyError, TypeError, AttributeError):
                        answer.status, answer.error = 0, "200 without a route"
                if answer.status:
                    answer.error = f"HTTP {answer.status}"
                    if len(run.error_samples) < 5:
                        run.error_samples.append(f"{answer.error}: {raw[:300]!r}")
                await asyncio.sleep(0.01)  # a failing site must not make a client spin

        async def control() -> None:
            await asyncio.sleep(max(0.0, args.kill_at - now()))
            run.kill = now()
            ups.primary.send_signal(signal.SIGKILL)
            await asyncio.to_thread(ups.primary.wait)
            ups.dead = await asyncio.to_thread(bind_dead_port, ups.port)
            run.dead_bound = now()
            await asyncio.sleep(max(0.0, args.revive_at - now()))
            run.revive = now()
            dead, ups.dead = ups.dead, None
            await asyncio.to_thread(dead.close)
            run.knocks = [knock - started for knock in dead.knocks]
            log = ups.tmp / "upstream-p-revived.log"
            ups.primary = start_upstream(ups.port, ups.delay, ups.env, log)
            ups.procs.append(ups.primary)
            while ups.primary.poll() is None:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", ups.port)
                    writer.close()
                    run.back = now()
                    return
                await asyncio.sleep(0.01)
            raise SystemExit(f"P did not start again:\n{tail(log)}")

        async def watch() -> None:
            last: tuple[float, float] | None = None
            while time.perf_counter() < stop_at:
                try:
                    async with watcher.get(f"{base}/metrics") as response:
                        text = await response.text()
                    state = closes = 0.0
                    for name, labels, value in parse(text):
                        if labels.get("host") != host:
                            continue
                        if name == "keyroute_breaker_state":
                            state = value
                        elif name == "keyroute_breaker_transitions_total":
                            closes += value if labels.get("to") == "closed" else 0.0
                    if (state, closes) != last:
                        run.breaker.append((now(), state, closes))
                        last = state, closes
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
                    run.metrics_errors += 1
                await asyncio.sleep(METRICS_EVERY)

        await asyncio.gather(control(), watch(), *(client() for _ in range(args.clients)))
        run.end = now()
    return run


def run_drive(
    args: argparse.Namespace, base: str, fixtures: Fixtures, ups: Upstreams, host: str
) -> Run:
    """On a fresh event loop (uvloop, as the server's, when installed)."""
    coroutine = drive(args, base, fixtures, ups, host)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def smoke_test(base: str, fixtures: Fixtures) -> None:
    """One chat before the load, served by P: a setup problem fails here, with its answer."""
    body = CHAT_BODY % (MODEL.encode(), fixtures.credential_id.encode())
    headers = {**fixtures.headers, "Content-Type": "application/json"}
    url = f"{base}/api/llm/chat"
    request = urllib.request.Request(url, body, headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            route = json.loads(answer.read())["route"]
    except OSError as error:
        detail = error.read()[:500] if isinstance(error, urllib.error.HTTPError) else b""
        raise SystemExit(f"The smoke test failed: {error} {detail!r}") from None
    if route["source"] != "credential":
        raise SystemExit(f"The smoke test was not served by P: {route}")


# ---- report ----------------------------------------------------------------------------


@dataclass
class PhaseStats:
    name: str
    start: float
    end: float  # the window for answers/s
    answers: list[Answer]

    @property
    def ok(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 200]

    @property
    def errors(self) -> Counter[str]:
        return Counter(a.error or "?" for a in self.answers if a.status != 200)

    @property
    def rate(self) -> float:
        inside = [a for a in self.ok if self.start <= a.done < self.end]
        return len(inside) / (self.end - self.start) if self.end > self.start else math.nan

    @property
    def fallback_share(self) -> float:
        ok = self.ok
        return sum(a.source == "failover" for a in ok) / len(ok) if ok else math.nan

    def percentile(self, share: float) -> float:
        latencies = sorted(a.done - a.sent for a in self.ok)
        if not latencies:
            return math.nan
        return latencies[min(len(latencies) - 1, int(share * len(latencies)))]


def phases(run: Run, duration: float) -> list[PhaseStats]:
    """Split at the kill and at the revival, by the moment each answer came."""
    bounds = [(0.0, run.kill), (run.kill, run.revive), (run.revive, duration)]
    result = []
    for name, (start, end) in zip(PHASES, bounds, strict=True):
        last = name == PHASES[-1]
        chosen = [a for a in run.answers if start <= a.done and (last or a.done < end)]
        result.append(PhaseStats(name, start, end, chosen))
    return result


HEAD = (
    f"{'phase':<16} {'window s':>11} {'answers':>7} {'answers/s':>9} {'errors':>6}"
    f" {'by fallback':>11} {'p50 ms':>7} {'p99 ms':>7}"
)


def table(stats: list[PhaseStats]) -> None:
    print(HEAD)
    for phase in stats:
        window = f"{phase.start:.1f}-{phase.end:.1f}"
        print(
            f"{phase.name:<16} {window:>11} {len(phase.ok):>7} {phase.rate:>9.1f}"
            f" {sum(phase.errors.values()):>6} {phase.fallback_share:>11.1%}"
            f" {phase.percentile(0.5) * 1000:>7.0f} {phase.percentile(0.99) * 1000:>7.0f}"
        )
    for phase in stats:
        if phase.errors:
            kinds = ", ".join(f"{kind} x{n}" for kind, n in phase.errors.most_common())
            print(f"  {phase.name} errors: {kinds}")


def breaker_opened(run: Run) -> tuple[float, str]:
    """When the breaker was first seen open after the kill, and by what."""
    by_answer = min(
        (a.done for a in run.answers if a.reason == OPEN_REASON and a.done >= run.kill),
        default=math.inf,
    )
    by_metrics = min(
        (t for t, state, _ in run.breaker if state >= 2 and t >= run.kill), default=math.inf
    )
    if by_answer <= by_metrics:
        return by_answer, "an answer saying 'circuit breaker open'"
    return by_metrics, "/metrics keyroute_breaker_state 2"


@dataclass(frozen=True)
class Findings:
    errors: int
    opened: float  # seconds after the kill (inf: never seen)
    opened_by: str
    knocks: int
    knocks_after: int  # knocks at the dead port after the breaker was seen open
    probes: int  # half-open probes expected while P is dead
    tries_after: int  # calls sent after it was seen open (before P's return) that tried P
    on_their_way: int  # calls sent before it, answered after, whose try at P failed
    first_by_p: float  # seconds after P's return (inf: none)
    last_by_fallback: float  # seconds after P's return
    return_bound: float
    late_by_p: int  # answers by P that came after the kill (sent before it)
    closes_while_dead: float  # breaker closings in /metrics between the kill and P's return

    @property
    def probes_text(self) -> str:
        return f"{self.probes} probe{'s' * (self.probes != 1)}"

    @property
    def tries_bound(self) -> int:
        return self.probes + WORKERS * FAILURES

    @property
    def knocks_bound(self) -> int:
        return self.tries_bound + self.on_their_way


def closes_between(run: Run, start: float, end: float) -> float:
    """Closings of P's breaker (all workers) that /metrics showed in [start, end)."""

    def seen_by(moment: float) -> float:
        return max((closes for t, _, closes in run.breaker if t < moment), default=0.0)

    return seen_by(end) - seen_by(start)


def tried_p(answer: Answer) -> bool:
    """The call went to P and failed to connect, then to the fallback: its answer says
    why P failed (anything but a breaker that was open, which sends nothing to P)."""
    return answer.reason is not None and answer.reason != OPEN_REASON


def findings(run: Run, args: argparse.Namespace) -> Findings:
    opened_at, opened_by = breaker_opened(run)
    cooldown = args.cooldown
    # As scheduled: the measured moments are late by milliseconds, which must not count.
    probes = math.ceil((args.revive_at - args.kill_at) / cooldown)
    after_back = [a for a in run.answers if a.status == 200 and a.done >= run.back]
    first_by_p = min((a.done for a in after_back if a.source == "credential"), default=math.inf)
    last_by_fallback = max((a.done for a in after_back if a.source == "failover"), default=run.back)
    return Findings(
        errors=sum(a.status != 200 for a in run.answers),
        opened=opened_at - run.kill,
        opened_by=opened_by,
        knocks=len(run.knocks),
        knocks_after=sum(k >= opened_at for k in run.knocks),
        probes=probes,
        tries_after=sum(
            tried_p(a) for a in run.answers if opened_at <= a.sent < run.back and a.status == 200
        ),
        on_their_way=sum(
            tried_p(a) for a in run.answers if a.sent < opened_at <= a.done and a.status == 200
        ),
        first_by_p=first_by_p - run.back,
        last_by_fallback=last_by_fallback - run.back,
        return_bound=cooldown + 2 * REFRESH,
        late_by_p=sum(
            a.status == 200 and a.source == "credential" and a.done >= run.kill
            for a in run.answers
            if a.sent < run.back
        ),
        closes_while_dead=closes_between(run, run.kill, run.back),
    )


def clusters(times: list[float], within: float = 0.02) -> list[tuple[float, int]]:
    """Times as (first, count) groups, each spanning at most `within` seconds."""
    groups: list[tuple[float, int]] = []
    for moment in sorted(times):
        if groups and moment - groups[-1][0] <= within:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((moment, 1))
    return groups


def states(run: Run) -> list[str]:
    """The breaker state readings of /metrics, where the state changed."""
    shown, last = [], None
    for t, state, _ in run.breaker:
        if state != last:
            shown.append(f"{int(state)} at {t:.2f} s")
            last = state
    return shown


def timeline(run: Run, found: Findings, cooldown: float) -> None:
    print(
        f"\nP killed at {run.kill:.2f} s; the DeadPort listened"
        f" {1000 * (run.dead_bound - run.kill):.0f} ms later and closed at {run.revive:.2f} s;"
        " P started again then and accepted connections at"
        f" {run.back:.2f} s (+{run.back - run.revive:.2f} s)."
    )
    print(
        f"Breaker opened: {found.opened:.2f} s after the kill (first seen: {found.opened_by});"
        " /metrics keyroute_breaker_state of P: "
        + ", ".join(states(run))
        + (f" ({run.metrics_errors} reads failed)" if run.metrics_errors else "")
    )
    shown = clusters([k - run.kill for k in run.knocks])
    knocks = ", ".join(f"{t:+.2f}" + (f" x{n}" if n > 1 else "") for t, n in shown[:30])
    more = f" and {len(shown) - 30} more groups" if len(shown) > 30 else ""
    print(
        f"Knocks at the dead port: {found.knocks} in {run.revive - run.kill:.1f} s, "
        f"{found.knocks - found.knocks_after} before the breaker was seen open and "
        f"{found.knocks_after} after; at s after the kill: {knocks or '-'}{more}"
    )
    print(
        f"  calls sent after the breaker was seen open that still tried P (before P's return;"
        f" from the answers, whose failed_over_from.reason is a connection failure):"
        f" {found.tries_after}; calls on their way then (sent before, answered after, P"
        f" failed them): {found.on_their_way}"
    )
    print(
        f"  bounds: tries after opening <= {found.tries_bound} = {found.probes_text}"
        f" (half-open, one per {cooldown:g} s cooldown across both workers over the"
        f" {run.revive - run.kill:.0f} s P was dead: the probe is claimed by an atomic add in"
        f" the cache, and a failed one reopens for a fresh cooldown) + {WORKERS} workers x"
        f" {FAILURES} (a worker that has not opened or heard yet sends calls until its own"
        f" LLM_BREAKER_FAILURES failures in a row, or its next refresh);"
        f" knocks after opening <= {found.knocks_bound} = that + the calls on their way"
    )
    print(
        f"While P was dead: {found.late_by_p} answers by P came after the kill (sent before"
        f" it); the breaker of P closed {found.closes_while_dead:.0f} times"
        " (keyroute_breaker_transitions_total to closed; expected 0: no answer can come"
        " from a dead proxy, and only an answered probe should close an open breaker)"
    )
    if math.isfinite(found.first_by_p):
        print(
            f"P's return: first answer by P {found.first_by_p:.2f} s after it accepted again; "
            f"last answer by the fallback {found.last_by_fallback:.2f} s after"
        )
    else:
        print("P's return: no answer by P after it accepted again")


# ---- metrics ---------------------------------------------------------------------------

SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(base: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as answer:  # noqa: S310
        return parse(answer.read().decode())


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus' text format: (name, labels, value) of every sample."""
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def print_metrics(samples: list[tuple[str, dict[str, str], float]], names: dict[str, str]) -> None:
    print("\n/metrics at the end (both workers):")
    for name, labels, value in samples:
        if name == "keyroute_llm_failovers_total":
            print(
                f"  keyroute_llm_failovers_total from {names.get(labels['from_host'], '?')}"
                f" to {names.get(labels['to_host'], '?')}: {value:.0f}"
            )
    outcomes: dict[tuple[str, str, str], float] = defaultdict(float)
    for name, labels, value in samples:
        if name == "keyroute_llm_requests_total":
            key = (labels["outcome"], labels["source"], names.get(labels["host"], labels["host"]))
            outcomes[key] += value
    print("  keyroute_llm_requests_total by outcome (source, host):")
    for (outcome, source, host), value in sorted(outcomes.items()):
        print(f"    {outcome:<18} {source:<11} {host:<2} {value:>8.0f}")
    transitions = [
        f"{labels['to']} {value:.0f}"
        for name, labels, value in samples
        if name == "keyroute_breaker_transitions_total" and names.get(labels["host"]) == "P"
    ]
    transitions_text = ", ".join(transitions)
    print(f"  keyroute_breaker_transitions_total of P, by state (all workers): {transitions_text}")


def usage(fixtures: Fixtures, fallback_id: str) -> str:
    from llm.models import UsageRecord

    rows = UsageRecord.objects.filter(user_id=fixtures.user_id)
    ok = rows.filter(outcome="ok")
    failed_over = ok.filter(failed_over=True)
    by_b = failed_over.filter(serving_credential_id=uuid.UUID(fallback_id))
    others = rows.exclude(outcome="ok").count()
    return (
        f"usage records: {ok.count()} ok ({failed_over.count()} failed over, {by_b.count()} "
        f"of them charged to B), {others} not ok"
    )


def summary(found: Findings, answers: int) -> bool:
    checks = [
        (found.errors == 0, f"errors {found.errors} of {answers} requests (target 0)"),
        (
            found.tries_after <= found.tries_bound,
            f"calls sent after the breaker opened that still tried P {found.tries_after} "
            f"(target <= {found.tries_bound}: {found.probes_text} + {WORKERS} workers x "
            f"{FAILURES})",
        ),
        (
            found.knocks_after <= found.knocks_bound,
            f"knocks at the dead port after the breaker opened {found.knocks_after} "
            f"(target <= {found.knocks_bound}: the above + {found.on_their_way} calls on "
            f"their way; {found.knocks} in all)",
        ),
        (
            found.first_by_p <= found.return_bound,
            f"first answer by P {found.first_by_p:.2f} s after its return "
            f"(target <= {found.return_bound:g} s: cooldown + 2 refresh intervals)",
        ),
    ]
    print("\nSummary:")
    print(f"  breaker opened {found.opened:.2f} s after the kill (no target)")
    print(
        f"  breaker closed {found.closes_while_dead:.0f} times while P was dead"
        " (no target; expected 0)"
    )
    return verdict(checks)


# ---- main ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--kill-at", type=float, default=5.0, help="when P is killed (s)")
    parser.add_argument("--revive-at", type=float, default=15.0, help="when P starts again (s)")
    parser.add_argument(
        "--cooldown", type=float, default=5.0, help="LLM_BREAKER_COOLDOWN_SECONDS of the site"
    )
    parser.add_argument("--delay", type=float, default=0.2, help="upstream seconds per answer")
    parser.add_argument(
        "--dump", metavar="PATH", help="write every answer, knock and breaker reading as JSON"
    )
    args = parser.parse_args()
    if args.clients < 1:
        parser.error("--clients must be >= 1")
    if not 0 < args.kill_at < args.revive_at < args.duration:
        parser.error("0 < --kill-at < --revive-at < --duration, please")
    if args.cooldown <= 0 or args.delay < 0:
        parser.error("--cooldown must be > 0 and --delay >= 0")
    return args


def site_env(env: dict[str, str], metrics_dir: Path, cooldown: float) -> dict[str, str]:
    return {
        **env,
        "WEB_CONCURRENCY": str(WORKERS),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "LLM_BREAKER_FAILURES": str(FAILURES),
        "LLM_BREAKER_COOLDOWN_SECONDS": f"{cooldown:g}",
        "LLM_BREAKER_REFRESH_SECONDS": f"{REFRESH:g}",
        "LLM_CONNECT_TIMEOUT_SECONDS": f"{CONNECT_TIMEOUT:g}",
    }


def add_fallback(fixtures: Fixtures, fallback_url: str) -> str:
    """Credential B on F, of the same user, made the fallback of A. Returns B's id."""
    from credentials.models import APIKeyCredentials

    primary = APIKeyCredentials.objects.get(pk=fixtures.credential_id)
    fallback = APIKeyCredentials(
        title="Bench failover B", api_key=KEY_B, base_url=fallback_url, owner=primary.owner
    )
    fallback.full_clean()
    fallback.save()
    primary.title, primary.fallback = "Bench failover A", fallback
    primary.full_clean()
    primary.save(update_fields=["title", "fallback", "updated_at"])
    return str(fallback.pk)


def clear_cache() -> None:
    """Empty db 14 of Redis: the breakers, sessions and copies' stamps of this run."""
    from django.core.cache import cache

    cache.clear()


def main() -> None:
    args = parse_args()
    given_database = os.environ.get("DATABASE_URL", "").strip() or None
    os.environ["CACHE_URL"] = REDIS_URL  # this process writes the session there too
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="keyroute-bench-failover-") as tmp_name:
        tmp = Path(tmp_name)
        env = setup_django(tmp, given_database)
        clear_cache()
        procs: list[subprocess.Popen[bytes]] = []
        fixtures: Fixtures | None = None
        fallback_id = ""
        ups: Upstreams | None = None
        met = False
        with running(procs):
            try:
                p_port, f_port = free_port(), free_port()
                primary = start_upstream(p_port, args.delay, env, tmp / "upstream-p.log")
                procs.append(primary)
                fallback = start_upstream(f_port, args.delay, env, tmp / "upstream-f.log")
                procs.append(fallback)
                wait_until(lambda: accepts(p_port), primary, "P", tmp / "upstream-p.log")
                wait_until(lambda: accepts(f_port), fallback, "F", tmp / "upstream-f.log")
                fixtures = make_fixtures(f"http://127.0.0.1:{p_port}/v1")
                fallback_id = add_fallback(fixtures, f"http://127.0.0.1:{f_port}/v1")
                metrics_dir = tmp / "metrics"
                metrics_dir.mkdir(mode=0o700)
                site_log = tmp / "site.log"
                site, base = start_site(site_env(env, metrics_dir, args.cooldown), site_log)
                procs.append(site)
                wait_until(lambda: site_ready(base, site_log), site, "uvicorn", site_log)
                smoke_test(base, fixtures)
                ups = Upstreams(p_port, args.delay, env, tmp, procs, primary)
                header(args, p_port, f_port, load_before)
                p_host, f_host = f"127.0.0.1:{p_port}", f"127.0.0.1:{f_port}"
                run = run_drive(args, base, fixtures, ups, p_host)
                if args.dump:
                    dump(run, Path(args.dump))
                samples = scrape(base)
                stop(site)  # uvicorn exits cleanly: the usage buffers are flushed
                report(args, run, samples, {p_host: "P", f_host: "F"})
                print(f"  {usage(fixtures, fallback_id)} (+1 for the smoke test)")
                if site.returncode not in (0, -signal.SIGTERM) or any(
                    a.status != 200 for a in run.answers
                ):
                    print(f"\nuvicorn exited with {site.returncode}; its log ends with:")
                    print(tail(site_log))
                found = findings(run, args)
                load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
                print(f"\nLoad average at the end: {load}")
                met = summary(found, len(run.answers))
            finally:
                if ups is not None and ups.dead is not None:
                    ups.dead.close()
                for proc in reversed(procs):
                    stop(proc)
                with contextlib.suppress(Exception):
                    clear_cache()
                if given_database and fixtures is not None:
                    from credentials.models import APIKeyCredentials

                    if fallback_id:
                        APIKeyCredentials.objects.filter(pk=fallback_id).delete()
                    remove_fixtures(fixtures)
    if not met:
        sys.exit(1)


def dump(run: Run, path: Path) -> None:
    """The raw record of the run, times in seconds since the start of the drive."""
    events = {"kill": run.kill, "dead_bound": run.dead_bound, "revive": run.revive}
    record = {
        "events": {**events, "back": run.back, "end": run.end},
        "knocks": run.knocks,
        "breaker_state": run.breaker,
        "answers": [asdict(answer) for answer in run.answers],
    }
    path.write_text(json.dumps(record))


def header(args: argparse.Namespace, p_port: int, f_port: int, load: tuple[float, ...]) -> None:
    from django.db import connection

    print(f"Machine: {machine()}; load average before: {', '.join(f'{x:.2f}' for x in load)}")
    print(f"Versions: {versions()}")
    print(
        f"Upstreams: tests/upstream.py, {args.delay:g} s an answer: P on :{p_port} "
        f"(credential A), F on :{f_port} (credential B, A's fallback)"
    )
    print(
        f"Server: the site under uvicorn, {WORKERS} workers, uvloop + httptools; cache: Redis "
        f"db 14; database: {connection.vendor}; LLM_BREAKER_FAILURES={FAILURES}, "
        f"LLM_BREAKER_COOLDOWN_SECONDS={args.cooldown:g}, "
        f"LLM_BREAKER_REFRESH_SECONDS={REFRESH:g}, LLM_MAX_RETRIES=0, "
        f"LLM_CONNECT_TIMEOUT_SECONDS={CONNECT_TIMEOUT:g}"
    )
    print(
        f"Load: {args.clients} clients (aiohttp, this process) looping on POST /api/llm/chat "
        f"with A for {args.duration:g} s; P killed (SIGKILL, then a DeadPort on its port) at "
        f"{args.kill_at:g} s, started again at {args.revive_at:g} s\n"
    )


def report(
    args: argparse.Namespace,
    run: Run,
    samples: list[tuple[str, dict[str, str], float]],
    names: dict[str, str],
) -> None:
    table(phases(run, args.duration))
    for sample in run.error_samples:
        print(f"  e.g. {sample}")
    timeline(run, findings(run, args), args.cooldown)
    print_metrics(samples, names)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\nInterrupted; the upstreams and the server are stopped.", file=sys.stderr)
        sys.exit(130)
