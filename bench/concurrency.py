"""Throughput of the site under many clients, next to its own ceiling, in one run.

    python bench/concurrency.py [--levels 100,200,500] [--duration 10] [--delay 1.0]

Starts, each in its own process on 127.0.0.1: tests/upstream.py answering every chat
completion after --delay seconds, and the site under uvicorn (1 worker, uvloop,
httptools, as `make serve` runs it; DEBUG=false, LLM_MAX_RETRIES=0). A temporary SQLite
database (or DATABASE_URL, when set: the rows made are removed afterwards) holds a user
with a session and a credential of theirs pointing at the upstream.

At each level, N virtual clients (an aiohttp load generator in this process, one
ClientSession per phase with a connector limit of N) loop for --warmup + --duration
seconds, first on POST /api/llm/chat (session cookie, CSRF cookie and X-CSRFToken, as
the playground sends them), then on GET /healthz (no database, no upstream): the
ceiling of this server on this machine. Only requests that end inside the measured
window count toward requests/s and latency; errors (non-200 answers, exceptions) count
over the whole phase. Per phase it also prints the server's CPU time per answered
request and the most threads its process had (both from /proc).

Targets at the largest level: 0 errors, and chat throughput >= 80% of the ceiling; the
exit status is 1 when they are missed. The whole default run takes about 90 s, and the
processes started are stopped on the way out, Ctrl-C included.

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
TARGET_ERRORS = 0
TARGET_CEILING_SHARE = 0.80
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
        DJANGO_SETTINGS_MODULE=settings_module,
    )
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


def start_site(env: dict[str, str], app: str, log: Path) -> Service:
    port = free_port()
    args = [
        *(sys.executable, "-m", "uvicorn", app),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--loop", "uvloop", "--http", "httptools", "--no-access-log"),
    ]
    proc = spawn(args, env, log)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        with urllib.request.urlopen(f"{base}/healthz", timeout=1) as answer:  # noqa: S310
            return bool(answer.status == 200)

    return proc, ready, base


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
    endpoint: str  # "chat" or "healthz"
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
    server: int
    upstream: int
    py_spy: str | None  # output prefix, when profiling


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
            profiler = start_py_spy(watched, target.endpoint, clients, duration)
            cpu = (
                cpu_seconds(watched.server),
                cpu_seconds(watched.upstream),
                own_cpu_seconds(),
            )
            while (now := time.perf_counter()) < stop_at:
                phase.max_threads = max(phase.max_threads, threads(watched.server))
                await asyncio.sleep(min(0.25, stop_at - now))
            phase.server_cpu = cpu_seconds(watched.server) - cpu[0]
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
    args = ["py-spy", "record", "--pid", str(watched.server), "--duration", str(int(duration))]
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
    ("uvicorn + Django handler", ("uvicorn/", "django/", "whitenoise/", "asyncio/", "llm/")),
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


async def smoke_test(chat: Target) -> None:
    """One chat request before the load: a setup problem fails here, with its answer."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        session.post(chat.url, data=chat.body, headers=chat.headers) as answer,
    ):
        text = await answer.text()
        if answer.status != 200:
            raise SystemExit(f"POST {chat.url} answered {answer.status}: {text[:500]}")


# ---- report ----------------------------------------------------------------------------

HEAD = (
    f"{'clients':>7} {'endpoint':<8} {'req/s':>7} {'ideal':>6} {'of ideal':>8} {'errors':>6}"
    f" {'p50 ms':>7} {'p99 ms':>7} {'srv CPU':>7} {'CPU ms/req':>10} {'threads':>7}"
)


def row(phase: Phase, delay: float) -> str:
    ideal_text = f"{'-':>6} {'-':>8}"
    if phase.target.endpoint == "chat" and delay > 0:
        ideal = phase.clients / delay
        ideal_text = f"{ideal:>6.0f} {phase.rate / ideal:>8.1%}"
    return (
        f"{phase.clients:>7} {phase.target.endpoint:<8} {phase.rate:>7.1f} {ideal_text}"
        f" {sum(phase.errors.values()):>6} {phase.percentile(0.5) * 1000:>7.0f}"
        f" {phase.percentile(0.99) * 1000:>7.0f} {phase.server_cpu / phase.window:>7.0%}"
        f" {phase.cpu_ms_per_request:>10.2f} {phase.max_threads:>7}"
    )


