"""platform_site/settings.py, read in child processes with controlled environments.

Precedence: process environment > the file named by ENV_FILE > `.env.default`.
"""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAKE_KEY, PROJECT, run_manage, run_python, subprocess_env

DEFAULT_BASE_URL = "https://api.openai.com/v1"
FAKE_PASSWORD = "sk-test-fake-secretvalue"
ERROR_PREFIX = "django.core.exceptions.ImproperlyConfigured:"

READ_SETTINGS = """
import json, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "platform_site.settings")
from django.conf import settings
print(json.dumps({name: getattr(settings, name) for name in sys.argv[1:]}, default=str))
"""

CACHE_ROUND_TRIP = """
import json, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "platform_site.settings")
import django
django.setup()
from django.conf import settings
from django.core.cache import cache
key = sys.argv[1]
cache.set(key, {"answer": 42}, timeout=30)
value = cache.get(key)
cache.delete(key)
print(json.dumps({"backend": settings.CACHES["default"]["BACKEND"], "value": value,
                  "after_delete": cache.get(key)}))
"""


def read_settings(*names: str, env: dict[str, str], cwd: Path = PROJECT) -> dict[str, Any]:
    """The settings `names` as a child process with environment `env` sees them."""
    result = run_python("-c", READ_SETTINGS, *names, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def settings_error(env: dict[str, str]) -> tuple[str, str]:
    """The ImproperlyConfigured line and the whole output of a child that must fail."""
    result = run_python("-c", READ_SETTINGS, "DEBUG", env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    lines = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert lines, result.stderr
    return lines[-1], output


def env_file(tmp_path: Path, **values: str) -> str:
    path = tmp_path / "test.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return str(path)


@pytest.fixture(scope="module")
def defaults() -> dict[str, Any]:
    return read_settings(
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_INTERNAL_API_KEY",
        "OPENAI_INTERNAL_BASE_URL",
        "LLM_FAILOVER_BASE_URL",
        "LLM_ALLOWED_BASE_URL_HOSTS",
        "LLM_TIMEOUT_SECONDS",
        "LLM_CONNECT_TIMEOUT_SECONDS",
        "LLM_MAX_RETRIES",
        "LLM_TRUST_ENV_PROXY",
        "DEBUG",
        "ALLOWED_HOSTS",
        "LOGGING",
        "DATABASES",
        "CACHES",
        env=subprocess_env(),
    )


@pytest.fixture
def redis_server() -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        pytest.skip("Redis does not answer on 127.0.0.1:6379.")


# Defaults.


def test_it_defaults_both_base_urls_to_openai(defaults):
    assert defaults["OPENAI_BASE_URL"] == DEFAULT_BASE_URL
    assert defaults["OPENAI_INTERNAL_BASE_URL"] == DEFAULT_BASE_URL
    assert defaults["LLM_FAILOVER_BASE_URL"] == ""


def test_it_defaults_the_keys_to_empty(defaults):
    assert defaults["OPENAI_API_KEY"] == ""
    assert defaults["OPENAI_INTERNAL_API_KEY"] == ""


def test_it_defaults_the_other_settings(defaults):
    assert defaults["DEBUG"] is False
    assert defaults["ALLOWED_HOSTS"] == ["localhost", "127.0.0.1", "[::1]"]
    assert defaults["LLM_ALLOWED_BASE_URL_HOSTS"] == []
    assert defaults["LLM_TIMEOUT_SECONDS"] == 60
    assert defaults["LLM_CONNECT_TIMEOUT_SECONDS"] == 5
    assert defaults["LLM_MAX_RETRIES"] == 2
    assert defaults["LLM_TRUST_ENV_PROXY"] is False
    assert defaults["LOGGING"]["root"]["level"] == "INFO"


def test_it_defaults_to_sqlite_inside_the_project(defaults):
    database = defaults["DATABASES"]["default"]
    assert database["ENGINE"] == "django.db.backends.sqlite3"
    name = Path(database["NAME"])
    assert name.is_absolute()
    assert name == PROJECT / "db.sqlite3"


def test_it_defaults_to_the_local_memory_cache(defaults):
    assert defaults["CACHES"]["default"]["BACKEND"] == (
        "django.core.cache.backends.locmem.LocMemCache"
    )


# The internal route follows the public one unless set.


def test_it_makes_the_internal_base_url_follow_openai_base_url():
    values = read_settings(
        "OPENAI_BASE_URL",
        "OPENAI_INTERNAL_BASE_URL",
        env=subprocess_env(OPENAI_BASE_URL="http://litellm:4000/v1"),
    )
    assert values == {
        "OPENAI_BASE_URL": "http://litellm:4000/v1",
        "OPENAI_INTERNAL_BASE_URL": "http://litellm:4000/v1",
    }


def test_it_keeps_an_internal_base_url_set_on_its_own():
    values = read_settings(
        "OPENAI_BASE_URL",
        "OPENAI_INTERNAL_BASE_URL",
        env=subprocess_env(
            OPENAI_BASE_URL="http://litellm:4000/v1",
            OPENAI_INTERNAL_BASE_URL="http://embeddings:4000/v1",
        ),
    )
    assert values == {
        "OPENAI_BASE_URL": "http://litellm:4000/v1",
        "OPENAI_INTERNAL_BASE_URL": "http://embeddings:4000/v1",
    }


def test_it_leaves_openai_base_url_alone_when_only_the_internal_one_is_set():
    values = read_settings(
        "OPENAI_BASE_URL",
        "OPENAI_INTERNAL_BASE_URL",
        env=subprocess_env(OPENAI_INTERNAL_BASE_URL="http://embeddings:4000/v1"),
    )
    assert values == {
        "OPENAI_BASE_URL": DEFAULT_BASE_URL,
        "OPENAI_INTERNAL_BASE_URL": "http://embeddings:4000/v1",
    }


def test_it_makes_the_internal_key_follow_openai_api_key():
    values = read_settings(
        "OPENAI_API_KEY",
        "OPENAI_INTERNAL_API_KEY",
        env=subprocess_env(OPENAI_API_KEY=FAKE_KEY, OPENAI_INTERNAL_API_KEY=""),
    )
    assert values == {"OPENAI_API_KEY": FAKE_KEY, "OPENAI_INTERNAL_API_KEY": FAKE_KEY}


def test_it_keeps_an_internal_key_set_on_its_own():
    internal = "sk-test-fake-internal-only"
    values = read_settings(
        "OPENAI_API_KEY",
        "OPENAI_INTERNAL_API_KEY",
        env=subprocess_env(OPENAI_API_KEY=FAKE_KEY, OPENAI_INTERNAL_API_KEY=internal),
    )
    assert values == {"OPENAI_API_KEY": FAKE_KEY, "OPENAI_INTERNAL_API_KEY": internal}


# Empty values, spaces and slashes.


def test_it_counts_an_empty_or_blank_value_as_unset():
    values = read_settings(
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_INTERNAL_BASE_URL",
        "DEBUG",
        "LLM_TIMEOUT_SECONDS",
        "LLM_MAX_RETRIES",
        "LOGGING",
        "DATABASES",
        "CACHES",
        env=subprocess_env(
            OPENAI_API_KEY="",
            OPENAI_BASE_URL="",
            OPENAI_INTERNAL_BASE_URL="   ",
            DEBUG="",
            LLM_TIMEOUT_SECONDS=" ",
            LLM_MAX_RETRIES="",
            LOG_LEVEL="",
            DATABASE_URL="",
            CACHE_URL="",
        ),
    )
    assert values["OPENAI_API_KEY"] == ""
    assert values["OPENAI_BASE_URL"] == DEFAULT_BASE_URL
    assert values["OPENAI_INTERNAL_BASE_URL"] == DEFAULT_BASE_URL
    assert values["DEBUG"] is False
    assert values["LLM_TIMEOUT_SECONDS"] == 60
    assert values["LLM_MAX_RETRIES"] == 2
    assert values["LOGGING"]["root"]["level"] == "INFO"
    assert values["DATABASES"]["default"]["NAME"] == str(PROJECT / "db.sqlite3")
    assert values["CACHES"]["default"]["BACKEND"].endswith("LocMemCache")


def test_it_strips_spaces_and_trailing_slashes_but_keeps_the_path_as_is():
    values = read_settings(
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_INTERNAL_BASE_URL",
        "LLM_FAILOVER_BASE_URL",
        env=subprocess_env(
            OPENAI_API_KEY=f"  {FAKE_KEY}  ",
            OPENAI_BASE_URL="  http://litellm:4000/v1///  ",
            OPENAI_INTERNAL_BASE_URL="http://embeddings:4000/",
            LLM_FAILOVER_BASE_URL="\thttps://openrouter.ai/api/v1/\t",
        ),
    )
    assert values == {
        "OPENAI_API_KEY": FAKE_KEY,
        "OPENAI_BASE_URL": "http://litellm:4000/v1",
        "OPENAI_INTERNAL_BASE_URL": "http://embeddings:4000",
        "LLM_FAILOVER_BASE_URL": "https://openrouter.ai/api/v1",
    }


def test_it_parses_the_typed_values():
    values = read_settings(
        "DEBUG",
        "LLM_TIMEOUT_SECONDS",
        "LLM_MAX_RETRIES",
        "LLM_TRUST_ENV_PROXY",
        "LOGGING",
        "ALLOWED_HOSTS",
        "LLM_ALLOWED_BASE_URL_HOSTS",
        env=subprocess_env(
            DEBUG="Yes",
            LLM_TIMEOUT_SECONDS="2.5",
            LLM_MAX_RETRIES="0",
            LLM_TRUST_ENV_PROXY="on",
            LOG_LEVEL=" warning ",
            ALLOWED_HOSTS="keyroute.example, localhost ,",
            LLM_ALLOWED_BASE_URL_HOSTS="LiteLLM, .Corp.Example",
        ),
    )
    assert values["DEBUG"] is True
    assert values["LLM_TIMEOUT_SECONDS"] == 2.5
    assert values["LLM_MAX_RETRIES"] == 0
    assert values["LLM_TRUST_ENV_PROXY"] is True
    assert values["LOGGING"]["root"]["level"] == "WARNING"
    assert values["ALLOWED_HOSTS"] == ["keyroute.example", "localhost"]
    assert values["LLM_ALLOWED_BASE_URL_HOSTS"] == ["litellm", ".corp.example"]


# Precedence: process environment > ENV_FILE > .env.default.


def test_it_prefers_the_env_file_over_env_default(tmp_path):
    path = env_file(tmp_path, DEBUG="true", OPENAI_BASE_URL="http://from-env-file:4000/v1")
    values = read_settings(
        "DEBUG", "OPENAI_BASE_URL", "OPENAI_INTERNAL_BASE_URL", env=subprocess_env(ENV_FILE=path)
    )
    # .env.default says DEBUG=false.
    assert values == {
        "DEBUG": True,
        "OPENAI_BASE_URL": "http://from-env-file:4000/v1",
        "OPENAI_INTERNAL_BASE_URL": "http://from-env-file:4000/v1",
    }


def test_it_prefers_the_process_environment_over_the_env_file(tmp_path):
    path = env_file(
        tmp_path,
        DEBUG="true",
        OPENAI_BASE_URL="http://from-env-file:4000/v1",
        OPENAI_API_KEY=FAKE_KEY,
    )
    values = read_settings(
        "DEBUG",
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        env=subprocess_env(
            ENV_FILE=path, DEBUG="false", OPENAI_BASE_URL="http://from-process:4000/v1"
        ),
    )
    # What the process does not set still comes from the file.
    assert values == {
        "DEBUG": False,
        "OPENAI_BASE_URL": "http://from-process:4000/v1",
        "OPENAI_API_KEY": FAKE_KEY,
    }


def test_it_prefers_the_process_environment_over_env_default():
    assert read_settings("DEBUG", env=subprocess_env(DEBUG="true")) == {"DEBUG": True}


def test_it_reads_required_values_from_the_env_file(tmp_path):
    path = env_file(tmp_path, SECRET_KEY="keyroute-tests-from-env-file")
    env = subprocess_env(ENV_FILE=path)
    del env["SECRET_KEY"]
    values = read_settings("SECRET_KEY", env=env)
    assert values == {"SECRET_KEY": "keyroute-tests-from-env-file"}


def test_an_empty_process_value_falls_through_to_the_env_file(tmp_path):
    # Empty counts as unset at every level, e.g. a compose file passing
    # OPENAI_BASE_URL=${OPENAI_BASE_URL} from an unset shell variable.
    path = env_file(tmp_path, OPENAI_BASE_URL="http://from-env-file:4000/v1")
    values = read_settings("OPENAI_BASE_URL", env=subprocess_env(ENV_FILE=path, OPENAI_BASE_URL=""))
    assert values == {"OPENAI_BASE_URL": "http://from-env-file:4000/v1"}


# Invalid values stop start-up with ImproperlyConfigured naming the variable.


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPENAI_BASE_URL", "ftp://x"),
        ("OPENAI_BASE_URL", "not a url"),
        ("OPENAI_BASE_URL", "http://litellm:notaport/v1"),
        ("OPENAI_BASE_URL", "http://lite llm:4000/v1"),
        ("OPENAI_INTERNAL_BASE_URL", "http:///nohost"),
        ("LLM_FAILOVER_BASE_URL", "litellm:4000"),
        ("DEBUG", "maybe"),
        ("LLM_TRUST_ENV_PROXY", "2"),
        ("LLM_TIMEOUT_SECONDS", "soon"),
        ("LLM_CONNECT_TIMEOUT_SECONDS", "-1"),
        ("LLM_MAX_RETRIES", "-1"),
        ("LLM_MAX_RETRIES", "2.5"),
        ("LOG_LEVEL", "LOUD"),
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:notaport/x"),
        ("LLM_TIMEOUT_SECONDS", "nan"),
        ("LLM_TIMEOUT_SECONDS", "inf"),
        ("DATABASE_URL", "nonsense://x"),
        ("DATABASE_URL", "mysql://root@127.0.0.1/x"),
        ("CACHE_URL", "nonsense://x"),
        ("ENV_FILE", "/nonexistent/keyroute.env"),
    ],
)
def test_it_refuses_an_invalid_value(name, value):
    message, _ = settings_error(subprocess_env(**{name: value}))
    assert name in message


