"""What can go wrong on the way to an LLM, as sentences a user can act on.

Every error names the credential's title and the host (as configured; a resolved
address only when the policy refused it) and never the key. Each carries the HTTP
status a view should answer with.
This module knows no SDK: the client lease (llm.clients) decides which of these an
SDK exception is, in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm.routes import Route


# Faults where the upstream gave no answer (or a gateway said it could not reach its own):
# they count against a base URL's circuit breaker and send a call on to its fallback.
CONNECTION_FAULTS = frozenset(
    {"refused", "dns", "tls", "timeout", "dropped", "connection", "bad_gateway", "circuit_open"}
)
# Faults where nothing was sent (the SDK could not encode the request; the transport
# refused the address): they say nothing about the upstream, for the breaker or anyone.
# Refusals of the platform's own limits (llm.limits) are among them: no request left.
REFUSED_HERE = frozenset({"not_allowed", "over_budget", "limited"})
UNSENT_FAULTS = frozenset({"unsendable", "unavailable"}) | REFUSED_HERE


class LLMError(Exception):
    """`fault` names what went wrong in one word (metrics, the doctor, the breaker)."""

    status = 502
    fault = "error"
    retry_after: float | None = None  # seconds, sent as Retry-After

    def __init__(
        self, message: str, *, status: int | None = None, fault: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if fault is not None:
            self.fault = fault

    @property
    def sent(self) -> bool:
        """The request left the process (whatever came back)."""
        return self.fault not in UNSENT_FAULTS

    @property
    def connection_level(self) -> bool:
        """No answer came from the upstream: fail over; never true of a 4xx."""
        return self.fault in CONNECTION_FAULTS

    def __str__(self) -> str:
        return self.message


class CredentialUnavailable(LLMError):
    """The credential (or the global default) cannot be used; no call was made."""

    status = 403
    fault = "unavailable"

    def __init__(self, message: str, *, reason: str, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.reason = reason


class ProxyUnreachable(LLMError):
    """Connection refused, name not resolved, TLS failed, no answer within the time
    budget, or every route's circuit breaker is open."""

    status = 502
    fault = "refused"


class CredentialRejected(LLMError):
    """The upstream answered 401 or 403 to this key.

    A 403 to the user: the request was understood, but this credential cannot make it
    (never a 401, which would say the user's own session is the problem)."""

    status = 403
    fault = "rejected"


class ModelNotAllowed(CredentialRejected):
    """The upstream knows the key, but the key may not use the model asked for
    (LiteLLM's per-key model access)."""

    fault = "model_not_allowed"


class RateLimited(LLMError):
    status = 429
    fault = "rate_limited"

    def __init__(
        self, message: str, *, retry_after: float | None = None, fault: str | None = None
    ) -> None:
        super().__init__(message, fault=fault)
        self.retry_after = retry_after


class BudgetExceeded(LLMError):
    """The credential, or the user on it, spent its monthly budget (llm.limits)."""

    status = 402
    fault = "over_budget"


class ModelNotFound(LLMError):
    status = 400
    fault = "not_found"


class UpstreamError(LLMError):
    """A 5xx, an unexpected status, a dropped connection or an answer that is not JSON."""

    status = 502
    fault = "upstream"


class UnsendableRequest(LLMError):
    """The request holds what the SDK cannot encode (a lone UTF-16 surrogate, nesting
    deeper than Python's encoder recurses): refused before anything was sent. The API
    refuses such input itself (llm.requests); this is what other callers get."""

    status = 400
    fault = "unsendable"


def who(route: Route) -> str:
    if route.credential_title:
        return f"credential {route.credential_title!r}"
    return {
        "global": "the global default (OPENAI_API_KEY)",
        "internal": "the internal default (OPENAI_INTERNAL_API_KEY)",
        "failover": "the failover route (LLM_FAILOVER_API_KEY)",
    }.get(route.source, "this route")


UNREACHABLE = {
    "refused": "connection refused",
    "dns": "host name not resolved",
    "tls": "TLS handshake failed: check the certificate",
}


def unreachable(route: Route, fault: str) -> ProxyUnreachable:
    """`fault` is one of UNREACHABLE's keys."""
    root = route.base_url.rsplit("/v1", 1)[0]
    return ProxyUnreachable(
        f"Could not connect to the LLM proxy at {route.host} ({UNREACHABLE[fault]}) for "
        f"{who(route)}. Is the proxy running? Try: curl {root}/health/liveliness",
        fault=fault,
    )


def egress_refused(route: Route, host: str, address: str, problem: str) -> CredentialUnavailable:
    """The transport would not connect: `host` resolved to an `address` the base-URL
    policy refuses (llm.egress). Nothing was sent; no fallback is tried."""
    named = f"its host {host} resolves to {address}" if host != address else f"{host}"
    return CredentialUnavailable(
        f"The base URL of {who(route)} is refused: {named}. {problem} Nothing was sent.",
        reason="base_url_refused",
    )


def timed_out(route: Route, budget: str) -> ProxyUnreachable:
    return ProxyUnreachable(
        f"The LLM proxy at {route.host} did not answer in time for {who(route)}. Is it "
        f"overloaded or stuck? Try: curl {route.base_url}/models (the time budget is {budget}).",
        status=504,
        fault="timeout",
    )


# A fault in a few words: why a route was passed over ("served by B because A was ...").
IN_SHORT = {
    "refused": "connection refused",
    "dns": "host name not resolved",
    "tls": "TLS failed",
    "timeout": "no answer in time",
    "dropped": "connection dropped",
    "connection": "connection failed",
    "bad_gateway": "gateway error",
    "circuit_open": "circuit breaker open",
}


