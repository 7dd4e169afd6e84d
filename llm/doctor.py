"""The doctor: does every route the platform may use answer, and accept its key?

`routes()` lists what to check: the global default (chat), the internal default
(embeddings), the failover route, and the credentials. `diagnose()` checks them all at
once and says, for each failure, what went wrong and how to fix it, in one sentence.
`manage.py check_llm_routes` prints the findings; the admin's *Diagnose* action shows
them on a page. Nothing here prints.

A check costs what the admin's *Test connection* costs and nothing more: GET {base}/models
with the route's key, and GET {root}/health/liveliness without it (LiteLLM answers that
unauthenticated), each within LLM_PROBE_TIMEOUT_SECONDS and without retries. Never a
completion: the doctor may run from cron against a billed account.

Decisions, so that the table means the same thing everywhere:

- The internal default is listed even when it is the global one (OPENAI_INTERNAL_* empty
  or equal): the table then always has the same rows, and a broken embeddings route is
  never hidden behind "same as global".
- A default without a key (OPENAI_API_KEY empty) is "not configured", not a failure:
  calls then need a credential, which is a legitimate set-up. The failover route is
  listed only when LLM_FAILOVER_BASE_URL or LLM_FAILOVER_API_KEY is set; with one of the
  two it is "not configured" (there is no failover route until both are).
- Without a choice, the credentials checked are the live ones (active, not expired):
  the ones calls may use. Credentials named explicitly (`--credential`, the admin's
  selection) are checked in any state, and alone: the defaults are left out.
- A route is "reachable" when its host gave an HTTP answer of any status; a 404 on
  /models is reachable, a 502 from a gateway in front of the proxy is not.
- The probes go to a route whatever its circuit breaker says, and tell the breaker
  nothing: the doctor reports the breaker's state (from the shared cache) next to
  whether the host answers now, and changes neither.
- Each credential's result is remembered in the cache (`remember_findings`) for the
  admin's health column, as *Test connection*'s is.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from credentials.models import PLATFORM, APIKeyCredentials, model_matcher
from credentials.secret import Secret
from llm import breaker, clients
from llm.errors import CONNECTION_FAULTS, LLMError, reading_answer
from llm.routes import Purpose, Route, Source, resolve_route
from llm.services import model_ids

log = logging.getLogger(__name__)

# Checks run at most this many at once (as services.probe does).
THREADS = 8
# How many of a route's models a hint names when the one asked for is missing.
EXAMPLES = 5
# The last probe of each credential (Test connection, Diagnose, the command), for the
# admin's health column: {"ok": bool, "when": ISO 8601, "summary": str}, never a key.
LAST_PROBE = "keyroute:last-probe:{}"
LAST_PROBE_SECONDS = 30 * 24 * 3600

# What the table and the hint line call each fault.
FAULT_NAMES = {
    "refused": "connection refused",
    "dns": "DNS",
    "tls": "TLS",
    "timeout": "timeout",
    "dropped": "connection dropped",
    "connection": "connection failed",
    "bad_gateway": "bad gateway",
    "rejected": "key rejected (401/403)",
    "not_found": "404 on /models",
    "rate_limited": "rate limited (429)",
    "bad_request": "client error",
    "upstream": "server error",
    "malformed": "not a model list",
    "unavailable": "unavailable",
    "model_missing": "model not listed",
    "not_allowed": "model not allowed",
}


@dataclass(frozen=True)
class Target:
    """A route to check, and where a user fixes it.

    `route` is None when there is nothing to call: `missing` says why it is not
    configured, or `problem` why it cannot be used (a key no encryption key opens).
    """

    label: str
    source: str
    base_url: str
    url_setting: str | None  # the variable that sets the base URL; None: the credential's own
    key_fix: str  # a sentence: how to give it the right key
    route: Route | None = None
    credential_id: str | None = None
    missing: str | None = None
    problem: LLMError | None = None
    allowed_models: tuple[str, ...] = ()  # the credential's allow-list (empty: any)


@dataclass(frozen=True)
class Finding:
    """What the doctor found out about one route. No key, nor any part of one."""

    label: str
    source: str
    host: str
    base_url: str
    credential_id: str | None
    configured: bool
    reachable: bool | None  # None: not tried
    key_accepted: bool | None  # None: not known (no answer, or an answer about something else)
    models: tuple[str, ...]
    latency_ms: float | None
    breaker: str  # closed | open | half-open
    liveliness: str | None  # "ok", "absent" (not LiteLLM), "answered N", or None: not tried
    fault: str | None
    hint: str | None  # the one sentence under a failure (or why it is not configured)
    error: str | None  # the error's own sentence, as calls would report it
    ok: bool

    @property
    def fault_name(self) -> str:
        """The fault in a few words: what the line under a failure starts with."""
        if not self.configured:
            return "not configured"
        return FAULT_NAMES.get(self.fault or "", self.fault or "")

    @property
    def summary(self) -> str:
        """A few words for the admin's health column."""
        if not self.configured:
            return "not configured"
        if self.ok:
            return f"OK: {len(self.models)} model(s) in {self.latency_ms or 0:.0f} ms"
        return f"failed: {self.fault_name}"

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["models"] = list(self.models)
        return data


