"""Routing overhead, measured side by side in one run against a loopback upstream.

    python bench/routing.py [--calls 2000] [--rounds 5] [--leak-calls 10000]

(a) a pre-built, reused OpenAI client calling chat.completions.create;
(b) llm.services.chat with a credential, for the platform: a fresh model instance per
    call (as a query loads it: key still encrypted), resolution, decryption (memoized
    per token by credentials.crypto), the cached client and its lease, the usage record,
    the circuit breaker checked and told the outcome (llm.breaker, on: the default);
(b0) the same with the breaker off (LLM_BREAKER_FAILURES=0, set at runtime for its
    rounds: `Breakers.enabled` reads the setting on every call);
(c) a new OpenAI client per call (the habit Keyroute replaces), closed after use.

Rounds interleave a, b, b0 and c so that machine noise hits all four alike (b and b0 run
back to back, their order swapped every round); the table shows the median round. Then
10,000 calls through (b) print RSS and open descriptors before and after. Targets:
(b)/(a) >= 0.90, (b)/(c) >= 20, (b)/(b0) >= 0.97 (checking the breaker puts no thread
hop or round trip on a call), RSS growth < 10 MB, fds flat; the summary says which are
met (the exit status does not).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(1, str(PROJECT / "bench"))  # its sibling scripts, as bench/failover.py does

from concurrency import verdict  # noqa: E402 (after the path is set)

KEY = "sk-test-fake-bench-routing-0001"


def setup_django(tmp: Path) -> None:
    from cryptography.fernet import Fernet

    os.environ.update(
        ENV_FILE=os.devnull,
        SECRET_KEY="bench-only-not-a-secret",  # noqa: S106
        CREDENTIALS_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        DATABASE_URL=f"sqlite:///{tmp / 'bench.sqlite3'}",
        LLM_MAX_RETRIES="0",
        DJANGO_SETTINGS_MODULE="platform_site.settings",
    )
    # (b) runs as the site does by default, the breaker on; (b0) turns it off at runtime.
    os.environ.pop("LLM_BREAKER_FAILURES", None)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def start_upstream() -> tuple[subprocess.Popen[bytes], str]:
    from tests.upstream import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(PROJECT / "bench" / "fast_upstream.py"), str(port)],
        cwd=PROJECT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/v1"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def breaker_off() -> Iterator[None]:
    """LLM_BREAKER_FAILURES=0 for the calls inside (read by llm.breaker on every call)."""
    from django.conf import settings

    before = settings.LLM_BREAKER_FAILURES
    settings.LLM_BREAKER_FAILURES = 0
    try:
        yield
    finally:
        settings.LLM_BREAKER_FAILURES = before


def timed(calls: int, call: Any) -> float:
    """Calls per second."""
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return calls / (time.perf_counter() - started)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls of (a) and (b) per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--leak-calls", type=int, default=10_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        setup_django(Path(tmp))
        proc, base_url = start_upstream()
        try:
            run(args, base_url)
        finally:
            proc.terminate()
            proc.wait(10)


def credential_loader(*, title: str, api_key: str, base_url: str) -> Callable[[], Any]:
    """Save a credential; return a function that builds a fresh instance of it per call,
    as a query does (the key still encrypted), without the query."""
    from credentials.fields import EncryptedSecret
    from credentials.models import APIKeyCredentials

    credential = APIKeyCredentials(title=title, api_key=api_key, base_url=base_url)
    credential.full_clean()
    credential.save()
    names = [f.attname for f in APIKeyCredentials._meta.concrete_fields]
    row = APIKeyCredentials.objects.values_list(*names).get(pk=credential.pk)

    def load() -> APIKeyCredentials:
        values = [EncryptedSecret(v.token) if isinstance(v, EncryptedSecret) else v for v in row]
        return APIKeyCredentials.from_db("default", names, values)

    return load


def run(args: argparse.Namespace, base_url: str) -> None:
    import openai
    from django.conf import settings

    from credentials.models import PLATFORM
    from llm import services, usage
    from llm.models import UsageRecord

    load = credential_loader(title="Bench", api_key=KEY, base_url=base_url)

    messages = [{"role": "user", "content": "ping"}]
    reused = openai.OpenAI(api_key=KEY, base_url=base_url, max_retries=0)

    def a() -> None:
        reused.chat.completions.create(model="gpt-test-mini", messages=messages)  # type: ignore[arg-type]

    def b() -> None:
        services.chat(messages=messages, model="gpt-test-mini", credential=load(), user=PLATFORM)

    def c() -> None:
        with openai.OpenAI(api_key=KEY, base_url=base_url, max_retries=0) as client:
            client.chat.completions.create(model="gpt-test-mini", messages=messages)  # type: ignore[arg-type]

    for warm in (a, b, c):
        timed(50, warm)
    with breaker_off():
        timed(50, b)
    failures = settings.LLM_BREAKER_FAILURES
    assert failures > 0, "(b) is meant to run with the breaker on"
    c_calls = max(20, args.calls // 20)
    rounds: dict[str, list[float]] = {"a": [], "b": [], "b0": [], "c": []}
    for number in range(args.rounds):
        rounds["a"].append(timed(args.calls, a))
        # b and b0 back to back, which goes first alternating: no order favours either.
        for name in ("b", "b0") if number % 2 == 0 else ("b0", "b"):
            with breaker_off() if name == "b0" else contextlib.nullcontext():
                rounds[name].append(timed(args.calls, b))
        rounds["c"].append(timed(c_calls, c))
    median = {name: statistics.median(values) for name, values in rounds.items()}

    print(f"Machine: {machine()}")
    print(f"Upstream: bench/fast_upstream.py in its own process ({base_url})")
    print(
        f"{args.rounds} interleaved rounds; (a), (b), (b0): {args.calls} calls, "
        f"(c): {c_calls} each\n"
    )
    print(f"{'path':<57} {'calls/s':>9} {'ms/call':>8}")
    labels = {
        "a": "(a) pre-built reused OpenAI client",
        "b": f"(b) llm.services.chat, breaker on (LLM_BREAKER_FAILURES={failures})",
        "b0": "(b0) the same, breaker off (LLM_BREAKER_FAILURES=0)",
        "c": "(c) new OpenAI client per call",
    }
    for name, label in labels.items():
        print(f"{label:<57} {median[name]:>9.0f} {1000 / median[name]:>8.3f}")
    b_a, b_c, b_b0 = (
        median["b"] / median["a"],
        median["b"] / median["c"],
        median["b"] / median["b0"],
    )
    per_round = " ".join(
        f"{on / off:.2f}" for on, off in zip(rounds["b"], rounds["b0"], strict=True)
    )
    checks = [
        (b_a >= 0.90, f"(b)/(a) throughput: {b_a:.2f}   (target >= 0.90)"),
        (b_c >= 20, f"(b)/(c) throughput: {b_c:.1f}x  (target >= 20x)"),
        (b_b0 >= 0.97, f"(b)/(b0) throughput: {b_b0:.2f}  (target >= 0.97; by round: {per_round})"),
    ]
    print()
    for ok, text in checks:
        print(f"{text}  {'met' if ok else 'MISSED'}")

    rss_before, fds_before = rss_mb(), open_fds()
    timed(args.leak_calls, b)
    rss_after, fds_after = rss_mb(), open_fds()
    print(f"\n{args.leak_calls} calls through (b):")
    growth = rss_after - rss_before
    print(f"  RSS  {rss_before:.1f} MB -> {rss_after:.1f} MB ({growth:+.1f} MB; target < 10)")
    print(f"  open file descriptors {fds_before} -> {fds_after} (target: flat)")
    checks += [
        (growth < 10, f"RSS growth {growth:+.1f} MB over {args.leak_calls} calls (target < 10)"),
        (fds_after <= fds_before, f"open file descriptors {fds_before} -> {fds_after} (flat)"),
    ]
    reused.close()
    assert load().api_key.get_secret_value() == KEY  # (b) really decrypts per call
    written = usage.flush()  # before the temporary database goes away
    total = UsageRecord.objects.count()
    print(f"  usage records written by the buffer: {total} (last flush {written})")

    print("\nSummary:")
    verdict(checks)


if __name__ == "__main__":
    main()
