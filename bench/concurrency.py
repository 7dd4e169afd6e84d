"""Throughput of the site under many clients, next to its ceilings, in one run.

    python bench/concurrency.py [--levels 100,200,500] [--duration 10] [--delay 1.0]
                                [--repeats 1] [--only ENDPOINT|breaker|limits]

Starts, each in its own process on 127.0.0.1: tests/upstream.py answering every chat
completion after --delay seconds with a cost (x-litellm-response-cost, as LiteLLM sends:
`python bench/limits.py slow`), and the same without a cost for chat-priced; the site
under uvicorn (1 worker, uvloop, httptools, as `make serve` runs it; DEBUG=false,
LLM_MAX_RETRIES=0; the circuit breaker on, as by default); a second site process, the
same with the breaker off (LLM_BREAKER_FAILURES=0); and bench/bare_app.py under uvicorn
with the same flags: a bare ASGI app, no Django, making the site's SDK call
(`chat.completions.with_raw_response.create`, then `.parse()`) with the site's client
settings against the same upstream with the same fake key. A temporary SQLite database
(or DATABASE_URL, when set: the rows made are removed afterwards) holds a user with a
session and credentials of theirs pointing at the upstream; both site processes use
them. The cache is CACHE_URL's, in this process and the servers alike (local memory when
unset; CACHE_URL=redis://127.0.0.1:6379/14 for Redis, as production runs).

Spend control (issue 11) is measured on the first site process, by credential:
"chat-limits" is chat through a credential with spend control configured (bench/limits.py:
an allow-list matched by a pattern, a monthly budget and a cap per user, requests and
tokens per minute for the credential and per user, none ever reached), "chat-priced" the
same through a credential whose upstream sends no cost, so the price table (a thousand
exact rows and 20 patterns) prices every answer. After the run, the spend counters are
compared with the usage records (with Redis they are read from Redis, which shows that
the server counted there).

At each level, N virtual clients (an aiohttp load generator in this process, one
ClientSession per phase with a connector limit of N) loop for --warmup + --duration
seconds, first on POST /api/llm/chat (session cookie, CSRF cookie and X-CSRFToken, as
the playground sends them), then the same on the breaker-off process ("chat-off"; the
two run back to back, which goes first alternating from level to level, so that machine
noise hits both alike), then on GET /healthz (no database, no upstream): the ceiling of
this server on this machine, then on POST /v1/chat of the bare app (the same JSON body
less the credential): the reference row "(r)", the ceiling of the same SDK call without
Django. Only requests that end inside the measured window count toward requests/s and
latency; errors (non-200 answers, exceptions) count over the whole phase.
Per phase it also prints the CPU time per answered request of the process driven and the
most threads it had (both from /proc), and per level chat/ceiling, chat/(r) and the
breaker's cost: chat/chat-off in answers/s and in CPU per answer, and spend control's:
chat-limits/chat and chat-priced/chat. The chats run back to back at each level, their
order turning from level to level (and repeat to repeat: --repeats runs each level
again, and the ratios are the median of the repeats').

Targets at the largest level (500 by default): 0 chat errors, chat >= 300 answers/s,
chat >= 60% of (r), chat/chat-off >= 0.97 in answers/s (checking the breaker puts no
thread hop or round trip on a call), chat-limits/chat and chat-priced/chat >= 0.95 in
answers/s (spend control within 5%); the exit status is 1 when they are missed. With
--only they are not checked, except --only breaker (chat and chat-off alone), which
checks chat/chat-off, and --only limits (chat, chat-limits, chat-priced), which checks
spend control's. The whole default run takes about 4 minutes (18 phases of 12 s);
`--only limits --levels 500 --repeats 3` about 2.5. The processes started are stopped
on the way out, Ctrl-C included.

A LiteLLM proxy row (the same call through a real proxy) is planned once the project has
a proxy test environment (a later issue); it is not measured yet.

To measure a change without editing the site: --settings names another settings module
and --app another ASGI application (e.g. a module on PYTHONPATH that imports
platform_site.settings and overrides MIDDLEWARE). --py-spy PREFIX records each measured
window with py-spy (pip install py-spy; not a requirement) into PREFIX-<endpoint>-<N>.txt
and prints where the samples went by step of the request; py-spy takes CPU from the
same cores, so quote the numbers of a run without it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(1, str(PROJECT / "bench"))  # its sibling scripts

import limits as spend  # noqa: E402 (after the path is set)

KEY = "sk-test-fake-bench-concurrency-0001"
MODEL = "gpt-test-mini"
CHAT_BODY = (
    b'{"model": "%s", "messages": [{"role": "user", "content": "ping"}], "credential": "%s"}'
)
# The bare app routes by its environment, not by a credential: the same body less that.
BARE_BODY = b'{"model": "%s", "messages": [{"role": "user", "content": "ping"}]}'
BARE_APP = "bare_app:app"  # served with --app-dir bench: nothing of the project on its path
ENDPOINTS = ("chat", "chat-off", "chat-limits", "chat-priced", "healthz", "bare")
# --only takes an endpoint, or one of these groups.
GROUPS = {"breaker": ("chat", "chat-off"), "limits": ("chat", "chat-limits", "chat-priced")}
# chat-off: the same chat on a second site process with the circuit breaker off;
# chat-limits and chat-priced: the first process, through credentials with spend control.
SERVED_BY = {
    "chat": "site",
    "chat-off": "site-off",
    "chat-limits": "site",
    "chat-priced": "site",
    "healthz": "site",
    "bare": "bare",
}
# The endpoints answered with the site's chat, and the credential each uses.
CREDENTIAL_OF = {
    "chat": "chat",
    "chat-off": "chat",
    "chat-limits": "chat-limits",
    "chat-priced": "chat-priced",
}
CHATS = tuple(CREDENTIAL_OF)
SPEND_CONTROLLED = ("chat-limits", "chat-priced")
LABELS = {"bare": "bare (r)"}  # the reference row of the table
TARGET_ERRORS = 0
TARGET_RATE = 300.0  # chat answers/s at the largest level
TARGET_BARE_SHARE = 0.60  # chat/(r) at the largest level
TARGET_BREAKER_SHARE = 0.97  # chat/chat-off (breaker on/off) at the largest level
TARGET_LIMITS_SHARE = 0.95  # chat-limits/chat and chat-priced/chat at the largest level
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---- setup -----------------------------------------------------------------------------


def setup_django(
    tmp: Path, database_url: str | None, settings_module: str = "platform_site.settings"
) -> dict[str, str]:
    """Settings for this process and the server's; migrations run. Returns the env."""
    from cryptography.fernet import Fernet

    os.environ.update(
        ENV_FILE=os.devnull,
        SECRET_KEY="bench-only-not-a-secret",  # noqa: S106
        CREDENTIALS_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        DATABASE_URL=database_url or f"sqlite:///{tmp / 'bench.sqlite3'}",
        DEBUG="false",
        ALLOWED_HOSTS="127.0.0.1",
        LLM_MAX_RETRIES="0",
        LOG_LEVEL="WARNING",
        # Plain HTTP on loopback, as behind a TLS-terminating proxy.
        SECURE_SSL_REDIRECT="false",
        DJANGO_SETTINGS_MODULE=settings_module,
    )
    # chat runs as the site does by default, the breaker on; chat-off sets it to 0.
    os.environ.pop("LLM_BREAKER_FAILURES", None)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    return dict(os.environ)


