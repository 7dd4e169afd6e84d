"""Throughput of the site under many clients, next to its ceilings, in one run.

    python bench/concurrency.py [--levels 100,200,500] [--duration 10] [--delay 1.0]
                                [--only chat|chat-off|healthz|bare|breaker]

Starts, each in its own process on 127.0.0.1: tests/upstream.py answering every chat
completion after --delay seconds; the site under uvicorn (1 worker, uvloop, httptools,
as `make serve` runs it; DEBUG=false, LLM_MAX_RETRIES=0; the circuit breaker on, as by
default); a second site process, the same with the breaker off (LLM_BREAKER_FAILURES=0);
and bench/bare_app.py under uvicorn with the same flags: a bare ASGI app, no Django,
making the site's SDK call (`chat.completions.with_raw_response.create`, then
`.parse()`) with the site's client settings against the same upstream with the same
fake key. A temporary SQLite database (or DATABASE_URL, when set: the rows made are
removed afterwards) holds a user with a session and a credential of theirs pointing at
the upstream; both site processes use them.

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
breaker's cost: chat/chat-off in answers/s and in CPU per answer.

Targets at the largest level (500 by default): 0 chat errors, chat >= 300 answers/s,
chat >= 60% of (r), and chat/chat-off >= 0.97 in answers/s (checking the breaker puts no
thread hop or round trip on a call); the exit status is 1 when they are missed. With
--only they are not checked, except --only breaker (chat and chat-off alone), which
checks chat/chat-off. The whole default run takes about 3 minutes (12 phases of 12 s),
and the processes started are stopped on the way out, Ctrl-C included.

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
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
KEY = "sk-test-fake-bench-concurrency-0001"
MODEL = "gpt-test-mini"
CHAT_BODY = (
    b'{"model": "%s", "messages": [{"role": "user", "content": "ping"}], "credential": "%s"}'
)
# The bare app routes by its environment, not by a credential: the same body less that.
BARE_BODY = b'{"model": "%s", "messages": [{"role": "user", "content": "ping"}]}'
BARE_APP = "bare_app:app"  # served with --app-dir bench: nothing of the project on its path
ENDPOINTS = ("chat", "chat-off", "healthz", "bare")
# --only takes an endpoint, or one of these groups.
GROUPS = {"breaker": ("chat", "chat-off")}
# chat-off: the same chat on a second site process with the circuit breaker off.
SERVED_BY = {"chat": "site", "chat-off": "site-off", "healthz": "site", "bare": "bare"}
CHATS = ("chat", "chat-off")  # the endpoints answered with the site's chat
LABELS = {"bare": "bare (r)"}  # the reference row of the table
TARGET_ERRORS = 0
TARGET_RATE = 300.0  # chat answers/s at the largest level
TARGET_BARE_SHARE = 0.60  # chat/(r) at the largest level
TARGET_BREAKER_SHARE = 0.97  # chat/chat-off (breaker on/off) at the largest level
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
    credential_id: str
    headers: dict[str, str]  # cookies and CSRF header, as a signed-in browser sends them


def make_fixtures(upstream_url: str) -> Fixtures:
    """A user signed in (a session row), a credential of theirs, a CSRF token pair."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.http import HttpRequest
    from django.middleware.csrf import get_token
    from django.test import Client

    from credentials.models import APIKeyCredentials

    user = get_user_model().objects.create_user(
        username=f"bench-concurrency-{os.getpid()}-{int(time.time())}"
    )
    credential = APIKeyCredentials(
        title="Bench concurrency", api_key=KEY, base_url=upstream_url, owner=user
    )
    credential.full_clean()
    credential.save()
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
        credential_id=str(credential.pk),
        headers={"Cookie": cookie, "X-CSRFToken": header_token},
    )


def remove_fixtures(fixtures: Fixtures) -> None:
    """Leave a database that was given (DATABASE_URL) as it was, less the usage rows."""
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.models import Session

    from credentials.models import APIKeyCredentials
    from llm.models import UsageRecord

    UsageRecord.objects.filter(user_id=fixtures.user_id).delete()
    APIKeyCredentials.objects.filter(pk=fixtures.credential_id).delete()
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


def start_upstream(env: dict[str, str], delay: float, log: Path) -> Service:
    port = free_port()
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
    upstream: int
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
                cpu_seconds(watched.upstream),
                own_cpu_seconds(),
            )
            while (now := time.perf_counter()) < stop_at:
                phase.max_threads = max(phase.max_threads, threads(server))
                await asyncio.sleep(min(0.25, stop_at - now))
            phase.server_cpu = cpu_seconds(server) - cpu[0]
            phase.upstream_cpu = cpu_seconds(watched.upstream) - cpu[1]
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
    f"{'clients':>7} {'endpoint':<8} {'req/s':>7} {'ideal':>6} {'of ideal':>8} {'errors':>6}"
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
        f"{phase.clients:>7} {label(phase.target.endpoint):<8} {phase.rate:>7.1f} {ideal_text}"
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


