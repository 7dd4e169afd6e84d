from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings

from tests.conftest import (
    PROJECT,
    TEST_FERNET_KEY,
    TEST_REDIS_URL,
    Site,
    database_url,
    listening,
)
from tests.deploy.recipe import DEPLOY, image_env, service_env, with_test_values
from tests.upstream import Upstream, free_port

SITE_DOCKERFILE = DEPLOY / "Dockerfile"
SITE_ENTRYPOINT = DEPLOY / "site" / "entrypoint.sh"


@dataclass
class Served:
    """The site as its container runs it: the entrypoint's `serve`, several workers."""

    site: Site
    env: dict[str, str]
    log: Path


def container_env(upstream: Upstream, folder: Path, **overrides: str) -> dict[str, str]:
    """The site container's environment: the image's ENV, then site.env (from its example,
    placeholders replaced), with compose's hosts replaced by what runs here on loopback."""
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "ENV_FILE": os.devnull,  # the image has no .env: compose passes the variables
        "PYTHONDONTWRITEBYTECODE": "1",
        **image_env(SITE_DOCKERFILE),
        **with_test_values(service_env("site")),
        # This process's keys: the sessions and credentials the test writes open there.
        "SECRET_KEY": settings.SECRET_KEY,
        "CREDENTIALS_ENCRYPTION_KEYS": TEST_FERNET_KEY,
        "DATABASE_URL": database_url(),  # postgres:5432
        "CACHE_URL": TEST_REDIS_URL,  # redis:6379
        "OPENAI_BASE_URL": upstream.base_url,  # litellm:4000
        "OPENAI_INTERNAL_BASE_URL": upstream.base_url,
        # The TLS proxy in front is the test, on loopback rather than the network's gateway.
        "FORWARDED_ALLOW_IPS": "127.0.0.1",
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "LLM_MAX_RETRIES": "0",
        "LOG_LEVEL": "WARNING",
        **overrides,
    }


@pytest.fixture
def serve_like_the_image(transactional_db: None, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Run deploy/site/entrypoint.sh `serve` as the container does, on a loopback port of
    its own (uvicorn takes the last --host and --port given) and the test database.

    uvicorn's parent leads a process group of its own: its workers go with it at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(upstream: Upstream, **overrides: str) -> Served:
        port = free_port()
        env = container_env(upstream, tmp_path / "metrics", **overrides)
        log = tmp_path / f"site-{port}.log"
        with log.open("w") as output:
            process = subprocess.Popen(
                ["sh", str(SITE_ENTRYPOINT), "serve", "--host", "127.0.0.1", "--port", str(port)],
                cwd=PROJECT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        started.append(process)
        if listening(process, port, seconds=60):
            return Served(Site(f"http://127.0.0.1:{port}", process), env, log)
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the entrypoint did not serve: {log.read_text()}")

    yield start
    for process in started:
        process.terminate()  # uvicorn's parent stops its workers
    for process in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # any worker left behind
        process.wait(5)
