"""What can go wrong on the way to an LLM, as sentences a user can act on.

Every error names the credential's title and the host (as configured, never a resolved
address) and never the key. Each carries the HTTP status a view should answer with.
The SDK's exceptions are translated here and nowhere else (`from_sdk_error`).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx2
import openai

if TYPE_CHECKING:
    from llm.routes import Route


class LLMError(Exception):
    status = 502

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class CredentialUnavailable(LLMError):
    """The credential (or the global default) cannot be used; no call was made."""

    status = 403

    def __init__(self, message: str, *, reason: str, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.reason = reason


class ProxyUnreachable(LLMError):
    """Connection refused, name not resolved, or no answer within the time budget."""

    status = 502


class CredentialRejected(LLMError):
    """The upstream answered 401 or 403 to this key."""

    status = 502


class RateLimited(LLMError):
    status = 429

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelNotFound(LLMError):
    status = 400


class UpstreamError(LLMError):
    """A 5xx, an unexpected status, a dropped connection or an answer that is not JSON."""

    status = 502


# What resolvers say when a name does not resolve (glibc, musl, macOS). Not "dns": the
# error text carries the host, and a proxy named dns-gateway is refused, not unresolved.
DNS_FAILURES = (
    "name or service not known",
    "temporary failure in name resolution",
    "nodename nor servname",
    "no address associated",
    "getaddrinfo failed",
)
DNS_ERRORS = (socket.gaierror, aiohttp.ClientConnectorDNSError)
# The SDK's transports wrap these in different exceptions (the aiohttp one even calls a
# refused connection a connect timeout), so the cause chain is what tells them apart.
CONNECT_FAILURES = (
    ConnectionRefusedError,
    socket.gaierror,
    aiohttp.ClientConnectorError,
    httpx2.ConnectError,
)
DROPPED = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    httpx2.RemoteProtocolError,
    httpx2.ReadError,
)
SDK_ERRORS = (openai.OpenAIError,)


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def malformed_answer(route: Route) -> UpstreamError:
    return UpstreamError(
        f"The LLM proxy at {route.host} sent an answer that is not an OpenAI-compatible "
        f"response, for {_who(route)}. Is {route.base_url} the proxy's OpenAI endpoint "
        "(often ending in /v1)?"
    )


def _who(route: Route) -> str:
    if route.credential_title:
        return f"credential {route.credential_title!r}"
    return {
        "global": "the global default (OPENAI_API_KEY)",
        "internal": "the internal default (OPENAI_INTERNAL_API_KEY)",
        "failover": "the failover route (LLM_FAILOVER_API_KEY)",
    }.get(route.source, "this route")


def _upstream_detail(error: openai.APIStatusError, route: Route) -> str:
    """The upstream's own error message, short, with the key scrubbed out."""
    body: Any = error.body
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message", "")
    text = body if isinstance(body, str) else json.dumps(body) if body else ""
    key = route.api_key.get_secret_value()
    if key:
        text = text.replace(key, "[key]")
    text = " ".join(text.split())[:200]
    return f' It said: "{text}"' if text else ""


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def from_sdk_error(
    error: openai.OpenAIError, route: Route, *, model: str | None = None
) -> LLMError:
    """The LLMError for an exception the OpenAI SDK raised while calling `route`."""
    host, base = route.host, route.base_url
    who = _who(route)
    causes = list(_causes(error))
    if any(isinstance(cause, CONNECT_FAILURES) for cause in causes):
        text = " ".join(str(cause) for cause in causes).lower()
        unresolved = any(isinstance(cause, DNS_ERRORS) for cause in causes) or any(
            phrase in text for phrase in DNS_FAILURES
        )
        why = "host name not resolved" if unresolved else "connection refused"
        return ProxyUnreachable(
            f"Could not connect to the LLM proxy at {host} ({why}) for {who}. Is the proxy "
            f"running? Try: curl {base.rsplit('/v1', 1)[0]}/health/liveliness"
        )
    if any(isinstance(cause, DROPPED) for cause in causes):
        return UpstreamError(
            f"The LLM proxy at {host} closed the connection without answering {who}. "
            f"Check its logs; try: curl {base}/models"
        )
    if isinstance(error, openai.APITimeoutError):
        return ProxyUnreachable(
            f"The LLM proxy at {host} did not answer in time for {who}. Is it overloaded or "
            f"stuck? Try: curl {base}/models (the time budget is LLM_TIMEOUT_SECONDS).",
            status=504,
        )
    if isinstance(error, openai.APIConnectionError):
        return UpstreamError(
            f"The connection to the LLM proxy at {host} failed for {who}. "
            f"Check its logs; try: curl {base}/models"
        )
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        detail = _upstream_detail(error, route)
        if status in (401, 403):
            return CredentialRejected(
                f"The LLM proxy at {host} rejected the key of {who} ({status}): the key does "
                f"not match the proxy's keys, or it may not use this model. Enter the right "
                f"key in the admin.{detail}"
            )
        if status == 404:
            return ModelNotFound(
                f"The model {model!r} is not available at {host} for {who}. Check the model "
                f"name; GET {base}/models lists the ones this key may use.{detail}"
            )
        if status == 429:
            retry_after = _retry_after(error.response)
            wait = f" Try again in {retry_after:g} s." if retry_after is not None else ""
            return RateLimited(
                f"The LLM proxy at {host} is rate limiting {who} (429).{wait}{detail}",
                retry_after=retry_after,
            )
        return UpstreamError(
            f"The LLM proxy at {host} answered {status} to {who}. Check the proxy's logs.{detail}"
        )
    if isinstance(error, openai.APIResponseValidationError):
        return malformed_answer(route)
    return UpstreamError(
        f"The call to the LLM proxy at {host} failed for {who} ({type(error).__name__})."
    )
