"""deploy/env/site.env.example gives the site everything production asks of it: the
settings' own `check --deploy --fail-level WARNING` passes with the file as it is, and
fails, naming the variable, when a required one is left out."""

from __future__ import annotations

import os

import pytest

from tests.conftest import PROJECT, run_manage
from tests.deploy.recipe import DEPLOY, env_example, env_file_variables

SITE_ENV = DEPLOY / "env" / "site.env.example"
CHECK = ("check", "--deploy", "--fail-level", "WARNING")
# uvicorn's own (its --forwarded-allow-ips), read from the environment, not by the settings.
UVICORN_VARIABLES = {"FORWARDED_ALLOW_IPS"}


def only_the_file(env_file: os.PathLike[str]) -> dict[str, str]:
    """An environment with nothing but the env file: as the container sees it."""
    return {"PATH": os.environ.get("PATH", ""), "ENV_FILE": os.fspath(env_file)}


def test_it_passes_the_deploy_check_as_it_is():
    result = run_manage(*CHECK, env=only_the_file(SITE_ENV))

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize(
    ("variable", "named"),
    [
        ("SECRET_KEY", "SECRET_KEY is empty"),
        ("CREDENTIALS_ENCRYPTION_KEYS", "CREDENTIALS_ENCRYPTION_KEYS is empty"),
        # Left out, it falls back to local memory, which several workers cannot share.
        ("CACHE_URL", "CACHE_URL is local memory"),
    ],
)
def test_it_fails_the_deploy_check_naming_a_required_variable_left_out(tmp_path, variable, named):
    lines = SITE_ENV.read_text().splitlines()
    without = [line for line in lines if not line.startswith(f"{variable}=")]
    assert len(without) == len(lines) - 1, f"{variable} is not in the example"
    env_file = tmp_path / "site.env"
    env_file.write_text("\n".join(without) + "\n")

    result = run_manage(*CHECK, env=only_the_file(env_file))

    assert result.returncode == 1
    assert named in result.stderr


def test_it_sets_only_variables_the_site_or_uvicorn_reads():
    known = env_file_variables(PROJECT / ".env.default") | UVICORN_VARIABLES

    assert set(env_example("site")) <= known


def test_it_sets_what_production_needs_explicitly():
    site = env_example("site")

    assert site["DEBUG"] == "false"
    assert site["DATABASE_URL"].startswith("postgres://")
    assert site["CACHE_URL"].startswith("redis://")
    hosts = site["ALLOWED_HOSTS"].split(",")
    for origin in site["CSRF_TRUSTED_ORIGINS"].split(","):
        assert origin.startswith("https://")
        assert origin.removeprefix("https://") in hosts
    assert int(site["WEB_CONCURRENCY"]) > 1