@dataclass(frozen=True)
class Fixtures:
    user_id: int
    session_key: str
    credentials: dict[str, str]  # the credential id of each chat endpoint
    headers: dict[str, str]  # cookies and CSRF header, as a signed-in browser sends them
    prices: list[int]  # the price rows made for chat-priced

    @property
    def credential_id(self) -> str:
        return self.credentials["chat"]


def make_fixtures(
    upstream_url: str, plain_url: str | None = None, *, limited: bool = False
) -> Fixtures:
    """A user signed in (a session row), a credential of theirs (chat's), a CSRF token
    pair; with `limited`, a credential with spend control (chat-limits'), and with
    `plain_url` (an upstream that sends no cost) one more and the price table
    (chat-priced')."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.http import HttpRequest
    from django.middleware.csrf import get_token
    from django.test import Client

    from credentials.models import APIKeyCredentials

    user = get_user_model().objects.create_user(
        username=f"bench-concurrency-{os.getpid()}-{int(time.time())}"
    )
    made: dict[str, tuple[str, str, dict[str, Any]]] = {
        "chat": ("Bench concurrency", upstream_url, {})
    }
    if limited:
        made["chat-limits"] = ("Bench concurrency, limits", upstream_url, spend.SPEND_CONTROL)
    if plain_url:
        made["chat-priced"] = ("Bench concurrency, priced", plain_url, spend.SPEND_CONTROL)
    credentials = {}
    for endpoint, (title, base_url, spend_control) in made.items():
        credential = APIKeyCredentials(
            title=title, api_key=KEY, base_url=base_url, owner=user, **spend_control
        )
        credential.full_clean()
        credential.save()
        credentials[endpoint] = str(credential.pk)
    browser = Client()
    browser.force_login(user)
    session_key = browser.cookies[settings.SESSION_COOKIE_NAME].value
    # get_token makes a secret (the cookie) and a masked token (the header) for it.
    page = HttpRequest()
    header_token = get_token(page)
    cookie_token = page.META["CSRF_COOKIE"]
    cookie = (
        f"{settings.SESSION_COOKIE_NAME}={session_key}; {settings.CSRF_COOKIE_NAME}={cookie_token}"
    )
    return Fixtures(
        user_id=user.pk,
        session_key=session_key,
        credentials=credentials,
        headers={"Cookie": cookie, "X-CSRFToken": header_token},
        prices=spend.add_price_table() if plain_url else [],
    )


def remove_fixtures(fixtures: Fixtures) -> None:
    """Leave a database that was given (DATABASE_URL) as it was, less the usage rows."""
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.models import Session

    from credentials.models import APIKeyCredentials
    from llm.models import UsageRecord

    UsageRecord.objects.filter(user_id=fixtures.user_id).delete()
    APIKeyCredentials.objects.filter(pk__in=fixtures.credentials.values()).delete()
    spend.remove_price_table(fixtures.prices)
    Session.objects.filter(session_key=fixtures.session_key).delete()
    get_user_model().objects.filter(pk=fixtures.user_id).delete()


def usage_rows(fixtures: Fixtures) -> int:
    from llm.models import UsageRecord

    return UsageRecord.objects.filter(user_id=fixtures.user_id, outcome="ok").count()


# ---- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if this benchmark dies (even SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            args,
            cwd=PROJECT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not start within 30 s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def running(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Terminates every process started, also on Ctrl-C and SIGTERM."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        for proc in reversed(procs):
            stop(proc)
        signal.signal(signal.SIGTERM, previous)


Service = tuple[subprocess.Popen[bytes], Callable[[], bool], str]


def start_upstream(env: dict[str, str], delay: float, log: Path, *, cost: bool = True) -> Service:
    """tests/upstream.py; its answers carry a cost (bench/limits.py), unless not `cost`."""
    port = free_port()
    if cost:
        args = [sys.executable, str(PROJECT / "bench" / "limits.py"), "slow", str(port), str(delay)]
    else:
        args = [sys.executable, "-m", "tests.upstream", "--port", str(port), "--delay", str(delay)]
    proc = spawn(args, env, log)

    def ready() -> bool:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True

    return proc, ready, f"http://127.0.0.1:{port}/v1"


def start_uvicorn(env: dict[str, str], app: str, log: Path, app_dir: str | None = None) -> Service:
    """`app` under uvicorn as `make serve` runs the site; ready once GET /healthz is 200."""
    port = free_port()
    args = [
        *(sys.executable, "-m", "uvicorn", app),
        *(("--app-dir", app_dir) if app_dir else ()),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--loop", "uvloop", "--http", "httptools", "--no-access-log"),
    ]
    proc = spawn(args, env, log)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        with urllib.request.urlopen(f"{base}/healthz", timeout=1) as answer:  # noqa: S310
            return bool(answer.status == 200)

    return proc, ready, base


def start_site(env: dict[str, str], app: str, log: Path) -> Service:
    return start_uvicorn(env, app, log)


def start_bare(env: dict[str, str], upstream_url: str, log: Path) -> Service:
    """bench/bare_app.py, to the same upstream with the same key as the site's credential."""
    bare_env = {**env, "BARE_BASE_URL": upstream_url, "BARE_API_KEY": KEY}
    return start_uvicorn(bare_env, BARE_APP, log, app_dir=str(PROJECT / "bench"))


