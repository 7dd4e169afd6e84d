"""A redis-server of a test's own, for tests that stop Redis or count its clients.

The tests' shared Redis (TEST_REDIS_URL) serves every xdist worker at once: a test that
restarts Redis, or reads how many clients it has, needs one nobody else uses.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.upstream import free_port


class RedisServer:
    """A redis-server of the test's own on a free port, its data kept on disk across a
    stop and a start (as a restarted production Redis with persistence)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.answers():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Save the data and stop, as `redis-cli shutdown save` does."""
        client = redis.Redis.from_url(self.url)
        with contextlib.suppress(redis.ConnectionError):  # it went away as asked
            client.shutdown(save=True)
        assert self.process is not None
        self.process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def clients(self) -> int:
        """How many clients Redis has, less the one asking."""
        client = redis.Redis.from_url(self.url)
        try:
            return int(client.info("clients")["connected_clients"]) - 1
        finally:
            client.close()
