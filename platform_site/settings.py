"""Keyroute settings: everything comes from the environment.

Precedence: process environment > `.env` (or the file named by ENV_FILE) > `.env.default`.
Every variable is listed with its default and meaning in `.env.default`.
"""

from __future__ import annotations

import ipaddress
import math
import os
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import django_stubs_ext
import environ
from django.core.exceptions import ImproperlyConfigured

# Lets model fields, forms and admins be written with their type parameters.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent


_env_default = BASE_DIR / ".env.default"
# The variables Keyroute reads: every one is listed in .env.default.
_variables = {
    line.split("=", 1)[0].strip()
    for line in _env_default.read_text().splitlines()
    if "=" in line and not line.lstrip().startswith("#")
}


def _drop_empty_variables() -> None:
    for name in _variables:
        if not os.environ.get(name, "x").strip():
            del os.environ[name]


def _read_env_files() -> None:
    """Process environment > ENV_FILE (default `.env`) > `.env.default`.

    An empty value counts as unset at every level, so an empty variable (as a compose
    file passes for an unset one) falls through to the files and then to the default.
    """
    _drop_empty_variables()
    env_file = os.environ.get("ENV_FILE")
    if env_file and not Path(env_file).exists():
        raise ImproperlyConfigured("ENV_FILE names a file that does not exist.")
    # Neither file overwrites what is already set: the first one read wins.
    environ.Env.read_env(env_file or BASE_DIR / ".env", overwrite=False)
    _drop_empty_variables()
    environ.Env.read_env(_env_default, overwrite=False)


_read_env_files()


def _str(name: str, default: str = "") -> str:
    """The stripped value of `name`; empty counts as unset."""
    return os.environ.get(name, "").strip() or default


def _bool(name: str, default: bool) -> bool:
    value = _str(name).lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(
        f"Unexpected value {name}={value!r}: use true or false (1/0, yes/no, on/off also work)."
    )


def _number(name: str, default: float, *, integer: bool = False) -> float:
    value = _str(name)
    if not value:
        return default
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ImproperlyConfigured(f"Unexpected value {name}={value!r}: use {kind}.") from None
    if not math.isfinite(number) or number < 0:
        raise ImproperlyConfigured(f"Unexpected value {name}={value!r}: use a finite number >= 0.")
    return number


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _str(name, default).upper()
    if value not in choices:
        raise ImproperlyConfigured(
            f"Unexpected value {name}={value!r}: use one of {', '.join(choices)}."
        )
    return value


def _list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in _str(name, default).split(",") if item.strip()]


def _networks(name: str, default: str) -> list[str]:
    """Comma-separated addresses or networks (10.0.0.0/8); a bad one stops start-up."""
    entries = _list(name, default)
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ImproperlyConfigured(
                f"Unexpected value {name}={entry!r}: use IP addresses or networks, "
                "e.g. 127.0.0.1,10.0.0.0/8."
            ) from None
    return entries


def _proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """`X-Forwarded-Proto,https` -> ("HTTP_X_FORWARDED_PROTO", "https"); empty: None."""
    value = _str(name)
    if not value:
        return None
    header, _, expected = (part.strip() for part in value.partition(","))
    if not header or not expected or not header.replace("-", "").isalnum():
        raise ImproperlyConfigured(
            f"Unexpected value {name}={value!r}: use HEADER,VALUE, e.g. X-Forwarded-Proto,https."
        )
    return "HTTP_" + header.upper().replace("-", "_"), expected


def _base_url(name: str, default: str) -> str:
    """A base URL, normalised: surrounding spaces and trailing slashes stripped.

    The value itself is never echoed in an error: a URL can carry credentials.
    `/v1` is neither added nor removed.
    """
    value = _str(name).rstrip("/")
    if not value:
        return default
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError on a malformed port)
    except ValueError:
        raise ImproperlyConfigured(f"{name} is not a valid URL (malformed host or port).") from None
    if parts.scheme not in {"http", "https"}:
        raise ImproperlyConfigured(
            f"{name} must start with http:// or https:// (e.g. http://litellm:4000/v1)."
        )
    if not parts.hostname:
        raise ImproperlyConfigured(f"{name} has no host name (e.g. http://litellm:4000/v1).")
    if "@" in parts.netloc:
        raise ImproperlyConfigured(
            f"{name} must not contain a user name or password: put the key in the API key variable."
        )
    if any(ch.isspace() for ch in value):
        raise ImproperlyConfigured(f"{name} contains white space inside the URL.")
    return value


