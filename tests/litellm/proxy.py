"""The real LiteLLM Proxy on loopback, for the tests and the benchmarks.

`proxy_python()` builds (once, cached) a virtual environment of its own from
requirements-litellm.txt: the proxy is a peer of the site, never one of its
dependencies. `LiteLLMProxy` starts `litellm` with deploy/litellm/config.yaml, the file
the deployment recipe ships, and only UPSTREAM_OPENAI_BASE_URL pointed at a loopback
upstream; it waits for /health/liveliness and can be killed (SIGKILL) and started again
on the same port.

The cache lives in $KEYROUTE_LITELLM_VENV, else ~/.cache/keyroute/litellm-<hash>, the
hash of the pins and the Python version: changing a pin builds a new environment.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.upstream import free_port

PROJECT = Path(__file__).resolve().parent.parent.parent
PINS = PROJECT / "requirements-litellm.txt"
CONFIG = PROJECT / "deploy" / "litellm" / "config.yaml"

# The proxy's keys in the tests: obviously fake. Each virtual key may use only its models.
MASTER_KEY = "sk-test-fake-litellm-master-0000"
UPSTREAM_KEY = "sk-test-fake-upstream-provider-9999"
KEY_A = "sk-test-fake-virtual-team-a-1111"
KEY_B = "sk-test-fake-virtual-team-b-2222"
KEY_INTERNAL = "sk-test-fake-virtual-internal-3333"
# The models of deploy/litellm/config.yaml.
MOCK_MODEL = "keyroute-smoke-test"  # answered by the proxy itself (mock_response)
MOCK_ANSWER = "The proxy answers."
CHAT_MODEL = "gpt-4o-mini"  # forwarded to the upstream, priced
EMBEDDING_MODEL = "text-embedding-3-small"  # forwarded to the upstream, priced
VIRTUAL_KEYS = {
    KEY_A: {"alias": "team-a", "models": [MOCK_MODEL]},
    KEY_B: {"alias": "team-b", "models": [CHAT_MODEL]},
    KEY_INTERNAL: {"alias": "internal", "models": [EMBEDDING_MODEL]},
}
# USD per token, as deploy/litellm/config.yaml prices CHAT_MODEL.
CHAT_PRICE = (0.00000015, 0.0000006)

STARTUP_SECONDS = 120  # about 10 s on an idle machine; much more while pip runs beside it


class ProxyInstallFailed(RuntimeError):
    """pip could not build the proxy's environment; the message holds pip's output."""


def _cache_dir(pins: Path) -> Path:
    chosen = os.environ.get("KEYROUTE_LITELLM_VENV")
    if chosen:
        return Path(chosen)
    digest = hashlib.sha256(pins.read_bytes() + sys.version.encode()).hexdigest()[:12]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "keyroute" / f"litellm-{digest}"


def proxy_python(pins: Path = PINS) -> Path:
    """The Python of the proxy's environment, built first if need be. Several processes
    (pytest-xdist workers) may ask at once: one builds, the others wait for it."""
    venv = _cache_dir(pins)
    python = venv / "bin" / "python"
    done = venv / ".complete"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # half built by a run that was killed
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        steps = [[sys.executable, "-m", "venv", str(venv)], [*pip, "-r", str(pins)]]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, check=False)
            if result.returncode:
                output = (result.stdout + result.stderr).strip()
                raise ProxyInstallFailed(
                    f"Installing the LiteLLM proxy into {venv} failed "
                    f"({' '.join(step[:3])}... exited {result.returncode}):\n{output[-6000:]}"
                )
        done.write_text(pins.read_text())
    return python


class LiteLLMProxy:
    """One `litellm` process serving deploy/litellm/config.yaml on 127.0.0.1."""

    def __init__(self, *, upstream_base_url: str, log: Path, port: int = 0) -> None:
        self.port = port or free_port()
        self.upstream_base_url = upstream_base_url
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        """The proxy's address without /v1 (LiteLLM answers both forms)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def environment(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.log.parent),
            "LITELLM_MASTER_KEY": MASTER_KEY,
            "KEYROUTE_VIRTUAL_KEYS": json.dumps(VIRTUAL_KEYS),
            "UPSTREAM_OPENAI_BASE_URL": self.upstream_base_url,
            "UPSTREAM_OPENAI_API_KEY": UPSTREAM_KEY,
            # Offline: the bundled price map, no telemetry.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY_DISABLED": "True",
            "LITELLM_LOG": "WARNING",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def start(self) -> LiteLLMProxy:
        python = proxy_python()
        command = [
            str(python),
            "-c",
            "from litellm.proxy.proxy_cli import run_server; run_server()",
        ]
        arguments = ["--config", str(CONFIG), "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*command, *arguments],
                cwd=CONFIG.parent,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_alive()
        return self

    def _wait_until_alive(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The LiteLLM proxy exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.root}/health/liveliness", timeout=1) as answer:  # noqa: S310
                    if answer.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"The LiteLLM proxy did not answer /health/liveliness within {STARTUP_SECONDS} s:\n"
            + self.log_tail()
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: the proxy dies as a crashed process does, its connections with it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
