"""Which base URLs an API key may be sent to.

One policy for the model, the admin, the system checks and the client builder
(llm.clients checks a base URL again before it builds a client for it):

- http or https only; no user-info, query or fragment; no white space, control
  characters, backslashes or percent-encoding in the host;
- link-local and cloud-metadata addresses are always refused, in every spelling
  (dotted, integer, hex, octal, IPv4-mapped/compatible and NAT64 IPv6, trailing dot);
- loopback and private hosts are allowed (the proxy usually lives there), unless the
  site sets LLM_ALLOWED_BASE_URL_HOSTS and the host is not on it, or sets
  LLM_BLOCK_PRIVATE_NETWORKS=true (every base URL public): then loopback, private,
  shared (100.64.0.0/10), benchmarking, reserved, multicast and IPv6 unique-local
  addresses, and `localhost` names, are refused too.

Host names are not resolved here: validation must not depend on DNS. The clients'
transport (llm.egress) resolves them when it connects, judges every address with
`address_problem`, and connects only to the addresses it judged.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_HOSTS = frozenset(
    {
        "metadata.google.internal",
        "metadata.goog",
        "metadata",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("192.0.0.192"),  # Oracle Cloud
    }
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
# Named in LLM_BLOCK_PRIVATE_NETWORKS refusals (ipaddress's is_global covers them all).
SHARED = ipaddress.ip_network("100.64.0.0/10")
BENCHMARKING = ipaddress.ip_network("198.18.0.0/15")
THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
REFUSED_ADDRESS = (
    "Link-local and cloud-metadata addresses are never allowed: they would hand the "
    "server's own cloud credentials to whoever controls the request."
)


def normalize_base_url(value: str) -> str:
    """Surrounding white space and trailing slashes stripped; `/v1` never added or removed."""
    return value.strip().rstrip("/")


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address `host` means to inet_aton(3): 1-4 parts, each decimal, 0x-hex or 0-octal.

    `2852039166`, `0xa9fea9fe`, `0251.0376.0251.0376` and `169.254.43518` all mean
    169.254.169.254 to the C library, so they must be judged as that address.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        try:
            if part.lower().startswith("0x"):
                numbers.append(int(part[2:], 16) if part[2:] else 0)
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part, 8))
            elif part.isdigit():
                numbers.append(int(part))
            else:
                return None
        except ValueError:
            return None
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for index, number in enumerate(leading):
        value |= number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return parse_legacy_ipv4(host)


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, if any.

    IPv4-mapped (::ffff:a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d), IPv4-compatible
    (::a.b.c.d), 6to4 (2002:AABB:CCDD::) and NAT64, well-known (64:ff9b::/96) and
    local-use (64:ff9b:1::/48, RFC 6052 layout) prefixes.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped:
        return address.ipv4_mapped
    if address.sixtofour:
        return address.sixtofour
    packed = address.packed
    if address in NAT64_LOCAL:
        return ipaddress.IPv4Address(packed[6:8] + packed[9:11])
    if address in NAT64 or address in IPV4_TRANSLATED or int(address) >> 32 == 0:
        return ipaddress.IPv4Address(packed[12:])
    return None


def address_problem(address: IPAddress, *, block_private: bool = False) -> str | None:
    """Why no API key may be sent to `address`, as a sentence; None when it may."""
    for candidate in (address, embedded_ipv4(address)):
        if candidate is None:
            continue
        if candidate.is_link_local or candidate in METADATA_ADDRESSES:
            return REFUSED_ADDRESS
        if candidate.is_unspecified:
            return (
                "The addresses 0.0.0.0 and :: are where a server listens, not where to "
                "connect: use 127.0.0.1 or the proxy's host name."
            )
        if candidate.is_multicast:
            return "A multicast address cannot be a proxy's address."
    if block_private:
        # ::1 is IPv6's loopback, not an IPv4-compatible 0.0.0.1.
        carried = None if address.is_loopback else embedded_ipv4(address)
        return private_problem(carried or address)
    return None


def private_problem(address: IPAddress) -> str | None:
    """Why `address` is not public (LLM_BLOCK_PRIVATE_NETWORKS), as a sentence."""
    site_local = isinstance(address, ipaddress.IPv6Address) and address.is_site_local
    if address.is_global and not (address.is_reserved or site_local):
        return None
    kind = next((name for test, name in _PRIVATE_KINDS if test(address)), "reserved (not public)")
    return (
        f"{address} is a {kind} address, and LLM_BLOCK_PRIVATE_NETWORKS=true allows only "
        "public addresses. Use the proxy's public host name, or ask the site's operator "
        "to turn LLM_BLOCK_PRIVATE_NETWORKS off."
    )


_PRIVATE_KINDS = (
    (lambda a: a.is_loopback, "loopback"),
    (lambda a: a in SHARED, "shared (CGNAT, 100.64.0.0/10)"),
    (lambda a: a in BENCHMARKING, "benchmarking (198.18.0.0/15)"),
    (lambda a: a in THIS_NETWORK, '"this network" (0.0.0.0/8)'),
    (lambda a: a in UNIQUE_LOCAL, "unique-local (fc00::/7)"),
    (lambda a: a.is_reserved, "reserved"),
    (lambda a: a.is_private, "private"),
)


def is_localhost_name(host: str) -> bool:
    """`localhost` and names below it (RFC 6761): loopback whatever DNS says."""
    return host == "localhost" or host.endswith(".localhost")


def host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    """`host` is on the list, exactly or below an entry that starts with a dot.

    Entries are compared as ALLOWED_HOSTS writes them: any case, IPv6 in brackets or not.
    """
    for entry in allowed_hosts:
        entry = entry.strip().lower().strip("[]").rstrip(".")
        address = parse_ip(entry)
        entry = str(address) if address is not None else entry
        if host == entry or (entry.startswith(".") and (host.endswith(entry) or host == entry[1:])):
            return True
    return False


def base_url_problem(
    value: str, *, allowed_hosts: Sequence[str] = (), block_private: bool = False
) -> str | None:
    """Why `value` may not carry an API key, as a sentence; None when it may.

    `block_private`: refuse every address that is not public (LLM_BLOCK_PRIVATE_NETWORKS).
    """
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F or ch.isspace() for ch in value):
        return "The URL contains white space or control characters."
    if "\\" in value:
        return "The URL contains a backslash."
    if not value.isascii():
        return "The URL contains non-ASCII characters: write the host in its xn-- (punycode) form."
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return "The URL is malformed (check the host and the port)."
    if parts.scheme.lower() not in {"http", "https"}:
        return "The URL must start with http:// or https://."
    if "@" in parts.netloc:
        return (
            "The URL must not contain a user name or password: the API key goes in its own field."
        )
    if "?" in value or "#" in value:
        return "The URL must not contain a query (?...) or a fragment (#...)."
    if port == 0:
        return "The URL's port must be between 1 and 65535."
    host = (parts.hostname or "").rstrip(".")
    if not host:
        return "The URL has no host name."
    if "%" in host:
        return "The host must not be percent-encoded or carry an IPv6 zone."
    address = parse_ip(host)
    if address is not None:
        problem = address_problem(address, block_private=block_private)
        if problem:
            return problem
        host = str(address)
    elif host in METADATA_HOSTS:
        return REFUSED_ADDRESS
    elif block_private and is_localhost_name(host):
        return (
            f"{host} is this machine (loopback), and LLM_BLOCK_PRIVATE_NETWORKS=true allows "
            "only public addresses."
        )
    elif len(host) > 253 or not all(LABEL.match(label) for label in host.split(".")):
        return "The host name is not valid (letters, digits, '-' and '_' between dots)."
    if allowed_hosts and not host_allowed(host, allowed_hosts):
        return (
            f"The host {host} is not in LLM_ALLOWED_BASE_URL_HOSTS. Use one of: "
            f"{', '.join(allowed_hosts)}, or ask the site's operator to add it."
        )
    return None


def site_base_url_problem(value: str) -> str | None:
    """`base_url_problem` with the site's settings (allow-list, private networks)."""
    return base_url_problem(
        value,
        allowed_hosts=settings.LLM_ALLOWED_BASE_URL_HOSTS,
        block_private=settings.LLM_BLOCK_PRIVATE_NETWORKS,
    )


def validate_base_url(value: str) -> None:
    """Django validator applying the policy with the site's settings."""
    problem = site_base_url_problem(value)
    if problem:
        raise ValidationError(problem, code="base_url_policy")