# ---- what to check ------------------------------------------------------------------


def routes(
    credentials: Iterable[APIKeyCredentials] | None = None, *, defaults: bool = True
) -> list[Target]:
    """The defaults (unless `defaults` is false), then `credentials` (every live one
    when None), in that order."""
    targets = _defaults() if defaults else []
    if credentials is None:
        credentials = APIKeyCredentials.objects.live().order_by("title", "pk")
    targets.extend(_credential(credential) for credential in credentials)
    return targets


def _defaults() -> list[Target]:
    global_url, global_key = settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY
    internal_url, internal_key = settings.OPENAI_INTERNAL_BASE_URL, settings.OPENAI_INTERNAL_API_KEY
    targets = [
        _default(
            "global default",
            "global",
            "chat",
            global_url,
            global_key,
            url_setting="OPENAI_BASE_URL",
            key_setting="OPENAI_API_KEY",
            missing="OPENAI_API_KEY is not set: calls without a credential are refused. "
            "Set it to give them a route.",
        ),
        _default(
            "internal default",
            "internal",
            "embeddings",
            internal_url,
            internal_key,
            url_setting="OPENAI_INTERNAL_BASE_URL",
            key_setting="OPENAI_INTERNAL_API_KEY",
            missing="Neither OPENAI_INTERNAL_API_KEY nor OPENAI_API_KEY is set: embeddings "
            "without a credential are refused. Set one to give them a route.",
        ),
    ]
    failover_url, failover_key = settings.LLM_FAILOVER_BASE_URL, settings.LLM_FAILOVER_API_KEY
    if failover_url or failover_key:
        unset = "LLM_FAILOVER_API_KEY" if failover_url else "LLM_FAILOVER_BASE_URL"
        targets.append(
            _default(
                "failover",
                "failover",
                "chat",
                failover_url,
                failover_key if failover_url else "",
                url_setting="LLM_FAILOVER_BASE_URL",
                key_setting="LLM_FAILOVER_API_KEY",
                missing=f"{unset} is not set: there is no failover route until "
                "LLM_FAILOVER_BASE_URL and LLM_FAILOVER_API_KEY are both set.",
            )
        )
    return targets


def _default(
    label: str,
    source: Source,
    purpose: Purpose,
    base_url: str,
    key: str,
    *,
    url_setting: str,
    key_setting: str,
    missing: str,
) -> Target:
    target = Target(
        label, source, base_url, url_setting, f"Set {key_setting} to a key the proxy accepts."
    )
    if not key:
        return dataclasses.replace(target, missing=missing)
    route = Route(purpose=purpose, base_url=base_url, api_key=Secret(key), source=source)
    return dataclasses.replace(target, route=route)