def report(phases: dict[str, Phase], delay: float) -> None:
    for phase in phases.values():
        print(row(phase, delay))
    notes = []
    if len(phases) == 2:
        notes.append(f"chat/ceiling {share(phases['chat'], phases['healthz']):.1%}")
    load = " / ".join(f"{p.bench_cpu / p.window:.0%}" for p in phases.values())
    upstream = " / ".join(f"{p.upstream_cpu / p.window:.0%}" for p in phases.values())
    notes.append(f"CPU of one core: load generator {load}, upstream {upstream}")
    print(f"{'':>16}{'; '.join(notes)}")
    for phase in phases.values():
        if phase.errors:
            kinds = ", ".join(f"{kind} x{count}" for kind, count in phase.errors.most_common())
            print(f"{'':>16}{phase.target.endpoint} errors: {kinds}")
        if phase.profile:
            print(f"{'':>16}{phase.target.endpoint} profile ({phase.profile}), share of samples:")
            for name, part in breakdown(phase.profile):
                print(f"{'':>18}{part:6.1%}  {name}")


def share(chat: Phase, ceiling: Phase) -> float:
    return chat.rate / ceiling.rate if ceiling.rate else 0.0


def summary(chat: Phase, ceiling: Phase) -> bool:
    errors = sum(chat.errors.values())
    met = errors <= TARGET_ERRORS and share(chat, ceiling) >= TARGET_CEILING_SHARE
    print(
        f"\nAt {chat.clients} in flight: chat {chat.rate:.1f} req/s "
        f"({chat.cpu_ms_per_request:.2f} ms of server CPU each), ceiling (GET /healthz) "
        f"{ceiling.rate:.1f} req/s ({ceiling.cpu_ms_per_request:.2f} ms each)."
    )
    print(f"  chat errors: {errors} (target {TARGET_ERRORS})")
    print(f"  chat/ceiling: {share(chat, ceiling):.1%} (target >= {TARGET_CEILING_SHARE:.0%})")
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
    parser.add_argument("--only", choices=("chat", "healthz"), help="drive one endpoint only")
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
                site, site_ready, base = start_site(env, args.app, tmp / "site.log")
                procs.append(site)
                wait_until(site_ready, site, "uvicorn", tmp / "site.log")
                watched = Watched(site.pid, upstream.pid, args.py_spy)
                results = run(args, fixtures, base, watched)
                stop(site)  # uvicorn exits cleanly: its usage buffer is flushed at exit
                answered = 1 + sum(p.answered for p in results if p.target.endpoint == "chat")
                print(
                    f"  usage records written: {usage_rows(fixtures)} for {answered} chat answers"
                )
                if any(p.errors for p in results) or site.returncode not in (0, -signal.SIGTERM):
                    print(f"\nuvicorn exited with {site.returncode}; its log ends with:")
                    print(tail(tmp / "site.log"))
            finally:
                for proc in procs:
                    stop(proc)
                if given_database:
                    remove_fixtures(fixtures)
    levels = [p for p in results if p.clients == args.levels[-1]]
    if not args.only and not summary(*levels):
        sys.exit(1)


def run(args: argparse.Namespace, fixtures: Fixtures, base: str, watched: Watched) -> list[Phase]:
    """Every level, chat then its ceiling; prints the table as it goes."""
    chat = Target(
        "chat",
        "POST",
        f"{base}/api/llm/chat",
        {**fixtures.headers, "Content-Type": "application/json"},
        CHAT_BODY % (MODEL.encode(), fixtures.credential_id.encode()),
    )
    healthz = Target("healthz", "GET", f"{base}/healthz", fixtures.headers)
    targets = [t for t in (chat, healthz) if args.only in (None, t.endpoint)]
    from django.db import connection

    print(f"Machine: {machine()}")
    print(f"Versions: {versions()}")
    print(
        f"Server: {args.app} under uvicorn, 1 worker, uvloop + httptools; "
        f"database: {connection.vendor}; upstream: tests/upstream.py, {args.delay:g} s an answer"
    )
    print(
        f"Per phase: {args.warmup:g} s warm-up + {args.duration:g} s measured; load generator: "
        "aiohttp in this process; CPU from /proc, ideal = clients / delay\n"
    )
    asyncio.run(smoke_test(chat))
    print(HEAD)
    results: list[Phase] = []
    for clients in args.levels:
        phases = {t.endpoint: run_phase(t, clients, args, watched) for t in targets}
        report(phases, args.delay)
        results.extend(phases.values())
    return results


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
