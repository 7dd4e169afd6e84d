"""The container recipe in deploy/, read the way compose, Docker, Prometheus and Grafana
read it: YAML, env files (python-dotenv parses them as compose does: quotes, comments),
Dockerfile instructions, .dockerignore patterns and PromQL metric names."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from dotenv import dotenv_values

from tests.conftest import PROJECT

DEPLOY = PROJECT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PLACEHOLDER = "change-me"
# What replaces each placeholder when a test runs the recipe: as long, so a Fernet key
# stays 44 characters of base64 and a SECRET_KEY stays long enough.
TEST_VALUE = "test-only"
# Default ports of the URL schemes the site's env names.
SCHEME_PORTS = {"http": 80, "https": 443, "postgres": 5432, "postgresql": 5432, "redis": 6379}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE)
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def env_files(service: dict[str, Any]) -> list[str]:
    """The service's env_file entries, as written (relative to deploy/)."""
    given = service.get("env_file", [])
    entries = [given] if isinstance(given, str | dict) else list(given)
    return [entry["path"] if isinstance(entry, dict) else entry for entry in entries]


def example_of(env_file: str) -> Path:
    """The committed example of an env file compose.yaml names."""
    real = DEPLOY / env_file
    return real.with_name(real.name + ".example")


def env_example(name: str) -> dict[str, str]:
    """deploy/env/NAME.env.example, parsed as compose parses an env_file."""
    values = dotenv_values(DEPLOY / "env" / f"{name}.env.example")
    return {key: value or "" for key, value in values.items()}


def service_env(name: str) -> dict[str, str]:
    """What the service's env files give it, from their examples."""
    env: dict[str, str] = {}
    for env_file in env_files(services()[name]):
        values = dotenv_values(example_of(env_file))
        env.update({key: value or "" for key, value in values.items()})
    return env


def env_file_variables(path: Path) -> set[str]:
    """The variables a file in .env.default's format sets (the settings' own rule)."""
    return {
        line.split("=", 1)[0].strip()
        for line in path.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }


def with_test_values(env: dict[str, str]) -> dict[str, str]:
    """`env` with each placeholder replaced, as a user replaces them."""
    return {key: value.replace(PLACEHOLDER, TEST_VALUE) for key, value in env.items()}


# ---- ports and mounts ---------------------------------------------------------------------


def dockerfile_of(service: dict[str, Any]) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return DEPLOY / build / "Dockerfile"
    return DEPLOY / str(build.get("context", ".")) / str(build.get("dockerfile", "Dockerfile"))


def listening_ports(name: str) -> set[int]:
    """The ports service `name` listens on: compose's expose and the container side of its
    ports, and its Dockerfile's EXPOSE."""
    service = services()[name]
    ports = {int(str(port).split("/")[0]) for port in service.get("expose", [])}
    ports |= {int(str(mapping).rsplit(":", 1)[1]) for mapping in service.get("ports", [])}
    dockerfile = dockerfile_of(service)
    if dockerfile is not None:
        for instruction, argument in instructions(dockerfile):
            if instruction == "EXPOSE":
                ports |= {int(port.split("/")[0]) for port in argument.split()}
    return ports


def url_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname, url
    return parts.hostname, parts.port or SCHEME_PORTS[parts.scheme]


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> the repo path bind-mounted there (named volumes left out)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def repo_path_of(service: dict[str, Any], container_path: str) -> Path | None:
    """The repo file a container path comes from, through the service's bind mounts."""
    for target, source in bind_mounts(service).items():
        if container_path == target:
            return source
        if container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target.rstrip("/")) + 1 :]
    return None


# ---- Dockerfiles ----------------------------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        if whole:
            instruction, _, argument = whole.partition(" ")
            found.append((instruction.upper(), " ".join(argument.split())))
    return found


def arguments(dockerfile: Path, instruction: str) -> list[str]:
    return [argument for name, argument in instructions(dockerfile) if name == instruction]


def image_env(dockerfile: Path) -> dict[str, str]:
    """The variables the image's ENV instructions set."""
    env: dict[str, str] = {}
    for argument in arguments(dockerfile, "ENV"):
        for pair in shlex.split(argument):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def exec_form(argument: str) -> list[str]:
    """CMD, ENTRYPOINT or HEALTHCHECK's command, in exec (JSON) form."""
    command = json.loads(argument.split(" CMD ", 1)[-1] if " CMD " in argument else argument)
    assert isinstance(command, list), argument
    return [str(part) for part in command]


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY, flags (--chmod) left out."""
    found = []
    for argument in arguments(dockerfile, "COPY"):
        parts = [part for part in shlex.split(argument) if not part.startswith("--")]
        found.append((parts[:-1], parts[-1]))
    return found


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's `patterns` keep `path` (relative to the repo) out of the
    build context: a pattern matching the path or a folder above it; `!` re-includes;
    the last match wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        forms = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, form) for c in candidates for form in forms):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (PROJECT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# ---- PromQL -----------------------------------------------------------------------------------

_PROMQL_WORDS = {
    "abs", "absent", "and", "avg", "bool", "bottomk", "by", "clamp_max", "clamp_min", "count",
    "delta", "deriv", "group_left", "group_right", "histogram_quantile", "ignoring", "increase",
    "irate", "label_replace", "max", "min", "offset", "on", "or", "quantile", "rate", "scalar",
    "sort", "sort_desc", "stddev", "sum", "time", "topk", "unless", "vector", "without",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana's variables
    expr = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", "", expr)  # numbers
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)) - _PROMQL_WORDS


def label_names(expr: str) -> set[str]:
    """The labels a PromQL expression groups by or matches on."""
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return labels