def _credential(credential: APIKeyCredentials) -> Target:
    target = Target(
        label=f"credential {credential.title!r}",
        source="credential",
        base_url=credential.effective_base_url,
        url_setting=None if credential.base_url else "OPENAI_BASE_URL",
        key_fix="Enter the right key in the admin.",
        credential_id=str(credential.pk),
        allowed_models=tuple(credential.allowed_models),
    )
    try:
        route = resolve_route("chat", credential, user=PLATFORM, allow_inactive=True)
    except LLMError as error:  # a key no configured encryption key opens
        return dataclasses.replace(target, problem=error)
    return dataclasses.replace(target, route=route)


# ---- checking -----------------------------------------------------------------------


def diagnose(targets: Sequence[Target], *, model: str | None = None) -> list[Finding]:
    """Check every target at once; the findings come in the order of `targets`.

    `model`: a route whose list lacks it fails too.
    """
    if not targets:
        return []
    with ThreadPoolExecutor(min(THREADS, len(targets)), "doctor") as pool:
        findings = list(pool.map(lambda target: _examine(target, model), targets))
    return _compare_internal(findings)


@dataclass
class _Listing:
    models: tuple[str, ...] = ()
    latency_ms: float | None = None
    error: LLMError | None = None


def _list_models(route: Route) -> _Listing:
    started = time.perf_counter()
    try:
        with clients.lease(route, probe=True) as client:
            started = time.perf_counter()  # the request's time, not the client's building
            page = client.models.list()
            with reading_answer(route):
                models = tuple(model_ids(page))
    except LLMError as error:
        return _Listing(latency_ms=round((time.perf_counter() - started) * 1000, 1), error=error)
    return _Listing(models, round((time.perf_counter() - started) * 1000, 1))


def _examine(target: Target, model: str | None) -> Finding:
    state = breaker.status(target.base_url)
    finding = Finding(
        label=target.label,
        source=target.source,
        host=urlsplit(target.base_url).netloc,
        base_url=target.base_url,
        credential_id=target.credential_id,
        configured=target.missing is None,
        reachable=None,
        key_accepted=None,
        models=(),
        latency_ms=None,
        breaker=state.state,
        liveliness=None,
        fault=None,
        hint=target.missing,
        error=None,
        ok=target.missing is not None,  # not configured is not a failure
    )
    if target.problem is not None:
        return dataclasses.replace(
            finding, fault=target.problem.fault, hint=str(target.problem), error=str(target.problem)
        )
    route = target.route
    if route is None:
        return finding
    listing = _list_models(route)
    error = listing.error
    finding = dataclasses.replace(finding, latency_ms=listing.latency_ms, models=listing.models)
    if error is None:
        finding = dataclasses.replace(finding, reachable=True, key_accepted=True, ok=True)
        if model and model not in listing.models:
            finding = dataclasses.replace(
                finding, ok=False, fault="model_missing", hint=_model_missing(route, model, finding)
            )
        elif hint := _allow_list_problem(target, model, finding):
            finding = dataclasses.replace(finding, ok=False, fault="not_allowed", hint=hint)
    else:
        # "unavailable": refused before any request (the base URL policy): not tried.
        tried = error.fault != "unavailable"
        # A 404 here is about the URL, not a model (which the error's sentence assumes).
        said = f"GET {route.base_url}/models answered 404." if error.fault == "not_found" else None
        finding = dataclasses.replace(
            finding,
            reachable=error.fault not in CONNECTION_FAULTS if tried else None,
            key_accepted=False if error.fault == "rejected" else None,
            fault=error.fault,
            hint=_hint(target, route, error),
            error=said or _scrubbed(str(error), route),
        )
    if finding.reachable:
        finding = dataclasses.replace(finding, liveliness=_liveliness(route))
    return finding


def _scrubbed(text: str, route: Route) -> str:
    """`text` without the key's last four characters either: an upstream's words may
    echo a masked key (LiteLLM's 401 says "Received API Key = sk-...7tUv"). The full key
    is already gone (clients.translate); the doctor shows no part of one."""
    key = route.api_key.get_secret_value()
    if len(key) < 4:
        return text
    return re.sub(r"\S*" + re.escape(key[-4:]), "[key]", text)