DEBUG = _bool("DEBUG", False)
SECRET_KEY = _str("SECRET_KEY")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "SECRET_KEY is empty: set it in the environment or in .env (`make run` writes one)."
    )
ALLOWED_HOSTS = _list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = _list("CSRF_TRUSTED_ORIGINS")

# HTTPS only, strict unless DEBUG: what `check --deploy --fail-level WARNING` asks for.
SECURE_SSL_REDIRECT = _bool("SECURE_SSL_REDIRECT", not DEBUG)
# Orchestrators probe the process, and Prometheus scrapes it, over plain HTTP from inside
# the network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = int(_number("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000, integer=True))
SECURE_HSTS_INCLUDE_SUBDOMAINS = _bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = _bool("SECURE_HSTS_PRELOAD", not DEBUG)
SESSION_COOKIE_SECURE = _bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = _bool("CSRF_COOKIE_SECURE", not DEBUG)
# Only behind a proxy that sets (and strips from clients) this header.
SECURE_PROXY_SSL_HEADER = _proxy_ssl_header("SECURE_PROXY_SSL_HEADER")

# Global defaults for calls made without a credential (see DESIGN: "Global defaults").
OPENAI_API_KEY = _str("OPENAI_API_KEY")
OPENAI_BASE_URL = _base_url("OPENAI_BASE_URL", "https://api.openai.com/v1")
OPENAI_INTERNAL_API_KEY = _str("OPENAI_INTERNAL_API_KEY", OPENAI_API_KEY)
OPENAI_INTERNAL_BASE_URL = _base_url("OPENAI_INTERNAL_BASE_URL", OPENAI_BASE_URL)

# Fernet keys: the first encrypts, all decrypt. Checked by credentials.E001/E002.
CREDENTIALS_ENCRYPTION_KEYS = _list("CREDENTIALS_ENCRYPTION_KEYS")
# Hosts a base URL may point at; empty allows any host the base-URL policy accepts.
LLM_ALLOWED_BASE_URL_HOSTS = [host.lower() for host in _list("LLM_ALLOWED_BASE_URL_HOSTS")]
# Refuse loopback, private, CGNAT, reserved and IPv6 ULA addresses too, at save and at
# connect: for sites whose base URLs are all public (credentials.policy, llm.egress).
LLM_BLOCK_PRIVATE_NETWORKS = _bool("LLM_BLOCK_PRIVATE_NETWORKS", False)

