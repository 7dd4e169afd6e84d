"""The containers' entrypoints, run here with sh as the images run them: the site's
empties the metrics folder and hands its process to the command (so `docker stop`
reaches uvicorn); both refuse to start their server with the examples' placeholders."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.deploy.recipe import DEPLOY, PLACEHOLDER, env_example, with_test_values

SITE = DEPLOY / "site" / "entrypoint.sh"
LITELLM = DEPLOY / "litellm" / "entrypoint.sh"


def run(entrypoint: Path, *command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(entrypoint), *command],
        cwd=PROJECT,
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def with_placeholders(name: str) -> list[str]:
    return sorted(key for key, value in env_example(name).items() if PLACEHOLDER in value)


def test_it_empties_the_metrics_folder_and_runs_the_command_in_its_place(tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    for stale in ("counter_101.db", "gauge_livesum_102.db", "histogram_103.db"):
        (folder / stale).write_bytes(b"last run's counts")
    (folder / "notes.txt").write_text("not a metrics file")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "WEB_CONCURRENCY": "",  # empty, as compose passes an unset variable
    }
    show = 'echo "$$ $WEB_CONCURRENCY"; ls "$PROMETHEUS_MULTIPROC_DIR"'

    process = subprocess.Popen(
        ["sh", str(SITE), "sh", "-c", show],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    output, _ = process.communicate(timeout=30)

    pid, workers, *files = output.split()
    assert process.returncode == 0
    assert int(pid) == process.pid  # exec: the command is the container's process
    assert workers == "2"
    assert files == ["notes.txt"]


def test_it_refuses_to_serve_with_a_placeholder_left(tmp_path):
    env = {**env_example("site"), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}

    result = run(SITE, "serve", env=env)

    assert result.returncode == 1
    assert "deploy/env/site.env" in result.stderr
    names = with_placeholders("site")
    assert {"SECRET_KEY", "CREDENTIALS_ENCRYPTION_KEYS", "OPENAI_API_KEY"} <= set(names)
    for name in names:
        assert name in result.stderr
        assert env[name] not in result.stderr  # names, never values


def test_it_runs_other_commands_with_placeholders_left(tmp_path):
    env = {**env_example("site"), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}

    result = run(SITE, "sh", "-c", "echo ran", env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "ran\n"


@pytest.fixture
def fake_litellm(tmp_path):
    """A `litellm` command that only says how it was started."""
    folder = tmp_path / "bin"
    folder.mkdir()
    command = folder / "litellm"
    command.write_text('#!/bin/sh\necho "litellm $*"\n')
    command.chmod(0o755)
    return folder


def test_it_refuses_to_start_the_proxy_with_a_placeholder_left(fake_litellm):
    path = f"{fake_litellm}{os.pathsep}{os.environ.get('PATH', '')}"
    example = env_example("litellm")

    refused = run(LITELLM, "litellm", "--port", "4000", env={**example, "PATH": path})
    started = run(
        LITELLM, "litellm", "--port", "4000", env={**with_test_values(example), "PATH": path}
    )

    assert refused.returncode == 1
    assert "deploy/env/litellm.env" in refused.stderr
    names = with_placeholders("litellm")
    assert {"LITELLM_MASTER_KEY", "KEYROUTE_VIRTUAL_KEYS", "UPSTREAM_OPENAI_API_KEY"} <= set(names)
    for name in names:
        assert name in refused.stderr
    assert refused.stdout == ""
    assert started.returncode == 0, started.stderr
    assert started.stdout == "litellm --port 4000\n"