def circuit_open(route: Route, retry_in: float) -> ProxyUnreachable:
    """No call was sent: the route's breaker is open (llm.breaker)."""
    error = ProxyUnreachable(
        f"The LLM proxy at {route.host} is down for {who(route)}: its last connections "
        f"failed, so calls to it pause for {max(1, round(retry_in))} s more. Try again then; "
        "`manage.py check_llm_routes` says what is wrong.",
        status=503,
        fault="circuit_open",
    )
    error.retry_after = max(1.0, retry_in)
    return error


def dropped(route: Route) -> UpstreamError:
    return UpstreamError(
        f"The LLM proxy at {route.host} closed the connection without answering "
        f"{who(route)}. Check its logs; try: curl {route.base_url}/models",
        fault="dropped",
    )


def connection_failed(route: Route) -> UpstreamError:
    return UpstreamError(
        f"The connection to the LLM proxy at {route.host} failed for {who(route)}. "
        f"Check its logs; try: curl {route.base_url}/models",
        fault="connection",
    )


def answered(
    route: Route,
    status: int,
    detail: str,
    *,
    model: str | None = None,
    retry_after: float | None = None,
    model_refused: bool = False,
) -> LLMError:
    """The error for an upstream's answer with an error status; `detail` is its words.
    `model_refused`: the answer says the key may not use `model`."""
    host, base = route.host, route.base_url
    said = f' It said: "{detail}"' if detail else ""
    if status in (401, 403) and model_refused and model is not None:
        return ModelNotAllowed(
            f"The LLM proxy at {host} does not let {who(route)} use the model {model!r} "
            f"({status}): its key may use other models only. Choose one that GET "
            f"{base}/models lists for this key, or ask the proxy's admin to allow it.{said}"
        )
    if status == 401:
        return CredentialRejected(
            f"The LLM proxy at {host} rejected the key of {who(route)} (401): the key does "
            f"not match the proxy's keys. Enter the right key in the admin.{said}"
        )
    if status == 403:
        return CredentialRejected(
            f"The LLM proxy at {host} rejected the key of {who(route)} (403): the key is "
            "not allowed to do this (a blocked or expired key, or a model or route it may "
            f"not use). Check the key on the proxy, or enter another in the admin.{said}"
        )
    if status == 404 and model is None:
        # No model was asked for: the path is wrong (GET {base}/models), not a name.
        return UpstreamError(
            f"The LLM proxy at {host} answered 404 to {who(route)}: is {base} its OpenAI "
            f"endpoint (often ending in /v1)? `manage.py check_llm_routes` tries both.{said}",
            fault="not_found",
        )
    if status == 404:
        return ModelNotFound(
            f"The model {model!r} is not available at {host} for {who(route)}. Check the "
            f"model name; GET {base}/models lists the ones this key may use.{said}"
        )
    if status == 429:
        wait = f" Try again in {retry_after:g} s." if retry_after is not None else ""
        return RateLimited(
            f"The LLM proxy at {host} is rate limiting {who(route)} (429).{wait}{said}",
            retry_after=retry_after,
        )
    if status in (502, 503, 504):
        # A gateway in front of the proxy (or the proxy's own) could not reach it.
        return UpstreamError(
            f"The LLM proxy at {host} is unavailable ({status}) for {who(route)}. Is it "
            f"running behind its gateway? Try: curl {base}/models{said}",
            fault="bad_gateway",
        )
    return UpstreamError(
        f"The LLM proxy at {host} answered {status} to {who(route)}. Check the proxy's logs.{said}",
        fault="bad_request" if 400 <= status < 500 else "upstream",
    )


def model_not_allowed(title: str, model: str, allowed: list[str]) -> ModelNotAllowed:
    """The credential's allow-list has no `model`: refused before anything was sent."""
    return ModelNotAllowed(
        f"Credential {title!r} may not use the model {model!r}: it allows "
        f"{', '.join(allowed)}. Choose one of those, or ask an admin to add the model to "
        "the credential's allowed models.",
        fault="not_allowed",
    )


def call_failed(route: Route, kind: str) -> UpstreamError:
    return UpstreamError(
        f"The call to the LLM proxy at {route.host} failed for {who(route)} ({kind}).",
        fault="upstream",
    )


def malformed_answer(route: Route) -> UpstreamError:
    return UpstreamError(
        f"The LLM proxy at {route.host} sent an answer that is not an OpenAI-compatible "
        f"response, for {who(route)}. Is {route.base_url} the proxy's OpenAI endpoint "
        "(often ending in /v1)?",
        fault="malformed",
    )


def unsendable(route: Route, error: BaseException) -> UnsendableRequest:
    """The SDK could not encode the request for `route` (`error`); nothing was sent."""
    if isinstance(error, UnicodeEncodeError):
        code = ord(error.object[error.start]) if isinstance(error.object, str) else 0
        what = f"it contains a lone UTF-16 surrogate (\\u{code:04x}), which cannot be sent"
    else:
        what = "it is nested too deeply to encode"
    return UnsendableRequest(
        f"The request for {who(route)} to the LLM proxy at {route.host} was not sent: {what}. "
        "Send valid Unicode text, nested a few levels deep at most."
    )


# What reading an answer of the wrong shape raises (int() of an infinite float overflows;
# an answer nested thousands of levels deep exhausts the parser's recursion).
MALFORMED = (
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    RecursionError,
)


@contextmanager
def reading_answer(route: Route) -> Iterator[None]:
    """Inside: reading the upstream's answer. An answer of the wrong shape is an LLMError."""
    try:
        yield
    except MALFORMED:
        raise malformed_answer(route) from None
