"""No committed deployment file holds a secret: every key, password and token in the
examples is an obvious placeholder, and nothing else looks like a key."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from urllib.parse import urlsplit

from tests.conftest import PROJECT
from tests.deploy.recipe import DEPLOY, PLACEHOLDER, env_example

# Values that say they are not secrets: the examples' placeholders, and the dummies the
# site's image gives collectstatic at build time.
NOT_SECRETS = (PLACEHOLDER, "build-only-dummy-not-a-secret")
SECRET_NAMES = re.compile(r"KEY|SECRET|PASSWORD|TOKEN")


def committed() -> list[Path]:
    """deploy/'s files and .dockerignore, less what .gitignore keeps out of the repo."""
    ignored = [
        line.strip()
        for line in (PROJECT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    files = [path for path in DEPLOY.rglob("*") if path.is_file()]
    files.append(PROJECT / ".dockerignore")
    return [
        path
        for path in files
        if "__pycache__" not in path.parts
        and not any(
            fnmatch.fnmatchcase(path.relative_to(PROJECT).as_posix(), pattern)
            for pattern in ignored
        )
    ]


def placeholder(value: str) -> bool:
    return any(marker in value for marker in NOT_SECRETS)


def test_it_gives_every_secret_in_the_examples_a_placeholder():
    for name in ("site", "litellm", "postgres", "prometheus", "grafana"):
        for variable, value in env_example(name).items():
            if SECRET_NAMES.search(variable) and value:
                assert PLACEHOLDER in value, f"{name}.env.example: {variable}"
            password = urlsplit(value).password if "://" in value else None
            if password:
                assert PLACEHOLDER in password, f"{name}.env.example: {variable}"


def test_it_commits_nothing_that_looks_like_a_key():
    files = committed()
    assert DEPLOY / "env" / "site.env.example" in files

    for path in files:
        text = path.read_text()
        for key in re.findall(r"\bsk-[A-Za-z0-9_-]{8,}", text):
            assert placeholder(key), f"{path}: {key[:6]}..."
        # Long runs of letters, digits and -_+/ with upper and lower case and digits:
        # generated tokens, Fernet keys, passwords.
        for word in re.findall(r"[A-Za-z0-9_+/-]{24,}={0,2}", text):
            mixed = all(re.search(chars, word) for chars in ("[a-z]", "[A-Z]", "[0-9]"))
            assert not mixed or placeholder(word), f"{path}: {word[:6]}..."
        for line in text.splitlines():
            assignment = re.match(r"\s*(\w*(?:KEY|SECRET|PASSWORD|TOKEN)\w*)=(\S+)", line)
            if assignment and "$" not in assignment[2]:
                assert placeholder(assignment[2]), f"{path}: {assignment[1]}"