# ---- /proc -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def threads(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def versions() -> str:
    names = ("Django", "uvicorn", "uvloop", "httptools", "openai", "aiohttp", "asgiref")
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join(found)


# ---- load ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    endpoint: str  # one of ENDPOINTS
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None = None


@dataclass
class Phase:
    target: Target
    clients: int
    window: float
    latencies: list[float] = field(default_factory=list)  # seconds, answered in the window
    errors: Counter[str] = field(default_factory=Counter)  # over the whole phase
    answered: int = 0  # 200s over the whole phase
    server_cpu: float = float("nan")  # CPU seconds in the window
    upstream_cpu: float = float("nan")
    bench_cpu: float = float("nan")
    max_threads: int = 0
    repeat: int = 0  # which run of its level (--repeats)
    profile: str | None = None  # py-spy's raw stacks of the window

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.window

    def percentile(self, share: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.server_cpu / len(self.latencies) if self.latencies else float("nan")


@dataclass(frozen=True)
class Watched:
    servers: dict[str, int]  # endpoint -> pid of the process answering it
    upstreams: tuple[int, ...]
    py_spy: str | None  # output prefix, when profiling

    def server(self, endpoint: str) -> int:
        return self.servers[endpoint]


async def drive(
    target: Target, clients: int, warmup: float, duration: float, timeout: float, watched: Watched
) -> Phase:
    """`clients` loops of one request after another; measures [warmup, warmup+duration)."""
    phase = Phase(target, clients, duration)
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=0)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        started = time.perf_counter()
        measure_from, stop_at = started + warmup, started + warmup + duration

        async def client() -> None:
            while (sent := time.perf_counter()) < stop_at:
                try:
                    async with session.request(
                        target.method, target.url, data=target.body, headers=target.headers
                    ) as answer:
                        await answer.read()
                        error = None if answer.status == 200 else f"HTTP {answer.status}"
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    error = type(exc).__name__
                done = time.perf_counter()
                if error:
                    phase.errors[error] += 1
                    await asyncio.sleep(0.01)  # a refused connection must not spin
                    continue
                phase.answered += 1
                if measure_from <= done < stop_at:
                    phase.latencies.append(done - sent)

        async def watch() -> None:
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            # The process driven in this phase: the site, or the bare app for "bare".
            server = watched.server(target.endpoint)
            profiler = start_py_spy(watched, target.endpoint, clients, duration)
            cpu = (
                cpu_seconds(server),
                sum(map(cpu_seconds, watched.upstreams)),
                own_cpu_seconds(),
            )
            while (now := time.perf_counter()) < stop_at:
                phase.max_threads = max(phase.max_threads, threads(server))
                await asyncio.sleep(min(0.25, stop_at - now))
            phase.server_cpu = cpu_seconds(server) - cpu[0]
            phase.upstream_cpu = sum(map(cpu_seconds, watched.upstreams)) - cpu[1]
            phase.bench_cpu = own_cpu_seconds() - cpu[2]
            if profiler is not None:
                await asyncio.to_thread(profiler.wait)
                phase.profile = profile_path(watched, target.endpoint, clients)

        await asyncio.gather(watch(), *(client() for _ in range(clients)))
    return phase