@pytest.mark.parametrize("secret_key", [None, "", "   "])
def test_it_refuses_to_start_without_a_secret_key(secret_key):
    env = subprocess_env()
    if secret_key is None:
        del env["SECRET_KEY"]
    else:
        env["SECRET_KEY"] = secret_key
    message, _ = settings_error(env)
    assert "SECRET_KEY" in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPENAI_BASE_URL", f"http://user:{FAKE_PASSWORD}@host:notaport/v1"),
        ("OPENAI_BASE_URL", f"ftp://user:{FAKE_PASSWORD}@host/v1"),
        ("OPENAI_INTERNAL_BASE_URL", f"http://user:{FAKE_PASSWORD}@ho st/v1"),
        ("LLM_FAILOVER_BASE_URL", f"http://user:{FAKE_PASSWORD}@[::1/v1"),
        ("DATABASE_URL", f"postgres://user:{FAKE_PASSWORD}@127.0.0.1:notaport/x"),
    ],
)
def test_it_never_echoes_a_password_from_an_invalid_url(name, value):
    message, output = settings_error(subprocess_env(**{name: value}))
    assert name in message
    assert FAKE_PASSWORD not in output


def test_it_refuses_user_info_in_a_global_url_without_echoing_it():
    env = subprocess_env(OPENAI_BASE_URL=f"http://user:{FAKE_PASSWORD}@host/v1")
    message, output = settings_error(env)
    assert "OPENAI_BASE_URL must not contain a user name or password" in message
    assert FAKE_PASSWORD not in output


