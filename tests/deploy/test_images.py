"""The two Dockerfiles, read instruction by instruction: what each image holds, whom it
runs as, how it is checked, and that the build-only keys stay out of it. The images are
not built here (no container engine): the commands they run are run here instead."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import sys

import pytest
from django.conf import settings

from tests.conftest import PROJECT, run_manage
from tests.deploy.recipe import (
    DEPLOY,
    arguments,
    copies,
    dockerignore_patterns,
    dockerignored,
    exec_form,
    image_env,
    instructions,
    listening_ports,
    load_yaml,
)

SITE = DEPLOY / "Dockerfile"
LITELLM = DEPLOY / "litellm" / "Dockerfile"
SECRETS = ("SECRET_KEY", "CREDENTIALS_ENCRYPTION_KEYS")


@pytest.mark.parametrize("dockerfile", [SITE, LITELLM], ids=["site", "litellm"])
def test_it_runs_as_a_user_other_than_root_and_checks_its_health(dockerfile):
    (user,) = arguments(dockerfile, "USER")
    (healthcheck,) = arguments(dockerfile, "HEALTHCHECK")
    names = [name for name, _ in instructions(dockerfile)]
    uid = user.split(":")[0]

    assert uid not in {"root", "0"}
    assert any(f"--uid {uid} " in run for run in arguments(dockerfile, "RUN"))
    # After the last RUN: the build runs as root, the container never does.
    assert names.index("USER") > max(i for i, name in enumerate(names) if name == "RUN")
    command = exec_form(healthcheck)
    assert command[0] == "python"  # slim has no curl
    assert re.search(r"urlopen\('http://127\.0\.0\.1:\d+/", command[-1])


@pytest.mark.parametrize("dockerfile", [SITE, LITELLM], ids=["site", "litellm"])
def test_it_copies_only_files_that_exist_into_the_build_context(dockerfile):
    patterns = dockerignore_patterns()

    for sources, _ in copies(dockerfile):
        for source in sources:
            assert (PROJECT / source).exists(), f"{dockerfile.name} copies {source}: missing"
            assert not dockerignored(source, patterns), f".dockerignore leaves {source} out"
    installs = [run for run in arguments(dockerfile, "RUN") if "pip install" in run]
    assert installs, "no pip install"
    for install in installs:
        assert "--no-cache-dir" in install
        (requirements,) = re.findall(r"-r (\S+)", install)
        assert ([requirements], "./") in copies(dockerfile)


def test_it_keeps_secrets_out_of_the_build_context():
    patterns = dockerignore_patterns()

    for path in (".env", "deploy/env/site.env", "deploy/env/litellm.env", "db.sqlite3", ".git"):
        assert dockerignored(path, patterns), path
    for needed in (".env.default", "manage.py", "requirements.txt", "deploy/site/entrypoint.sh"):
        assert not dockerignored(needed, patterns), needed


def test_it_copies_everything_the_settings_load():
    copied = {source.rstrip("/") for sources, _ in copies(SITE) for source in sources}
    packages = {
        name.split(".")[0]
        for name in [*settings.INSTALLED_APPS, settings.ROOT_URLCONF, settings.ASGI_APPLICATION]
        # The project's own packages; the others come from requirements.txt.
        if (PROJECT / name.split(".")[0]).is_dir()
    }

    assert packages <= copied
    # .env.default lists every variable the settings read (and their defaults).
    assert {"manage.py", ".env.default"} <= copied


def test_it_keeps_the_build_only_keys_out_of_the_image():
    for instruction in ("ENV", "ARG", "LABEL"):
        for argument in arguments(SITE, instruction):
            for name in SECRETS:
                assert name not in argument, f"{instruction} {argument}"
    (collect,) = [run for run in arguments(SITE, "RUN") if "collectstatic" in run]
    for name in SECRETS:
        assert re.search(rf"(^| ){name}=\S+ ", collect), f"{name} is not given inline"


def test_it_collects_static_files_with_the_build_only_values_alone(tmp_path):
    (collect,) = [run for run in arguments(SITE, "RUN") if "collectstatic" in run]
    words = shlex.split(collect)
    inline = dict(word.split("=", 1) for word in words if re.match(r"[A-Z_]+=", word))
    command = [word for word in words if not re.match(r"[A-Z_]+=", word)]
    assert command[:2] == ["python", "manage.py"]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "ENV_FILE": os.devnull,  # the image has no .env
        **image_env(SITE),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        **inline,
    }

    # --dry-run: the settings load and the files are found, nothing is written here.
    result = run_manage(*command[2:], "--dry-run", env=env)

    assert result.returncode == 0, result.stderr


def test_it_serves_with_the_flags_of_make_serve():
    makefile = (PROJECT / "Makefile").read_text().replace("\\\n", " ")
    (serve,) = re.findall(r"-m uvicorn platform_site\.asgi:application (.*--workers.*)", makefile)
    make_flags = shlex.split(serve)
    entrypoint = (DEPLOY / "site" / "entrypoint.sh").read_text().replace("\\\n", " ")
    (started,) = re.findall(r"set -- (python -m uvicorn .*)", entrypoint)
    flags = shlex.split(started)

    assert flags[:4] == ["python", "-m", "uvicorn", "platform_site.asgi:application"]
    for flag in (flag for flag in make_flags if flag.startswith("--")):
        assert flag in flags, f"make serve passes {flag}, the image does not"
    assert flags[flags.index("--workers") + 1] == "$WEB_CONCURRENCY"
    assert ipaddress.ip_address(flags[flags.index("--host") + 1]).is_unspecified
    port = int(flags[flags.index("--port") + 1])
    assert port in listening_ports("site")
    (healthcheck,) = arguments(SITE, "HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/healthz" in healthcheck
    assert exec_form(arguments(SITE, "CMD")[0]) == ["serve"]


def test_it_owns_the_metrics_folder_it_counts_in():
    folder = image_env(SITE)["PROMETHEUS_MULTIPROC_DIR"]
    (user,) = arguments(SITE, "USER")
    (created,) = [run for run in arguments(SITE, "RUN") if "useradd" in run]
    name = created.split()[-1]

    assert f"--uid {user.split(':')[0]} " in created
    assert any(
        f"mkdir -p -m 700 {folder}" in run and f"chown {name}:{name} {folder}" in run
        for run in arguments(SITE, "RUN")
    )


def test_it_starts_litellm_with_its_config_beside_the_custom_auth():
    command = exec_form(arguments(LITELLM, "CMD")[0])
    config_path = command[command.index("--config") + 1]
    ((_, destination),) = [copy for copy in copies(LITELLM) if "deploy/litellm/" in copy[0]]
    config = load_yaml(PROJECT / "deploy" / "litellm" / config_path.removeprefix(destination))
    module = config["general_settings"]["custom_auth"].split(".")[0]
    port = int(command[command.index("--port") + 1])
    (healthcheck,) = arguments(LITELLM, "HEALTHCHECK")

    assert command[0] == "litellm"
    assert config_path.startswith(destination)
    assert (DEPLOY / "litellm" / f"{module}.py").is_file()
    assert ipaddress.ip_address(command[command.index("--host") + 1]).is_unspecified
    assert port in listening_ports("litellm")
    assert f"http://127.0.0.1:{port}/health/liveliness" in healthcheck
    for name, value in image_env(LITELLM).items():
        if name.startswith("LITELLM_"):
            assert value == "True", name


@pytest.mark.parametrize("dockerfile", [SITE, LITELLM], ids=["site", "litellm"])
def test_it_builds_on_the_python_the_pins_are_tested_with(dockerfile):
    (base,) = arguments(dockerfile, "FROM")

    assert base == f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