def summary(phases: dict[str, Phase]) -> bool:
    """The targets, at the largest level, of the endpoints driven: 0 chat errors, a chat
    rate and a share of (r) (when chat and bare were driven); chat/chat-off (when both)."""
    checks = []
    chat = phases.get("chat")
    if chat is not None and "bare" in phases:
        bare, errors = phases["bare"], sum(chat.errors.values())
        checks += [
            (errors <= TARGET_ERRORS, f"chat errors {errors} (target {TARGET_ERRORS})"),
            (
                chat.rate >= TARGET_RATE,
                f"chat {chat.rate:.1f} answers/s (target >= {TARGET_RATE:g})",
            ),
            (
                share(chat, bare) >= TARGET_BARE_SHARE,
                f"chat/(r) {share(chat, bare):.1%} (target >= {TARGET_BARE_SHARE:.0%})",
            ),
        ]
    if chat is not None and "chat-off" in phases:
        ratio = share(chat, phases["chat-off"])
        checks.append(
            (
                ratio >= TARGET_BREAKER_SHARE,
                f"chat/chat-off (breaker on/off) {ratio:.3f} in answers/s "
                f"(target >= {TARGET_BREAKER_SHARE:g})",
            )
        )
    clients = next(iter(phases.values())).clients
    print(f"\nAt {clients} in flight (server CPU per answer in brackets):")
    for phase in phases.values():
        print(
            f"  {label(phase.target.endpoint)}: {phase.rate:.1f} answers/s "
            f"({phase.cpu_ms_per_request:.2f} ms), {sum(phase.errors.values())} errors"
        )
    if chat is not None and "healthz" in phases:
        print(f"  chat/ceiling {share(chat, phases['healthz']):.1%} (no target)")
    if chat is not None and "chat-off" in phases:
        off = phases["chat-off"]
        print(
            f"  breaker on/off: {chat.rate:.1f}/{off.rate:.1f} answers/s, "
            f"p50 {chat.percentile(0.5) * 1000:.0f}/{off.percentile(0.5) * 1000:.0f} ms, "
            f"p99 {chat.percentile(0.99) * 1000:.0f}/{off.percentile(0.99) * 1000:.0f} ms, "
            f"CPU {chat.cpu_ms_per_request:.2f}/{off.cpu_ms_per_request:.2f} ms an answer"
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
        "--only",
        choices=(*ENDPOINTS, *GROUPS),
        help="drive one endpoint only; breaker: chat and chat-off (the breaker on and off)",
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
    if args.py_spy and shutil.which("py-spy") is None:
        parser.error("--py-spy needs py-spy on PATH (pip install py-spy)")
    return args


def main() -> None:
    args = parse_args()
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
            fixtures = make_fixtures(upstream_url)
            try:
                servers = start_servers(args, env, upstream_url, endpoints, tmp, procs)
                pids = {e: servers[SERVED_BY[e]].proc.pid for e in endpoints}
                watched = Watched(pids, upstream.pid, args.py_spy)
                results = run(args, fixtures, servers, watched, endpoints)
                wrap_up(servers, results, fixtures)
            finally:
                for proc in procs:
                    stop(proc)
                if given_database:
                    remove_fixtures(fixtures)
    largest = {p.target.endpoint: p for p in results if p.clients == args.levels[-1]}
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
    for name, server in servers.items():
        phases = [p for p in results if SERVED_BY[p.target.endpoint] == name]
        code = server.proc.returncode
        if any(p.errors for p in phases) or code not in (0, -signal.SIGTERM):
            print(f"\nuvicorn ({name}) exited with {code}; its log ends with:")
            print(tail(server.log))


def make_target(endpoint: str, base: str, fixtures: Fixtures) -> Target:
    json_body = {"Content-Type": "application/json"}
    if endpoint in CHATS:
        body = CHAT_BODY % (MODEL.encode(), fixtures.credential_id.encode())
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
    print(f"Upstream: tests/upstream.py, {args.delay:g} s an answer")
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
    for number, clients in enumerate(args.levels):
        driven = {t.endpoint: run_phase(t, clients, args, watched) for t in order(targets, number)}
        phases = {t.endpoint: driven[t.endpoint] for t in targets}  # the table's order
        report(phases, args.delay)
        results.extend(phases.values())
    return results


def order(targets: list[Target], number: int) -> list[Target]:
    """The phases of level `number` in the order they run: chat and chat-off back to back,
    chat-off first at every other level, so that neither always has the same neighbours."""
    ordered = list(targets)
    names = [t.endpoint for t in ordered]
    if number % 2 and set(CHATS) <= set(names):
        on, off = names.index("chat"), names.index("chat-off")
        ordered[on], ordered[off] = ordered[off], ordered[on]
    return ordered


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