def test_the_system_check_refuses_a_metadata_global_url():
    result = run_manage("check", env=subprocess_env(OPENAI_BASE_URL="http://169.254.169.254/v1"))
    assert result.returncode != 0
    assert "credentials.E003" in result.stderr + result.stdout
    assert "OPENAI_BASE_URL is refused by the base-URL policy" in result.stderr + result.stdout


# Storage.


def test_it_reads_a_postgres_database_url():
    values = read_settings(
        "DATABASES", env=subprocess_env(DATABASE_URL="postgres://postgres@127.0.0.1:5432/x")
    )
    database = values["DATABASES"]["default"]
    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert (database["HOST"], database["PORT"], database["NAME"]) == ("127.0.0.1", 5432, "x")


def test_it_resolves_a_relative_sqlite_path_against_the_project_not_the_cwd(tmp_path):
    env = subprocess_env(DATABASE_URL="sqlite:///data/keyroute.sqlite3", PYTHONPATH=str(PROJECT))
    values = read_settings("DATABASES", env=env, cwd=tmp_path)
    assert values["DATABASES"]["default"]["NAME"] == str(PROJECT / "data" / "keyroute.sqlite3")


def test_it_keeps_an_absolute_sqlite_path(tmp_path):
    path = tmp_path / "keyroute.sqlite3"
    values = read_settings("DATABASES", env=subprocess_env(DATABASE_URL=f"sqlite:///{path}"))
    assert values["DATABASES"]["default"]["NAME"] == str(path)


def test_it_round_trips_through_redis_when_cache_url_names_it(redis_server):
    key = f"keyroute-tests-{uuid.uuid4().hex}"
    result = run_python(
        "-c", CACHE_ROUND_TRIP, key, env=subprocess_env(CACHE_URL="redis://127.0.0.1:6379/0")
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "backend": "django.core.cache.backends.redis.RedisCache",
        "value": {"answer": 42},
        "after_delete": None,
    }
