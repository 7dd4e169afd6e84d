"""Sign-in throttling with django-axes: whose failures count together, and what they see.

Failed sign-ins on both sign-in pages (`/accounts/login/`, `/admin/login/`) are counted
in the database (every worker sees them) per user name *and* client address
(AXES_LOCKOUT_PARAMETERS in settings.py): locking a user name alone would let anyone,
from anywhere, keep the admin out with a few wrong passwords a quarter of an hour. After
LOGIN_FAILURE_LIMIT failures that pair is refused for LOGIN_COOLOFF_MINUTES from its last
attempt; a success clears its count; an admin lifts a lock by deleting the attempt
(admin: *Axes → Access attempts*) or with `manage.py axes_reset`.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

from axes.backends import AxesStandaloneBackend  # type: ignore[import-untyped]
from axes.helpers import get_cool_off  # type: ignore[import-untyped]
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ThrottledSignInBackend(AxesStandaloneBackend):  # type: ignore[misc]
    """axes' backend (it refuses a locked-out pair before any password is checked).

    A call without a request (the shell, a management command, the test client's
    `login()`) has no client to count against and is passed on unthrottled: both
    sign-in pages always pass theirs.
    """

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> None:
        if request is None:
            return None
        super().authenticate(request, username, password, **kwargs)
        return None


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(address: Address | None) -> bool:
    if address is None:
        return False
    networks = (ipaddress.ip_network(n, strict=False) for n in settings.LOGIN_TRUSTED_PROXIES)
    return any(address.version == net.version and address in net for net in networks)


def client_ip(request: HttpRequest) -> str | None:
    """The address a failed sign-in counts against (AXES_CLIENT_IP_CALLABLE).

    REMOTE_ADDR, which uvicorn (`--proxy-headers`) has already set to the client when a
    proxy in FORWARDED_ALLOW_IPS forwarded the request. X-Forwarded-For is read only
    when REMOTE_ADDR is in LOGIN_TRUSTED_PROXIES: anyone else can write any address
    there, a new one for each attempt, and would never be locked out. Each proxy appends
    the address it saw, so the client is the right-most address that is not a trusted
    proxy; what a client writes in front of it is ignored. An entry that is not an
    address stops the walk at the last address a trusted proxy vouched for.
    """
    remote: str | None = request.META.get("REMOTE_ADDR") or None
    vouched = remote
    if not _trusted(_address(remote or "")):
        return remote
    forwarded = str(request.META.get("HTTP_X_FORWARDED_FOR", ""))
    for entry in reversed(forwarded.split(",")):
        address = _address(entry)
        if address is None:
            return vouched
        vouched = str(address)
        if not _trusted(address):
            return vouched
    return vouched


def _duration(seconds: int) -> str:
    """15 minutes, 2 minutes 30 seconds, 1 hour."""
    parts = []
    for unit, size in (("hour", 3600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {unit}{'' if count == 1 else 's'}")
    return " ".join(parts) or "a moment"


def lockout_response(request: HttpRequest, *ignored: Any) -> HttpResponse:
    """The page a locked-out pair gets instead of the sign-in form (AXES_LOCKOUT_CALLABLE).

    429 with Retry-After. The lock lasts the cool-off from the last attempt, and this
    attempt counts as one, so the pause ends a full cool-off from now. The user name is
    the one typed (escaped); the password is never used. axes passes its other
    arguments in a different order under ASGI than under WSGI: none is needed.
    """
    cool_off = get_cool_off(request)
    seconds = max(1, math.ceil(cool_off.total_seconds()))
    context = {
        "username": request.POST.get("username", ""),
        "wait": _duration(seconds),
        "retry_at": timezone.now() + cool_off,
    }
    response = render(
        request, "registration/locked_out.html", context, status=settings.AXES_HTTP_RESPONSE_CODE
    )
    response["Retry-After"] = str(seconds)
    return response


# AccessAttempt.username and AccessFailureLog.username are 255 characters.
USERNAME_LENGTH = 255


def username(request: HttpRequest, credentials: dict[str, Any] | None = None) -> str | None:
    """The user name a failure counts against (AXES_USERNAME_CALLABLE): the one typed in,
    cut to the length axes stores. Django's sign-in form does not limit it."""
    field = getattr(settings, "AXES_USERNAME_FORM_FIELD", "username")  # axes' default
    name = (credentials or {}).get(field) if credentials else request.POST.get(field)
    return name[:USERNAME_LENGTH] if isinstance(name, str) else None