def _liveliness(route: Route) -> str:
    try:
        status = clients.probe_status(route, f"{_root(route.base_url)}/health/liveliness")
    except LLMError as error:
        return f"failed: {FAULT_NAMES.get(error.fault, error.fault)}"
    return {200: "ok", 404: "absent"}.get(status, f"answered {status}")


def _root(base_url: str) -> str:
    """The proxy's own root: the base URL without its /v1 (LiteLLM's /health lives there)."""
    root = base_url.rstrip("/")
    while root.endswith("/v1"):
        root = root[: -len("/v1")]
    return root


# ---- hints --------------------------------------------------------------------------


def _hint(target: Target, route: Route, error: LLMError) -> str:
    host, base = route.host, route.base_url
    fault = error.fault
    if fault == "not_found":
        return _not_found(target, route)
    if fault == "rejected":
        return (
            f"The proxy at {host} refused the key (401/403): it does not match the proxy's "
            f"keys. {target.key_fix}"
        )
    sentences = {
        "refused": f"Nothing listens at {host}: is the proxy running, and on this port?",
        "dns": f"The host name {urlsplit(base).hostname} does not resolve: is it spelled "
        "right, and is this machine on the proxy's network?",
        "tls": f"The TLS handshake with {host} failed: is its certificate self-signed, expired "
        "or made out to another host name? Or does it speak plain http://?",
        "timeout": f"{host} did not answer within LLM_PROBE_TIMEOUT_SECONDS "
        f"({settings.LLM_PROBE_TIMEOUT_SECONDS:g} s): the proxy is overloaded or stuck; check "
        "its logs.",
        "dropped": f"{host} closed the connection without answering: is this the proxy's port, "
        "and does it speak HTTP? Check its logs.",
        "connection": f"The connection to {host} failed: check the network between here and "
        "the proxy, and the proxy's logs.",
        "bad_gateway": f"A gateway at {host} answered that the proxy behind it is unavailable: "
        "is the proxy running, and can the gateway reach it?",
        "rate_limited": f"{host} is rate limiting this key (429): wait, or raise the key's "
        "limits on the proxy.",
        "bad_request": f"{host} refused GET {base}/models as a bad request: is {base} the "
        f"proxy's OpenAI endpoint? Correct {_url_place(target)}.",
        "upstream": f"{host} failed with a server error on GET {base}/models: check the "
        "proxy's logs.",
        "malformed": f"{host} answered GET {base}/models with something that is not a model "
        f"list: is {base} the proxy's OpenAI endpoint (often ending in /v1)? Correct "
        f"{_url_place(target)}.",
    }
    return sentences.get(fault, str(error))


def _not_found(target: Target, route: Route) -> str:
    """GET {base}/models answered 404: try the other form of the base URL."""
    base = route.base_url.rstrip("/")
    if base.endswith("/v1/v1"):
        other = base[: -len("/v1")]
        works = _list_models(dataclasses.replace(route, base_url=other)).error is None
        doubled = f"The base URL ends in /v1/v1: /v1 is doubled (GET {base}/models answered 404)."
        if works:
            return f"{doubled} It works as {other}: {_set_url(target, other)}."
        return f"{doubled} Use {other}, and check that the proxy runs there."
    if base.endswith("/v1"):
        other, form = base[: -len("/v1")], "without /v1"
    else:
        other, form = f"{base}/v1", "with /v1"
    if _list_models(dataclasses.replace(route, base_url=other)).error is None:
        return (
            f"GET {base}/models answered 404, but the proxy works {form}: "
            f"{_set_url(target, other)}."
        )
    return (
        f"GET {base}/models answered 404, and so does {other}/models: is {route.host} an "
        f"OpenAI-compatible proxy? Correct {_url_place(target)}."
    )


def _url_place(target: Target) -> str:
    """Where the target's base URL is set, for "Correct ...": a variable or the admin."""
    if target.url_setting is None:
        return "the credential's base URL in the admin"
    if target.source == "credential":
        return f"{target.url_setting} (this credential has no base URL of its own)"
    return target.url_setting


