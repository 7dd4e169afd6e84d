"""Where the clients may connect: the base-URL policy applied to resolved addresses.

A base URL is judged when it is saved and again when a client is built
(credentials.policy), but a host name is only a name: it can resolve to a cloud
metadata address, or to one address when checked and another when connected to (DNS
rebinding). So the clients' transports resolve the host themselves, here, refuse when
any of its addresses is refused by the policy (`address_problem`, with
LLM_BLOCK_PRIVATE_NETWORKS), and connect only to the addresses they judged. TLS still
verifies the certificate against the host name, not the address.

- sync clients (httpx2): `GuardedTransport`, whose connection pool opens connections
  through `GuardedBackend`;
- async clients (the SDK's aiohttp transport, built in llm.clients): a session whose
  `TCPConnector` has `GuardedResolver` (aiohttp connects to the addresses its resolver
  returns; its DNS cache keeps only addresses that were judged).

It imports the HTTP libraries, never the OpenAI SDK: llm.clients stays the one module
that does.

Name resolution goes through one hook, `resolver` (the system's getaddrinfo by default),
which tests replace with `using_resolver` to drive answers a real DNS server would
give: an address that changes between two lookups, or one public and one refused.

A refusal raises `EgressRefused` before any socket is opened; llm.clients turns it into
the CredentialUnavailable that names the host and the address.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpcore2
import httpx2
from aiohttp.abc import AbstractResolver, ResolveResult
from django.conf import settings
from httpcore2._backends.sync import SyncBackend

from credentials.policy import IPAddress, address_problem, parse_ip

log = logging.getLogger(__name__)

# host, port -> the host's addresses, as text, in the order to try them.
Resolver = Callable[[str, int], Sequence[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses getaddrinfo(3) gives for `host`, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


resolver: Resolver = system_resolver


@contextmanager
def using_resolver(hook: Resolver) -> Iterator[None]:
    """Resolve every host name with `hook` inside the block (tests: a DNS they drive)."""
    global resolver
    previous, resolver = resolver, hook
    try:
        yield
    finally:
        resolver = previous


class EgressRefused(OSError):
    """A connection the policy refuses: `host` resolved to the refused `address`."""

    def __init__(self, host: str, address: str, problem: str) -> None:
        self.host, self.address, self.problem = host, address, problem
        named = f"{host} resolves to {address}" if address != host else host
        super().__init__(f"Refused to connect: {named}. {problem}")


def judged(host: str, answers: Iterable[str]) -> list[IPAddress]:
    """`answers` for `host` as addresses, when the policy allows every one of them.

    One refused address refuses them all: a name with one public and one metadata
    address must not be connected to at all, whichever the resolver lists first.
    """
    block_private = settings.LLM_BLOCK_PRIVATE_NETWORKS
    addresses = []
    for answer in answers:
        address = parse_ip(answer.split("%")[0])  # an IPv6 zone is not part of it
        if address is None:
            raise EgressRefused(host, answer, "The resolver's answer is not an address.")
        problem = address_problem(address, block_private=block_private)
        if problem:
            log.warning("Refused a connection to %s: it resolves to %s.", host, address)
            raise EgressRefused(host, str(address), problem)
        addresses.append(address)
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, f"{host} resolves to no address")
    return addresses


def checked_addresses(host: str, port: int) -> list[IPAddress]:
    """The addresses to connect to for `host`, resolved once and judged."""
    literal = parse_ip(host.strip("[]"))
    return judged(host, [str(literal)] if literal is not None else resolver(host, port))


# ---- sync clients (httpx2 over httpcore2) --------------------------------------------


class GuardedBackend(SyncBackend):
    """httpcore2's socket backend, connecting only to judged addresses."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        try:
            addresses = checked_addresses(host, port)
        except OSError as error:  # not resolved, or refused (EgressRefused)
            # As httpcore2's own connection errors, which the SDK reports (and retries).
            raise httpcore2.ConnectError(str(error)) from error
        failure: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as error:
                failure = error  # the next address, as socket.create_connection does
        assert failure is not None
        raise failure


class GuardedTransport(httpx2.HTTPTransport):
    """httpx2's transport with its connection pool on `GuardedBackend`."""

    def __init__(self, *, verify: ssl.SSLContext, limits: httpx2.Limits) -> None:
        super().__init__(verify=verify, limits=limits, trust_env=False)
        # The pool httpx2 builds is the same one, minus the backend it does not expose.
        self._pool = httpcore2.ConnectionPool(
            ssl_context=verify,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(),
        )


# ---- async clients (aiohttp) ---------------------------------------------------------


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver: `resolver` in a thread (getaddrinfo blocks), then judged.

    aiohttp skips the resolver for literal addresses; those are judged when the client
    is built, from the same base URL (llm.clients).
    """

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await asyncio.get_running_loop().run_in_executor(None, resolver, host, port)
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=socket.IPPROTO_TCP,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in judged(host, answers)
        ]

    async def close(self) -> None:
        pass


def aiohttp_session(ssl_context: ssl.SSLContext, limits: httpx2.Limits) -> aiohttp.ClientSession:
    """A session whose connector resolves with `GuardedResolver` (made on its event loop:
    llm.clients hands this to the SDK's aiohttp transport, which calls it on first use)."""
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(),
        ssl=ssl_context,
        keepalive_timeout=limits.keepalive_expiry,
        limit=limits.max_connections or 0,
    )
    return aiohttp.ClientSession(connector=connector)