def profile_path(watched: Watched, endpoint: str, clients: int) -> str:
    return f"{watched.py_spy}-{endpoint}-{clients}.txt"


def start_py_spy(
    watched: Watched, endpoint: str, clients: int, duration: float
) -> subprocess.Popen[bytes] | None:
    if watched.py_spy is None:
        return None
    output = profile_path(watched, endpoint, clients)
    pid = watched.server(endpoint)
    args = ["py-spy", "record", "--pid", str(pid), "--duration", str(int(duration))]
    # --gil: only the thread running Python is sampled, i.e. where the interpreter's one
    # core goes; --nonblocking: the server is not paused (it has a thread per request).
    args += ["--rate", "100", "--gil", "--nonblocking", "--format", "raw", "-o", output]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# What each sampled stack was doing: the innermost frame naming a step of the request
# wins; stacks naming none go to the first mechanism that matches, leaf first.
STEPS = [
    ("usage record", ("llm/usage.py", "UsageRecord")),
    ("session load", ("sessions/backends", "SessionBase", "_aget_user_session_key")),
    ("user load (auth)", ("aget_user", "get_user (django/contrib/auth", "ModelBackend")),
    ("credential query", ("ausable_credential", "usable_credential", "credential_for")),
    ("CSRF check", ("CsrfViewMiddleware",)),
    ("JSON parse + validation", ("parse_json", "chat_request")),
    ("route + client lease", ("resolve_route", "llm/clients.py")),
    ("OpenAI SDK + HTTP client", ("openai/", "httpx2/", "aiohttp/", "pydantic", "multidict")),
    (
        "response (JSON, send)",
        ("JsonResponse", "result_json", "send_response", "ResponseCycle.send"),
    ),
]
MECHANISMS = [
    ("DB connection open/close", ("get_new_connection", "close_old_connections", "ensure_conn")),
    ("ORM query in a worker thread", ("django/db/",)),
    (
        "thread start/join (per request)",
        ("Thread.start", "shutdown (concurrent", "_adjust_thread_count", ".join (asgiref"),
    ),
    (
        "thread hops (sync_to_async)",
        ("asgiref/", "concurrent/futures", "threading.py", "futures.py", "_call_set_state"),
    ),
    (
        "uvicorn + handler (Django or bare app)",
        ("uvicorn/", "django/", "whitenoise/", "asyncio/", "llm/", "bare_app"),
    ),
]


def breakdown(path: str, top: int = 12) -> list[tuple[str, float]]:
    """Shares of the samples (py-spy --gil: CPU in Python) by step of the request."""
    counts: Counter[str] = Counter()
    with open(path) as stacks:
        for line in stacks:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")[1:][::-1]  # leaf first, thread name dropped
            counts[_category(frames)] += int(count)
    total = sum(counts.values()) or 1
    return [(name, n / total) for name, n in counts.most_common(top)]


def _category(frames: list[str]) -> str:
    for rules in (STEPS, MECHANISMS):
        for frame in frames:
            for name, needles in rules:
                if any(needle in frame for needle in needles):
                    return name
    return "other"