LLM_TIMEOUT_SECONDS = _number("LLM_TIMEOUT_SECONDS", 60)
LLM_CONNECT_TIMEOUT_SECONDS = _number("LLM_CONNECT_TIMEOUT_SECONDS", 5)
LLM_MAX_RETRIES = int(_number("LLM_MAX_RETRIES", 2, integer=True))
# Below the proxy's own keep-alive (LiteLLM's uvicorn: 5 s), so that a connection is never
# reused just as the proxy closes it.
LLM_KEEPALIVE_SECONDS = _number("LLM_KEEPALIVE_SECONDS", 4)
LLM_TRUST_ENV_PROXY = _bool("LLM_TRUST_ENV_PROXY", False)
LLM_USAGE_FLUSH_SECONDS = _number("LLM_USAGE_FLUSH_SECONDS", 2.0)
LLM_USAGE_BUFFER_SIZE = max(1, int(_number("LLM_USAGE_BUFFER_SIZE", 20000, integer=True)))
LLM_CLIENT_CACHE_SIZE = max(1, int(_number("LLM_CLIENT_CACHE_SIZE", 256, integer=True)))
LLM_PROBE_TIMEOUT_SECONDS = _number("LLM_PROBE_TIMEOUT_SECONDS", 5)
LLM_FAILOVER_BASE_URL = _base_url("LLM_FAILOVER_BASE_URL", "")
LLM_FAILOVER_API_KEY = _str("LLM_FAILOVER_API_KEY")
# The circuit breaker per base URL (llm/breaker.py); LLM_BREAKER_FAILURES=0 turns it off.
LLM_BREAKER_FAILURES = max(0, int(_number("LLM_BREAKER_FAILURES", 3, integer=True)))
LLM_BREAKER_COOLDOWN_SECONDS = _number("LLM_BREAKER_COOLDOWN_SECONDS", 30)
LLM_BREAKER_REFRESH_SECONDS = _number("LLM_BREAKER_REFRESH_SECONDS", 1)
# Spend control (llm.limits): how often a process sends the charges of its calls to the
# Redis counters (at most; 0: each call sends its own), how often a serving process brings
# the shared spend counters up to the usage records (0: never; `manage.py reconcile_spend`
# does it by hand), and the share of a budget at which a warning is logged and counted
# (0: no warning).
LLM_CHARGE_FLUSH_SECONDS = max(0.0, _number("LLM_CHARGE_FLUSH_SECONDS", 0.1))
LLM_SPEND_RECONCILE_SECONDS = max(0.0, _number("LLM_SPEND_RECONCILE_SECONDS", 300))
LLM_BUDGET_WARNING_PERCENT = max(0.0, _number("LLM_BUDGET_WARNING_PERCENT", 80))

# /metrics (llm/metrics.py): readable from these addresses, or by anyone with the token.
METRICS_ALLOWED_IPS = _networks("METRICS_ALLOWED_IPS", "127.0.0.1,::1")
METRICS_TOKEN = _str("METRICS_TOKEN")
# Each worker's metrics live in files there, so that /metrics adds up all workers.
PROMETHEUS_MULTIPROC_DIR = _str("PROMETHEUS_MULTIPROC_DIR")
if not PROMETHEUS_MULTIPROC_DIR:  # prometheus_client takes even an empty one as set
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

INSTALLED_APPS = [
    # Django's admin, whose every ModelAdmin answers tampered requests without a 500.
    "platform_site.admin_site.AdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    # Sign-in throttling (platform_site/throttle.py); its admin lists the locks. Before
    # platform_site, whose admin.py mends axes' admin.
    "axes",
    "platform_site",
    "credentials",
    "llm",
]

# Django's own classes, so that its checks (check --deploy) see them. Under ASGI, the
# handler runs their hooks on the event loop: platform_site/middleware.py.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as axes asks: turns a refused sign-in into the lockout page. Async-capable
    # already, so the ASGI chain uses it as it is.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "platform_site.urls"
WSGI_APPLICATION = "platform_site.wsgi.application"
ASGI_APPLICATION = "platform_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "platform_site" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database(url: str) -> dict[str, object]:
    problem = ImproperlyConfigured(
        "DATABASE_URL is not a database URL Keyroute supports: use sqlite:///db.sqlite3 or "
        "postgres://USER:PASSWORD@HOST:5432/NAME."
    )
    if urlsplit(url).scheme not in {"sqlite", "postgres", "postgresql", "pgsql"}:
        raise problem
    try:
        config: dict[str, object] = environ.Env.db_url_config(url)
    except (ValueError, KeyError, ImproperlyConfigured):
        raise problem from None
    name = str(config.get("NAME", ""))
    if config["ENGINE"] == "django.db.backends.sqlite3" and name and name != ":memory:":
        # Relative SQLite paths are relative to the project, not the working directory.
        config["NAME"] = str(BASE_DIR / name)
    # Sync code runs in a thread per request (platform_site/asgi.py): a connection kept
    # open would outlive its thread.
    config.setdefault("CONN_MAX_AGE", 0)
    config.setdefault("CONN_HEALTH_CHECKS", True)
    return config


def _cache(url: str) -> dict[str, object]:
    scheme = urlsplit(url).scheme
    backend = "django.core.cache.backends.redis.RedisCache" if scheme.startswith("redis") else None
    try:
        config: dict[str, object] = environ.Env.cache_url_config(url, backend=backend)
    except (ValueError, KeyError, ImproperlyConfigured):
        raise ImproperlyConfigured(
            "CACHE_URL is not a cache URL: use locmemcache:// or redis://HOST:6379/0."
        ) from None
    return config