def _set_url(target: Target, url: str) -> str:
    if target.url_setting is None:
        return f"set the credential's base URL to {url} in the admin (and enter its key again)"
    if target.source == "credential":
        return (
            f"set {target.url_setting}={url} (this credential has no base URL of its own), "
            "or give the credential that base URL in the admin"
        )
    return f"set {target.url_setting}={url}"


def _model_missing(route: Route, model: str, finding: Finding) -> str:
    examples = ", ".join(finding.models[:EXAMPLES]) or "none"
    more = ", ..." if len(finding.models) > EXAMPLES else ""
    return (
        f"The model {model!r} is not among the {len(finding.models)} model(s) this key may "
        f"use at {route.host} ({examples}{more}): check the name, or add the model to the "
        "proxy's config."
    )


def _allow_list_problem(target: Target, model: str | None, finding: Finding) -> str | None:
    """What the credential's allow-list refuses that users will ask for: `model`, or
    every model its key may use."""
    allowed = target.allowed_models
    if not allowed:
        return None
    test = model_matcher(allowed)
    if model and not test(model):
        return (
            f"The credential's allowed models ({', '.join(allowed)}) do not include {model!r}: "
            "calls for it are refused. Add it to the allowed models in the admin."
        )
    if finding.models and not any(test(name) for name in finding.models):
        return (
            f"None of the {len(finding.models)} model(s) this key may use at {finding.host} "
            f"matches the credential's allowed models ({', '.join(allowed)}): every call "
            "would be refused. Correct the allowed models in the admin."
        )
    return None


def _compare_internal(findings: list[Finding]) -> list[Finding]:
    """The internal route fails while the global one works: say OPENAI_INTERNAL_BASE_URL."""
    by_source = {finding.source: finding for finding in findings if finding.source != "credential"}
    public, internal = by_source.get("global"), by_source.get("internal")
    if not (public and internal and public.ok and public.configured):
        return findings
    if internal.ok or not internal.configured or internal.base_url == public.base_url:
        return findings
    note = (
        f" The global route works: OPENAI_INTERNAL_BASE_URL ({internal.base_url}) differs "
        f"from OPENAI_BASE_URL ({public.base_url}); correct it, or leave it empty to follow "
        "OPENAI_BASE_URL."
    )
    fixed = dataclasses.replace(internal, hint=(internal.hint or "") + note)
    return [fixed if finding is internal else finding for finding in findings]


# ---- the last probe of each credential (the admin's health column) -----------------


def remember(credential_id: Any, *, ok: bool, summary: str) -> None:
    remember_many({credential_id: (ok, summary)})


def remember_findings(findings: Iterable[Finding]) -> None:
    remember_many(
        {f.credential_id: (f.ok, f.summary) for f in findings if f.credential_id and f.configured}
    )


def remember_many(results: dict[Any, tuple[bool, str]]) -> None:
    """Write the last probe of each credential; a cache that fails loses only that."""
    when = timezone.now().isoformat()
    values = {
        LAST_PROBE.format(pk): {"ok": ok, "when": when, "summary": summary[:200]}
        for pk, (ok, summary) in results.items()
    }
    if not values:
        return
    try:
        cache.set_many(values, LAST_PROBE_SECONDS)
    except Exception as error:
        log.warning("Could not remember the last probe (%s).", type(error).__name__)


def last_probes(credential_ids: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """The last probe of each credential that has one, by str(id): one cache read."""
    keys = {LAST_PROBE.format(pk): str(pk) for pk in credential_ids}
    if not keys:
        return {}
    try:
        found = cache.get_many(list(keys))
    except Exception as error:
        log.warning("Could not read the last probes (%s).", type(error).__name__)
        return {}
    probes = {}
    for key, value in found.items():
        if isinstance(value, dict):
            value = dict(value)
            value["when"] = _parse_when(value.get("when"))
            probes[keys[key]] = value
    return probes


def _parse_when(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None