async def smoke_test(target: Target) -> None:
    """One request before the load: a setup problem fails here, with its answer."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.request(
            target.method, target.url, data=target.body, headers=target.headers
        ) as answer,
    ):
        text = await answer.text()
        if answer.status != 200:
            raise SystemExit(f"{target.method} {target.url} answered {answer.status}: {text[:500]}")


# ---- report ----------------------------------------------------------------------------

HEAD = (
    f"{'clients':>7} {'endpoint':<11} {'req/s':>7} {'ideal':>6} {'of ideal':>8} {'errors':>6}"
    f" {'p50 ms':>7} {'p99 ms':>7} {'srv CPU':>7} {'CPU ms/req':>10} {'threads':>7}"
)


def label(endpoint: str) -> str:
    return LABELS.get(endpoint, endpoint)


def row(phase: Phase, delay: float) -> str:
    ideal_text = f"{'-':>6} {'-':>8}"
    if phase.target.endpoint != "healthz" and delay > 0:  # chat and bare wait on the upstream
        ideal = phase.clients / delay
        ideal_text = f"{ideal:>6.0f} {phase.rate / ideal:>8.1%}"
    return (
        f"{phase.clients:>7} {label(phase.target.endpoint):<11} {phase.rate:>7.1f} {ideal_text}"
        f" {sum(phase.errors.values()):>6} {phase.percentile(0.5) * 1000:>7.0f}"
        f" {phase.percentile(0.99) * 1000:>7.0f} {phase.server_cpu / phase.window:>7.0%}"
        f" {phase.cpu_ms_per_request:>10.2f} {phase.max_threads:>7}"
    )


def report(phases: dict[str, Phase], delay: float) -> None:
    for phase in phases.values():
        print(row(phase, delay))
    notes = []
    if "chat" in phases and "healthz" in phases:
        notes.append(f"chat/ceiling {share(phases['chat'], phases['healthz']):.1%}")
    if "chat" in phases and "bare" in phases:
        notes.append(f"chat/(r) {share(phases['chat'], phases['bare']):.1%}")
    if "chat" in phases and "chat-off" in phases:
        on, off = phases["chat"], phases["chat-off"]
        cpu = on.cpu_ms_per_request / off.cpu_ms_per_request if off.server_cpu else float("nan")
        notes.append(f"breaker on/off: answers/s {share(on, off):.3f}, CPU ms/answer {cpu:.3f}")
    for name in SPEND_CONTROLLED:
        if "chat" in phases and name in phases:
            on, off = phases[name], phases["chat"]
            notes.append(
                f"{name}/chat: answers/s {share(on, off):.3f}, "
                f"CPU ms/answer {cpu_share(on, off):.3f}"
            )
    load = " / ".join(f"{p.bench_cpu / p.window:.0%}" for p in phases.values())
    upstream = " / ".join(f"{p.upstream_cpu / p.window:.0%}" for p in phases.values())
    notes.append(f"CPU of one core: load generator {load}, upstream {upstream}")
    print(f"{'':>16}{'; '.join(notes)}")
    for phase in phases.values():
        name = label(phase.target.endpoint)
        if phase.errors:
            kinds = ", ".join(f"{kind} x{count}" for kind, count in phase.errors.most_common())
            print(f"{'':>16}{name} errors: {kinds}")
        if phase.profile:
            print(f"{'':>16}{name} profile ({phase.profile}), share of samples:")
            for step, part in breakdown(phase.profile):
                print(f"{'':>18}{part:6.1%}  {step}")


def share(phase: Phase, reference: Phase) -> float:
    return phase.rate / reference.rate if reference.rate else 0.0


def cpu_share(phase: Phase, reference: Phase) -> float:
    """CPU per answer of `phase` over `reference`'s."""
    mine, theirs = phase.cpu_ms_per_request, reference.cpu_ms_per_request
    return mine / theirs if theirs and theirs == theirs else float("nan")


def median_of(repeats: list[dict[str, Phase]], value: Callable[[dict[str, Phase]], float]) -> float:
    return statistics.median(value(phases) for phases in repeats)