# How many worker processes serve the site (uvicorn and gunicorn read it too; make serve
# sets it): several need a shared cache (platform_site.W001).
WEB_CONCURRENCY = int(_number("WEB_CONCURRENCY", 1, integer=True))

DATABASES = {"default": _database(_str("DATABASE_URL", "sqlite:///db.sqlite3"))}
CACHES = {"default": _cache(_str("CACHE_URL", "locmemcache://"))}
# With Redis: the most connections a worker's event loop opens to it, as it needs them.
# 64 ran dry at 500 requests in flight (docs/performance.md); keep WEB_CONCURRENCY times
# this under the Redis server's maxclients.
CACHE_MAX_CONNECTIONS = max(1, int(_number("CACHE_MAX_CONNECTIONS", 256, integer=True)))

# Sessions in the cache and the database, and the signed-in user from this process's
# copies: an API request reads no database (platform_site/sessions.py, auth.py).
SESSION_ENGINE = "platform_site.sessions"
# The throttle first: it refuses a locked-out sign-in before any password is checked.
AUTHENTICATION_BACKENDS = [
    "platform_site.throttle.ThrottledSignInBackend",
    "platform_site.auth.CopiedUserBackend",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]


def _above_zero(name: str, default: float, *, integer: bool = False) -> float:
    number = _number(name, default, integer=integer)
    if number <= 0:
        kind = "a whole number" if integer else "a number"
        raise ImproperlyConfigured(f"Unexpected value {name}={_str(name)!r}: use {kind} above 0.")
    return number


# Sign-in throttling (django-axes; platform_site/throttle.py). Failures count per user
# name and client address together: by user name alone, anyone could lock the admin out
# from anywhere. Counted in the database, so every worker sees them; a success clears
# them; an admin unlocks by deleting the attempt (admin, or `manage.py axes_reset`).
AXES_FAILURE_LIMIT = int(_above_zero("LOGIN_FAILURE_LIMIT", 5, integer=True))
AXES_COOLOFF_TIME = timedelta(minutes=_above_zero("LOGIN_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_HTTP_RESPONSE_CODE = 429
AXES_LOCKOUT_CALLABLE = "platform_site.throttle.lockout_response"
# No start-up line on every command; failures are still logged (user and address masked:
# the admin's *Access attempts* shows them).
AXES_VERBOSE = False
# The client is REMOTE_ADDR (uvicorn sets it from X-Forwarded-For of FORWARDED_ALLOW_IPS);
# X-Forwarded-For itself counts only from these proxies: anyone can write it.
AXES_CLIENT_IP_CALLABLE = "platform_site.throttle.client_ip"
# The user name as axes stores it: cut to its column (a longer one typed into a sign-in
# form, which Django does not limit, made PostgreSQL refuse the failure record).
AXES_USERNAME_CALLABLE = "platform_site.throttle.username"
LOGIN_TRUSTED_PROXIES = _networks("LOGIN_TRUSTED_PROXIES", "")

# Error reports (the debug page, e-mails to ADMINS) hide keys and secret settings
# whatever DEBUG says: Django's own filter does nothing under DEBUG=true.
DEFAULT_EXCEPTION_REPORTER_FILTER = "platform_site.errors.SecretsFilter"
DEFAULT_EXCEPTION_REPORTER = "platform_site.errors.SecretsReporter"

LANGUAGE_CODE = "en-us"
TIME_ZONE = _str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# whitenoise serves the collected static files (the admin's) under ASGI in production.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# In development whitenoise serves static files straight from the apps.
WHITENOISE_USE_FINDERS = DEBUG
WHITENOISE_AUTOREFRESH = DEBUG
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "playground"
LOGOUT_REDIRECT_URL = "login"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # The HTTP libraries log every request at INFO; WARNING keeps the log about Keyroute.
    "loggers": {name: {"level": "WARNING"} for name in ("httpx2", "httpcore2", "openai")},
    "root": {
        "handlers": ["console"],
        "level": _choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    },
}
