"""Routing overhead, measured side by side in one run against a loopback upstream.

    python bench/routing.py [--calls 2000] [--rounds 5] [--block 100] [--leak-calls 10000]

(a) a pre-built, reused OpenAI client calling chat.completions.create;
(b) llm.services.chat with a credential, for a signed-in user (its owner): a fresh model
    instance per call (as a query loads it: key still encrypted), resolution, decryption
    (memoized per token by credentials.crypto), the cached client and its lease, the
    usage record, the circuit breaker checked and told the outcome (llm.breaker, on: the
    default); no spend control configured;
(b0) the same with the breaker off (LLM_BREAKER_FAILURES=0, set at runtime for its
    blocks: `Breakers.enabled` reads the setting on every call);
(l) the same as (b) with spend control configured on the credential (bench/limits.py:
    an allow-list matched by a pattern, a monthly budget and a cap per user, requests and
    tokens per minute for the credential and per user, none ever reached): every call
    is admitted before it is sent and charged after (llm.limits: with Redis, one Lua
    script each way; with local memory, this process's counters);
(p) the same as (l), but the answers carry no cost, so the price table prices every
    call (a thousand exact rows and 20 patterns; the one that matches is tried last);
(c) a new OpenAI client per call (the habit Keyroute replaces), closed after use.

The upstream is bench/fast_upstream.py's canned answer in its own process; its answers
carry a cost (x-litellm-response-cost, as LiteLLM sends: `python bench/limits.py fast`),
except (p)'s, which come from bench/fast_upstream.py itself. The cache is CACHE_URL's
(local memory by default; CACHE_URL=redis://127.0.0.1:6379/14 for Redis).

Each round interleaves a, b, b0, l and p in blocks of --block calls whose order turns
every block (machine noise hits the five alike), then runs c. The table shows each
path's median block over all rounds, in wall time and this thread's CPU per call (the
noise of other processes, a collection of the garbage, the usage flush land in a few
blocks), and its rate over all calls; for (c), the median round. Then --leak-calls calls
through (l) print RSS and open descriptors before and after, and the spend counters are
checked against the usage records. Targets: (b)/(a) >= 0.90, (b)/(c) >= 20, (b)/(b0) >=
0.97 (checking the breaker puts no thread hop or round trip on a call), (l)/(b) and
(p)/(b) >= 0.95 (spend control within 5%), RSS growth < 10 MB, fds flat; the summary
says which are met (the exit status does not).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(1, str(PROJECT / "bench"))  # its sibling scripts, as bench/failover.py does

import limits as spend  # noqa: E402 (after the path is set)
from concurrency import verdict  # noqa: E402

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
    # The cache is the caller's CACHE_URL (local memory when unset).
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def start_upstream(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """A fast upstream in its own process: `args` and the port make its command line."""
    import socket

    from tests.upstream import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *args, str(port)],
        cwd=PROJECT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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


Block = tuple[Callable[[], None], Callable[[], contextlib.AbstractContextManager[None]]]


@dataclass
class Timings:
    """Seconds of wall time and of this thread's CPU of each block of a path's calls."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def interleaved(
    calls: int, block: int, paths: dict[str, Block], number: int, into: dict[str, Timings]
) -> None:
    """`calls` calls of each path in blocks of `block`, whose order turns every block
    (a b c d, b c d a, ...; round `number` starts further on), so that noise hits all
    paths alike and no path always follows the same one; each block's times go `into`."""
    names = list(paths)
    for index in range(max(1, calls // block)):
        shift = (index + number) % len(names)
        for name in names[shift:] + names[:shift]:
            call, context = paths[name]
            with context():
                started, started_cpu = time.perf_counter(), time.thread_time()
                for _ in range(block):
                    call()
                into[name].cpu.append(time.thread_time() - started_cpu)
                into[name].wall.append(time.perf_counter() - started)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls of each path a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=100, help="calls of a path at a time")
    parser.add_argument("--leak-calls", type=int, default=10_000)
    args = parser.parse_args()
    args.load_before = " ".join(f"{load:.2f}" for load in os.getloadavg())

    with tempfile.TemporaryDirectory() as tmp:
        setup_django(Path(tmp))
        costed, costed_url = start_upstream(str(PROJECT / "bench" / "limits.py"), "fast")
        plain, plain_url = start_upstream(str(PROJECT / "bench" / "fast_upstream.py"))
        try:
            run(args, costed_url, plain_url)
        finally:
            for proc in (costed, plain):
                proc.terminate()
                proc.wait(10)


def credential_loader(
    *, title: str, api_key: str, base_url: str, owner: Any = None, **spend_control: Any
) -> Callable[[], Any]:
    """Save a credential (`spend_control`: its limits); return a function that builds a
    fresh instance of it per call, as a query does (the key still encrypted), without
    the query."""
    from credentials.fields import EncryptedSecret
    from credentials.models import APIKeyCredentials

    credential = APIKeyCredentials(
        title=title, api_key=api_key, base_url=base_url, owner=owner, **spend_control
    )
    credential.full_clean()
    credential.save()
    names = [f.attname for f in APIKeyCredentials._meta.concrete_fields]
    row = APIKeyCredentials.objects.values_list(*names).get(pk=credential.pk)

    def load() -> APIKeyCredentials:
        values = [EncryptedSecret(v.token) if isinstance(v, EncryptedSecret) else v for v in row]
        return APIKeyCredentials.from_db("default", names, values)

    return load


def run(args: argparse.Namespace, base_url: str, plain_url: str) -> None:
    import openai
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from llm import services, usage
    from llm.models import CostSource, UsageRecord

    user = get_user_model().objects.create_user(username="bench-routing")
    load = credential_loader(title="Bench", api_key=KEY, base_url=base_url, owner=user)
    load_limited = credential_loader(
        title="Bench, spend control",
        api_key=KEY,
        base_url=base_url,
        owner=user,
        **spend.SPEND_CONTROL,
    )
    load_priced = credential_loader(
        title="Bench, spend control, priced by the table",
        api_key=KEY,
        base_url=plain_url,
        owner=user,
        **spend.SPEND_CONTROL,
    )
    spend.add_price_table()

    messages = [{"role": "user", "content": "ping"}]
    model = "gpt-test-mini"
    reused = openai.OpenAI(api_key=KEY, base_url=base_url, max_retries=0)

    def a() -> None:
        reused.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]

    def b() -> None:
        services.chat(messages=messages, model=model, credential=load(), user=user)

    def l() -> None:  # noqa: E743 (the path's name)
        services.chat(messages=messages, model=model, credential=load_limited(), user=user)

    def p() -> None:
        services.chat(messages=messages, model=model, credential=load_priced(), user=user)

    def c() -> None:
        with openai.OpenAI(api_key=KEY, base_url=base_url, max_retries=0) as client:
            client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]

    for warm in (a, b, l, p, c):
        timed(50, warm)
    with breaker_off():
        timed(50, b)
    assert services.chat(messages=messages, model=model, credential=load(), user=user).cost_usd
    checked = services.chat(messages=messages, model=model, credential=load_priced(), user=user)
    assert checked.cost_source == CostSource.PRICE_TABLE, "(p) is meant to be priced by the table"
    failures = settings.LLM_BREAKER_FAILURES
    assert failures > 0, "(b) is meant to run with the breaker on"
    paths: dict[str, Block] = {
        "a": (a, contextlib.nullcontext),
        "b": (b, contextlib.nullcontext),
        "b0": (b, breaker_off),
        "l": (l, contextlib.nullcontext),
        "p": (p, contextlib.nullcontext),
    }
    c_calls = max(20, args.calls // 20)
    blocks = {name: Timings() for name in paths}
    rounds: dict[str, list[float]] = {name: [] for name in (*paths, "c")}  # calls/s
    for number in range(args.rounds):
        start = {name: len(blocks[name].wall) for name in paths}
        interleaved(args.calls, args.block, paths, number, blocks)
        for name in paths:
            walls = blocks[name].wall[start[name] :]
            rounds[name].append(len(walls) * args.block / sum(walls))
        rounds["c"].append(timed(c_calls, c))
    # A path's rate: its median block's (machine noise, a collection of the garbage, the
    # usage flush land in a few blocks); all calls' rates are printed next to it.
    median = {name: args.block / statistics.median(blocks[name].wall) for name in paths}
    median["c"] = statistics.median(rounds["c"])
    overall = {name: len(t.wall) * args.block / sum(t.wall) for name, t in blocks.items()}
    cpu_median = {name: 1000 * statistics.median(t.cpu) / args.block for name, t in blocks.items()}

    print(f"Machine: {machine()}")
    print(f"Load average before the run: {args.load_before}")
    print(
        "Upstream: bench/fast_upstream.py's answer with a cost header in its own process "
        f"({base_url}); (p): bench/fast_upstream.py, no cost ({plain_url})"
    )
    print(f"Cache: {spend.cache_text()}")
    print(f"(l), (p): {spend.describe()}")
    print(f"(p): {spend.price_table_text()}")
    print(
        f"{args.rounds} rounds: (a), (b), (b0), (l), (p) {args.calls} calls each in interleaved "
        f"blocks of {args.block}, then (c) {c_calls} calls; the median block of all rounds "
        "(median round for (c)), and all calls"
    )
    print(f"Load average after the rounds: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(f"{'path':<62} {'calls/s':>8} {'ms/call':>8} {'CPU ms':>7} {'all calls/s':>11}")
    labels = {
        "a": "(a) pre-built reused OpenAI client",
        "b": f"(b) llm.services.chat, breaker on (LLM_BREAKER_FAILURES={failures})",
        "b0": "(b0) the same, breaker off (LLM_BREAKER_FAILURES=0)",
        "l": "(l) (b) with spend control, the answer's cost",
        "p": "(p) (b) with spend control, priced by the price table",
        "c": "(c) new OpenAI client per call",
    }
    for name, label in labels.items():
        cpu_text = f"{cpu_median[name]:>7.3f}" if name in cpu_median else f"{'-':>7}"
        all_text = f"{overall[name]:>11.0f}" if name in overall else f"{'-':>11}"
        print(f"{label:<62} {median[name]:>8.0f} {1000 / median[name]:>8.3f} {cpu_text} {all_text}")

    def ratio(on: str, off: str) -> tuple[float, str]:
        by_round = " ".join(f"{x / y:.2f}" for x, y in zip(rounds[on], rounds[off], strict=True))
        by_round += f"; all calls {overall[on] / overall[off]:.3f}"
        return median[on] / median[off], by_round

    b_a, b_c = median["b"] / median["a"], median["b"] / median["c"]
    (b_b0, b0_rounds), (l_b, l_rounds), (p_b, p_rounds) = (
        ratio("b", "b0"),
        ratio("l", "b"),
        ratio("p", "b"),
    )
    checks = [
        (b_a >= 0.90, f"(b)/(a) throughput: {b_a:.2f}   (target >= 0.90)"),
        (b_c >= 20, f"(b)/(c) throughput: {b_c:.1f}x  (target >= 20x)"),
        (b_b0 >= 0.97, f"(b)/(b0) throughput: {b_b0:.2f}  (target >= 0.97; by round: {b0_rounds})"),
        (
            l_b >= 0.95,
            f"(l)/(b) throughput: {l_b:.3f} (spend control; target >= 0.95; by round: {l_rounds})",
        ),
        (
            p_b >= 0.95,
            f"(p)/(b) throughput: {p_b:.3f} (spend control, priced; target >= 0.95; "
            f"by round: {p_rounds})",
        ),
    ]
    print()
    for name in ("l", "p"):
        extra = 1000 / median[name] - 1000 / median["b"]
        extra_cpu = cpu_median[name] - cpu_median["b"]
        print(
            f"({name}) adds {extra * 1000:+.0f} us a call ({extra_cpu * 1000:+.0f} us of this "
            "thread's CPU) to (b)"
        )
    for ok, text in checks:
        print(f"{text}  {'met' if ok else 'MISSED'}")

    rss_before, fds_before = rss_mb(), open_fds()
    timed(args.leak_calls, l)
    rss_after, fds_after = rss_mb(), open_fds()
    print(f"\n{args.leak_calls} calls through (l):")
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
    limited, priced = load_limited().pk, load_priced().pk
    for name, credential_id in (("l", limited), ("p", priced)):
        counter, records = spend.spent(credential_id)
        agree = f"({name})'s spend counter ${counter} = its usage records' ${records}"
        checks.append((counter == records, agree))
        print(f"  ({name}) spend counter ${counter}, usage records ${records}")
    spend.forget_counters([limited, priced])

    print("\nSummary:")
    verdict(checks)


if __name__ == "__main__":
    main()