def summary(repeats: list[dict[str, Phase]]) -> bool:
    """The targets, at the largest level, of the endpoints driven: 0 chat errors, a chat
    rate and a share of (r) (when chat and bare were driven); chat/chat-off (when both);
    chat-limits/chat and chat-priced/chat (when driven). With several repeats, rates and
    ratios are the median of the repeats', errors their sum."""
    checks = []
    phases = repeats[-1]
    many = f" (median of {len(repeats)} repeats)" if len(repeats) > 1 else ""
    chat = phases.get("chat")
    if chat is not None and "bare" in phases:
        errors = sum(sum(p["chat"].errors.values()) for p in repeats)
        rate = median_of(repeats, lambda p: p["chat"].rate)
        of_bare = median_of(repeats, lambda p: share(p["chat"], p["bare"]))
        checks += [
            (errors <= TARGET_ERRORS, f"chat errors {errors} (target {TARGET_ERRORS})"),
            (rate >= TARGET_RATE, f"chat {rate:.1f} answers/s{many} (target >= {TARGET_RATE:g})"),
            (
                of_bare >= TARGET_BARE_SHARE,
                f"chat/(r) {of_bare:.1%}{many} (target >= {TARGET_BARE_SHARE:.0%})",
            ),
        ]
    if chat is not None and "chat-off" in phases:
        ratio = median_of(repeats, lambda p: share(p["chat"], p["chat-off"]))
        checks.append(
            (
                ratio >= TARGET_BREAKER_SHARE,
                f"chat/chat-off (breaker on/off) {ratio:.3f} in answers/s{many} "
                f"(target >= {TARGET_BREAKER_SHARE:g})",
            )
        )
    for name in SPEND_CONTROLLED:
        if chat is None or name not in phases:
            continue
        ratios = [share(p[name], p["chat"]) for p in repeats]
        ratio = statistics.median(ratios)
        cpu = median_of(repeats, lambda p, name=name: cpu_share(p[name], p["chat"]))  # type: ignore[misc]
        errors = sum(sum(p[name].errors.values()) for p in repeats)
        shown = " ".join(f"{r:.3f}" for r in ratios)
        checks += [
            (
                ratio >= TARGET_LIMITS_SHARE,
                f"{name}/chat (spend control) {ratio:.3f} in answers/s{many} "
                f"(target >= {TARGET_LIMITS_SHARE:g}; by repeat: {shown}; CPU per answer "
                f"{cpu:.3f} of chat's)",
            ),
            (errors <= TARGET_ERRORS, f"{name} errors {errors} (target {TARGET_ERRORS})"),
        ]
    clients = next(iter(phases.values())).clients
    print(f"\nAt {clients} in flight (server CPU per answer in brackets){many}:")
    for endpoint in phases:
        rate = median_of(repeats, lambda p, e=endpoint: p[e].rate)  # type: ignore[misc]
        cpu = median_of(repeats, lambda p, e=endpoint: p[e].cpu_ms_per_request)  # type: ignore[misc]
        errors = sum(sum(p[endpoint].errors.values()) for p in repeats)
        print(f"  {label(endpoint)}: {rate:.1f} answers/s ({cpu:.2f} ms), {errors} errors")
    if chat is not None and "healthz" in phases:
        print(f"  chat/ceiling {share(chat, phases['healthz']):.1%} (no target)")
    if chat is not None and "chat-off" in phases:
        off = phases["chat-off"]
        print(
            f"  breaker on/off: {chat.rate:.1f}/{off.rate:.1f} answers/s, "
            f"p50 {chat.percentile(0.5) * 1000:.0f}/{off.percentile(0.5) * 1000:.0f} ms, "
            f"p99 {chat.percentile(0.99) * 1000:.0f}/{off.percentile(0.99) * 1000:.0f} ms, "
            f"CPU {chat.cpu_ms_per_request:.2f}/{off.cpu_ms_per_request:.2f} ms an answer"
            + (" (last repeat)" if many else "")
        )
    return verdict(checks)


def verdict(checks: list[tuple[bool, str]]) -> bool:
    """Print each target as ok or MISSED, then whether all were met (the benches' ending)."""
    for ok, text in checks:
        print(f"  {'ok    ' if ok else 'MISSED'} {text}")
    met = all(ok for ok, _ in checks)
    print(f"  targets {'met' if met else 'NOT met'}")
    return met


# ---- main ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--levels", default="100,200,500", help="concurrent clients, comma-separated"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds a phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--delay", type=float, default=1.0, help="upstream seconds per answer")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request")
    parser.add_argument(
        "--repeats", type=int, default=1, help="times each level runs (ratios: their median)"
    )
    parser.add_argument(
        "--only",
        choices=(*ENDPOINTS, *GROUPS),
        help="drive one endpoint only; breaker: chat and chat-off (the breaker on and off); "
        "limits: chat, chat-limits and chat-priced (spend control)",
    )
    parser.add_argument(
        "--settings",
        default="platform_site.settings",
        help="settings module of the server and the setup (to measure a change of settings)",
    )
    parser.add_argument(
        "--app",
        default="platform_site.asgi:application",
        help="the ASGI application uvicorn serves",
    )
    parser.add_argument(
        "--py-spy",
        metavar="PREFIX",
        help="record each measured window with py-spy (on PATH) into PREFIX-<endpoint>-<N>.txt",
    )
    args = parser.parse_args()
    try:
        args.levels = [int(level) for level in args.levels.split(",") if level.strip()]
    except ValueError:
        args.levels = []
    if not args.levels or min(args.levels) < 1:
        parser.error("--levels takes positive whole numbers, e.g. 100,200,500")
    if args.duration <= 0 or args.warmup < 0 or args.delay < 0:
        parser.error("--duration must be > 0, --warmup and --delay >= 0")
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    if args.py_spy and shutil.which("py-spy") is None:
        parser.error("--py-spy needs py-spy on PATH (pip install py-spy)")
    return args


def main() -> None:
    args = parse_args()
    args.load_before = " ".join(f"{load:.2f}" for load in os.getloadavg())
    chosen = GROUPS.get(args.only, (args.only,)) if args.only else ENDPOINTS
    endpoints = [e for e in ENDPOINTS if e in chosen]
    given_database = os.environ.get("DATABASE_URL", "").strip() or None
    with tempfile.TemporaryDirectory(prefix="keyroute-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = setup_django(tmp, given_database, args.settings)
        procs: list[subprocess.Popen[bytes]] = []
        with running(procs):
            upstream, upstream_ready, upstream_url = start_upstream(
                env, args.delay, tmp / "upstream.log"
            )
            procs.append(upstream)
            wait_until(upstream_ready, upstream, "the upstream", tmp / "upstream.log")
            upstreams, plain_url = [upstream.pid], None
            if "chat-priced" in endpoints:
                plain, plain_ready, plain_url = start_upstream(
                    env, args.delay, tmp / "plain.log", cost=False
                )
                procs.append(plain)
                upstreams.append(plain.pid)
                wait_until(plain_ready, plain, "the upstream without a cost", tmp / "plain.log")
            fixtures = make_fixtures(upstream_url, plain_url, limited="chat-limits" in endpoints)
            try:
                servers = start_servers(args, env, upstream_url, endpoints, tmp, procs)
                pids = {e: servers[SERVED_BY[e]].proc.pid for e in endpoints}
                watched = Watched(pids, tuple(upstreams), args.py_spy)
                results = run(args, fixtures, servers, watched, endpoints)
                wrap_up(servers, results, fixtures)
            finally:
                for proc in procs:
                    stop(proc)
                spend.forget_counters(list(map(uuid.UUID, fixtures.credentials.values())))
                if given_database:
                    remove_fixtures(fixtures)
    largest = [
        {p.target.endpoint: p for p in results if p.clients == args.levels[-1] and p.repeat == n}
        for n in range(args.repeats)
    ]
    if args.only in (None, *GROUPS) and not summary(largest):
        sys.exit(1)


@dataclass(frozen=True)
class Server:
    proc: subprocess.Popen[bytes]
    base: str  # http://127.0.0.1:PORT
    log: Path


def start_servers(
    args: argparse.Namespace,
    env: dict[str, str],
    upstream_url: str,
    endpoints: list[str],
    tmp: Path,
    procs: list[subprocess.Popen[bytes]],
) -> dict[str, Server]:
    """The site (breaker on and off) and the bare app, each only when a phase drives it:
    --only bare needs no site, so it still measures (r) while the site cannot start."""
    off_env = {**env, "LLM_BREAKER_FAILURES": "0"}
    starters: dict[str, Callable[[Path], Service]] = {
        "site": lambda log: start_site(env, args.app, log),
        "site-off": lambda log: start_site(off_env, args.app, log),
        "bare": lambda log: start_bare(env, upstream_url, log),
    }
    servers: dict[str, Server] = {}
    for name in dict.fromkeys(SERVED_BY[e] for e in endpoints):
        log = tmp / f"{name}.log"
        proc, ready, base = starters[name](log)
        procs.append(proc)
        wait_until(ready, proc, f"uvicorn ({name})", log)
        servers[name] = Server(proc, base, log)
    return servers


def wrap_up(servers: dict[str, Server], results: list[Phase], fixtures: Fixtures) -> None:
    """Stops the servers, then says what they left: usage rows, a log when something failed."""
    for server in servers.values():
        stop(server.proc)  # uvicorn exits cleanly: the site's usage buffer is flushed at exit
    # Both site processes record the same user's chats: one count for the two.
    chats = [p for p in results if p.target.endpoint in CHATS]
    if chats:
        smoke_tests = len({p.target.endpoint for p in chats})
        answered = smoke_tests + sum(p.answered for p in chats)
        driven = " and ".join(dict.fromkeys(p.target.endpoint for p in chats))
        print(f"  usage records written: {usage_rows(fixtures)} for {answered} {driven} answers")
    for endpoint in SPEND_CONTROLLED:
        if any(p.target.endpoint == endpoint for p in results):
            print(f"  {endpoint}: {spend_text(fixtures.credentials[endpoint])}")
    for name, server in servers.items():
        phases = [p for p in results if SERVED_BY[p.target.endpoint] == name]
        code = server.proc.returncode
        if any(p.errors for p in phases) or code not in (0, -signal.SIGTERM):
            print(f"\nuvicorn ({name}) exited with {code}; its log ends with:")
            print(tail(server.log))
        elif logged := log_messages(server.log):
            # LOG_LEVEL=WARNING: what the site logged is what went wrong (a cache that did
            # not answer, a flush that failed), even when every request was answered.
            count = sum(logged.values())
            print(f"  uvicorn ({name}) logged {count} message{'s' if count > 1 else ''}:")
            for message, count in logged.most_common(5):
                print(f"    {count} x {message[:200]}")


def log_messages(log: Path) -> Counter[str]:
    """The site's log lines, less uvicorn's own and the lines of tracebacks."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return Counter()
    skipped = ("INFO:", " ", "Traceback", "The above exception", "During handling")
    return Counter(line for line in lines if line.strip() and not line.startswith(skipped))


def spend_text(credential_id: str) -> str:
    """The credential's spend counter next to its usage records: equal when the server
    counted in the cache this process reads (Redis), unreadable with local memory."""
    from llm.models import CostSource, UsageRecord

    counter, records = spend.spent(uuid.UUID(credential_id))
    rows = UsageRecord.objects.filter(credential_id=uuid.UUID(credential_id), outcome="ok")
    priced = rows.filter(cost_source=CostSource.PRICE_TABLE).count()
    where = f"{priced} of {rows.count()} answers priced by the price table"
    if counter is None:
        return (
            f"usage records ${records}; the spend counter is in the server's memory "
            f"(local-memory cache); {where}"
        )
    agree = "equal" if counter == records else "DIFFERENT"
    return f"spend counter (shared cache) ${counter}, usage records ${records}: {agree}; {where}"


def make_target(endpoint: str, base: str, fixtures: Fixtures) -> Target:
    json_body = {"Content-Type": "application/json"}
    if endpoint in CHATS:
        credential_id = fixtures.credentials[CREDENTIAL_OF[endpoint]]
        body = CHAT_BODY % (MODEL.encode(), credential_id.encode())
        headers = {**fixtures.headers, **json_body}
        return Target(endpoint, "POST", f"{base}/api/llm/chat", headers, body)
    if endpoint == "healthz":
        return Target("healthz", "GET", f"{base}/healthz", fixtures.headers)
    # No cookies: the bare app has no session or CSRF to check.
    return Target("bare", "POST", f"{base}/v1/chat", json_body, BARE_BODY % MODEL.encode())


def run(
    args: argparse.Namespace,
    fixtures: Fixtures,
    servers: dict[str, Server],
    watched: Watched,
    endpoints: list[str],
) -> list[Phase]:
    """Every level: chat and chat-off, its ceiling, then (r); prints the table as it goes."""
    targets = [make_target(e, servers[SERVED_BY[e]].base, fixtures) for e in endpoints]
    from django.conf import settings
    from django.db import connection

    print(f"Machine: {machine()}")
    print(f"Versions: {versions()}")
    print(f"Load average before the run: {args.load_before}")
    print(
        f"Upstream: tests/upstream.py, {args.delay:g} s an answer, with a cost "
        f"(x-litellm-response-cost {spend.COST})"
        + ("; chat-priced's without a cost" if "chat-priced" in endpoints else "")
    )
    print(f"Cache: {spend.cache_text()}")
    if "site" in servers or "site-off" in servers:
        print(
            f"Server: {args.app} under uvicorn, 1 worker, uvloop + httptools; "
            f"database: {connection.vendor}"
        )
    if "site-off" in servers:
        print(
            "chat-off: the same chat on a second site process (same flags, same database) "
            "with the circuit breaker off (LLM_BREAKER_FAILURES=0); chat's has it on "
            f"(LLM_BREAKER_FAILURES={settings.LLM_BREAKER_FAILURES}); the two run back to "
            "back, which goes first alternating by level"
        )
    if any(e in SPEND_CONTROLLED for e in endpoints):
        print(
            "chat-limits, chat-priced: chat on the first site process through credentials "
            f"with {spend.describe()}; chat-priced's answers carry no cost: "
            f"{spend.price_table_text()}"
        )
    if "bare" in servers:
        print(
            "Reference (r): bench/bare_app.py under uvicorn with the same flags, no Django: "
            "the same SDK call and client settings, to the same upstream"
        )
    print(
        f"Per phase: {args.warmup:g} s warm-up + {args.duration:g} s measured; load generator: "
        "aiohttp in this process; CPU from /proc (of the process driven), "
        "ideal = clients / delay\n"
    )
    for target in targets:
        asyncio.run(smoke_test(target))
    print(HEAD)
    results: list[Phase] = []
    number = 0
    for clients in args.levels:
        for repeat in range(args.repeats):
            driven = {
                t.endpoint: run_phase(t, clients, args, watched) for t in order(targets, number)
            }
            number += 1
            phases = {t.endpoint: driven[t.endpoint] for t in targets}  # the table's order
            for phase in phases.values():
                phase.repeat = repeat
            report(phases, args.delay)
            results.extend(phases.values())
    return results


def order(targets: list[Target], number: int) -> list[Target]:
    """The phases of run `number` (a level, or a repeat of one) in the order they run: the
    chats back to back, their order turning by one each run (chat and chat-off: which goes
    first alternates), so that none always has the same neighbours."""
    chats = [t for t in targets if t.endpoint in CHATS]
    shift = number % len(chats) if chats else 0
    return chats[shift:] + chats[:shift] + [t for t in targets if t.endpoint not in CHATS]


def run_phase(target: Target, clients: int, args: argparse.Namespace, watched: Watched) -> Phase:
    """One phase on a fresh event loop (uvloop, as the server's, when installed)."""
    coroutine = drive(target, clients, args.warmup, args.duration, args.timeout, watched)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\nInterrupted; the upstream and the server are stopped.", file=sys.stderr)
        sys.exit(130)
