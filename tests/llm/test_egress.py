"""The SSRF matrix: no API key reaches an address the base-URL policy refuses.

Every hostile base URL is refused when it is saved and, with the policy bypassed by a
raw SQL update (a restored backup, a migration, someone at the database), again when
the call is made, before any socket is opened. Host names are judged by what they
resolve to, once, at connect time (llm.egress): a name pointing at a metadata address,
a name with one public and one refused address, and a name whose answer changes
between two lookups (DNS rebinding) never reach the refused address.

"No socket opened" is observed, not assumed: an audit hook records every
socket.connect() this process makes, and the loopback servers record what reached them.
The resolver hook (`egress.using_resolver`) stands in for a DNS server the test drives;
everything else (policy, transports, the SDK) is what runs in production.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.exceptions import ValidationError
from django.db import connection

from credentials.models import PLATFORM, APIKeyCredentials
from llm import clients, egress, services
from llm.errors import CredentialUnavailable, LLMError
from tests.conftest import FAKE_KEY
from tests.upstream import DeadPort

MESSAGES = [{"role": "user", "content": "hello"}]
# Connections the test's own services make (PostgreSQL, Redis) are not the client's.
SERVICE_PORTS = {5432, 6379}

_connects: list[tuple[str, int]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "socket.connect" or _connects is None:
        return
    address = args[1]
    if isinstance(address, tuple) and address[1] not in SERVICE_PORTS:
        _connects.append((str(address[0]), int(address[1])))


sys.addaudithook(_audit)  # cannot be removed; idle unless a test below is recording


@pytest.fixture
def connects() -> Iterator[list[tuple[str, int]]]:
    """Every TCP connection this process opens during the test (all threads)."""
    global _connects
    _connects = []
    try:
        yield _connects
    finally:
        _connects = None


@pytest.fixture
def private_networks(settings: Any) -> None:
    settings.LLM_BLOCK_PRIVATE_NETWORKS = True


@pytest.fixture(autouse=True)
def _fresh_clients() -> Iterator[None]:
    clients.evict()
    yield
    clients.evict()


def dns(answers: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    """A resolver answering from `answers` (names the test did not list do not exist)."""

    def resolve(host: str, port: int) -> list[str]:
        try:
            return answers[host.rstrip(".").lower()]
        except KeyError:
            raise OSError(f"{host}: Name or service not known") from None

    return resolve


def stored_with_url(url: str) -> APIKeyCredentials:
    """A credential whose stored base URL is `url`, past the policy (a raw update)."""
    credential = APIKeyCredentials(title="Team proxy", api_key=FAKE_KEY)
    credential.save()
    table = APIKeyCredentials._meta.db_table
    pk = APIKeyCredentials._meta.pk.get_db_prep_value(credential.pk, connection)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET base_url = %s WHERE id = %s", [url, pk])
    return APIKeyCredentials.objects.get(pk=credential.pk)


def call(credential: APIKeyCredentials, *, use_async: bool = False) -> Any:
    if not use_async:
        return services.chat(
            messages=MESSAGES, model="gpt-test-mini", credential=credential, user=PLATFORM
        )

    async def run() -> Any:
        return await services.achat(
            messages=MESSAGES, model="gpt-test-mini", credential=credential, user=PLATFORM
        )

    return async_to_sync(run)()


def assert_refused_at_save(url: str) -> None:
    credential = APIKeyCredentials(title="Hostile", api_key=FAKE_KEY, base_url=url)
    with pytest.raises(ValidationError) as refused:
        credential.full_clean()
    assert "base_url" in refused.value.message_dict
    with pytest.raises(ValidationError):
        credential.save()  # code that skips the form is refused as well
    assert not APIKeyCredentials.objects.filter(title="Hostile").exists()


def assert_refused_at_connect(
    credential: APIKeyCredentials, connects: list[tuple[str, int]], *, use_async: bool = False
) -> CredentialUnavailable:
    with pytest.raises(CredentialUnavailable) as refused:
        call(credential, use_async=use_async)
    assert refused.value.reason == "base_url_refused"
    assert refused.value.status == 403
    assert "Team proxy" in refused.value.message
    assert FAKE_KEY not in refused.value.message
    assert connects == [], f"sockets were opened: {connects}"
    return refused.value


# ---- literal hostile base URLs: refused at save, and at connect after a raw update ----

METADATA_LITERALS = [
    "http://169.254.169.254/v1",
    "http://169.254.169.254.:80/v1",  # trailing dot
    "http://2852039166/v1",  # the same address as one integer
    "http://0xa9fea9fe/v1",  # hex
    "http://0251.0376.0251.0376/v1",  # octal
    "http://169.254.43518/v1",  # two-part form
    "http://0xa9.0xfe.0xa9.0xfe/v1",  # hex parts
    "http://[::ffff:169.254.169.254]/v1",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/v1",  # IPv4-mapped, hex
    "http://[::169.254.169.254]/v1",  # IPv4-compatible
    "http://[64:ff9b::a9fe:a9fe]/v1",  # NAT64
    "http://[2002:a9fe:a9fe::]/v1",  # 6to4
    "http://[fe80::1]/v1",  # IPv6 link-local
    "http://[fd00:ec2::254]/v1",  # AWS IMDS over IPv6
    "http://100.100.100.200/v1",  # Alibaba Cloud
    "http://192.0.0.192/v1",  # Oracle Cloud
    "http://metadata.google.internal/computeMetadata/v1",
    "http://metadata/v1",
    "http://0.0.0.0:4000/v1",
    "http://[::]:4000/v1",
    "http://224.0.0.1/v1",  # multicast
    "http://[ff02::1]/v1",
]

PRIVATE_LITERALS = [  # refused with LLM_BLOCK_PRIVATE_NETWORKS=true
    "http://127.0.0.1:{port}/v1",
    "http://127.1:{port}/v1",
    "http://2130706433:{port}/v1",
    "http://0x7f000001:{port}/v1",
    "http://[::1]:{port}/v1",
    "http://[::ffff:127.0.0.1]:{port}/v1",
    "http://localhost:{port}/v1",
    "http://proxy.localhost:{port}/v1",
    "http://10.0.0.5:4000/v1",
    "http://172.16.0.1:4000/v1",
    "http://192.168.1.10:4000/v1",
    "http://100.64.0.1:4000/v1",  # CGNAT
    "http://198.18.0.1:4000/v1",  # benchmarking
    "http://0.1.2.3:4000/v1",  # 0/8
    "http://240.0.0.1:4000/v1",  # reserved
    "http://[fd12:3456::1]:4000/v1",  # ULA
    "http://[fc00::1]:4000/v1",  # ULA
    "http://[2002:a00:1::]:4000/v1",  # 6to4 of 10.0.0.1
]


@pytest.mark.django_db
@pytest.mark.parametrize("url", METADATA_LITERALS)
def test_metadata_literals_are_refused_at_save_and_at_connect(url, connects):
    assert_refused_at_save(url)
    assert_refused_at_connect(stored_with_url(url), connects)


@pytest.mark.django_db
@pytest.mark.parametrize("url", PRIVATE_LITERALS)
def test_private_literals_are_refused_in_private_network_mode(url, private_networks, connects):
    with DeadPort() as listening:  # anything reaching loopback would knock here
        url = url.format(port=listening.port)
        assert_refused_at_save(url)
        assert_refused_at_connect(stored_with_url(url), connects)
        assert listening.attempts == 0


# ---- host names: judged by what they resolve to, at connect time ----------------------

HOSTILE_ANSWERS = {
    "metadata address": ["169.254.169.254"],
    "link-local IPv6": ["fe80::1"],
    "IPv4-mapped metadata": ["::ffff:169.254.169.254"],
    "NAT64 metadata": ["64:ff9b::a9fe:a9fe"],
    "Alibaba metadata": ["100.100.100.200"],
    "AWS IPv6 metadata": ["fd00:ec2::254"],
    "unspecified": ["0.0.0.0"],  # noqa: S104
    "multicast": ["224.0.0.1"],
    "public then metadata": ["127.0.0.1", "169.254.169.254"],
    "metadata then public": ["169.254.169.254", "127.0.0.1"],
}


@pytest.mark.django_db
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("answer", HOSTILE_ANSWERS.values(), ids=HOSTILE_ANSWERS.keys())
def test_a_name_resolving_to_a_refused_address_is_never_connected_to(
    answer, use_async, upstream, connects
):
    """Saved without complaint (validation does not depend on DNS), refused when the
    transport resolves it; with one good and one refused address, refused whole."""
    url = f"http://team-proxy.example:{upstream.port}/v1"
    credential = APIKeyCredentials(title="Team proxy", api_key=FAKE_KEY, base_url=url)
    credential.full_clean()
    credential.save()
    with egress.using_resolver(dns({"team-proxy.example": answer})):
        error = assert_refused_at_connect(credential, connects, use_async=use_async)
    assert "team-proxy.example resolves to" in error.message
    assert upstream.requests == []


PRIVATE_ANSWERS = {
    "loopback": ["127.0.0.1"],
    "IPv6 loopback": ["::1"],
    "private": ["10.1.2.3"],
    "CGNAT": ["100.64.1.1"],
    "ULA": ["fd12::1"],
    "benchmarking": ["198.18.4.4"],
    "IPv4-mapped loopback": ["::ffff:127.0.0.1"],
}


@pytest.mark.django_db
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("answer", PRIVATE_ANSWERS.values(), ids=PRIVATE_ANSWERS.keys())
def test_private_network_mode_refuses_names_resolving_to_private_addresses(
    answer, use_async, private_networks, connects
):
    with DeadPort() as listening:
        url = f"https://proxy.example.com:{listening.port}/v1"
        credential = APIKeyCredentials(title="Team proxy", api_key=FAKE_KEY, base_url=url)
        credential.full_clean()  # a public-looking name: only its answer tells
        credential.save()
        with egress.using_resolver(dns({"proxy.example.com": answer})):
            error = assert_refused_at_connect(credential, connects, use_async=use_async)
        assert "LLM_BLOCK_PRIVATE_NETWORKS" in error.message
        assert listening.attempts == 0


# ---- rebinding and redirects ----------------------------------------------------------


class Rebinding:
    """A DNS answer that changes after the first lookup, as a rebinding attack's does."""

    def __init__(self, first: str, then: str) -> None:
        self.first, self.then = first, then
        self.lookups = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        return [self.first if self.lookups == 1 else self.then]


@pytest.mark.django_db
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_rebinding_between_check_and_connect_cannot_reach_the_refused_address(
    use_async, upstream, connects
):
    """The address judged is the address connected to: one lookup per connection. A
    transport that looked the name up again to connect would get 169.254.169.254."""
    url = f"http://rebind.example:{upstream.port}/v1"
    credential = APIKeyCredentials(title="Team proxy", api_key=FAKE_KEY, base_url=url)
    credential.save()
    rebinding = Rebinding(first="127.0.0.1", then="169.254.169.254")
    with egress.using_resolver(rebinding):
        assert call(credential, use_async=use_async).text
        assert rebinding.lookups == 1
        assert connects == [("127.0.0.1", upstream.port)]
        assert len(upstream.requests) == 1

        clients.evict()  # a new connection: a new lookup, now answering the metadata address
        connects.clear()
        assert_refused_at_connect(credential, connects, use_async=use_async)
    assert not any(host.startswith("169.254.") for host, _ in connects)
    assert len(upstream.requests) == 1


@pytest.mark.django_db
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_redirects_are_never_followed(use_async, start_upstream, connects):
    """A proxy answering 307 to somewhere else gets an error back; the key never goes to
    the Location, and no second connection is opened."""
    target = start_upstream()
    redirecting = start_upstream()
    redirecting.respond(
        mode="verbatim",
        status=307,
        body={"moved": True},
        headers={"Location": f"{target.base_url}/chat/completions"},
    )
    credential = APIKeyCredentials(
        title="Team proxy", api_key=FAKE_KEY, base_url=redirecting.base_url
    )
    credential.save()
    with pytest.raises(LLMError) as failed:
        call(credential, use_async=use_async)
    assert "307" in str(failed.value)
    assert FAKE_KEY not in str(failed.value)
    assert target.requests == []
    assert connects == [("127.0.0.1", redirecting.port)]
    assert len(redirecting.requests) == 1


# ---- legitimate proxies: accepted at save and reached -------------------------------

LEGITIMATE = [
    "http://127.0.0.1:{port}/v1",
    "http://proxy-1.team.example.org:{port}/v1",
    "http://localhost:{port}/v1",  # the system's own resolver
    "http://litellm:{port}/v1",  # a compose service name
    "http://litellm.internal.example:{port}/v1",
    "http://LiteLLM.Internal.Example:{port}/v1",  # any case
    "http://litellm.internal.example.:{port}/v1",  # trailing dot
    "http://llm_gateway:{port}/v1",  # underscores in container names
    "http://dual-stack.example:{port}/v1",  # an IPv6 answer first, then IPv4
    "http://litellm:{port}/v1/",  # a trailing slash
]
NAMES = {
    "litellm": ["127.0.0.1"],
    "litellm.internal.example": ["127.0.0.1"],
    "proxy-1.team.example.org": ["127.0.0.1"],
    "llm_gateway": ["127.0.0.1"],
    "dual-stack.example": ["::1", "127.0.0.1"],
    "localhost": ["127.0.0.1"],
}


@pytest.mark.django_db
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("url", LEGITIMATE)
def test_legitimate_proxy_urls_are_accepted_and_reached(url, use_async, upstream, connects):
    url = url.format(port=upstream.port)
    credential = APIKeyCredentials(title="Team proxy", api_key=FAKE_KEY, base_url=url)
    credential.full_clean()
    credential.save()
    resolver = dns(NAMES) if "localhost" not in url else egress.system_resolver
    with egress.using_resolver(resolver):
        assert call(credential, use_async=use_async).text
    assert upstream.requests[0].authorization == f"Bearer {FAKE_KEY}"
    assert {host for host, _ in connects} <= {"127.0.0.1", "::1"}


PUBLIC = [
    "https://api.openai.com/v1",
    "https://openrouter.ai/api/v1",
    "https://gateway.example.com/litellm/v1",
    "https://llm.example.org:8443/v1",
    "http://[2606:4700:4700::1111]:4000/v1",
    "https://8.8.8.8/v1",
]


@pytest.mark.django_db
@pytest.mark.parametrize("url", PUBLIC)
def test_public_base_urls_are_accepted_in_private_network_mode(url, private_networks):
    credential = APIKeyCredentials(title="Public", api_key=FAKE_KEY, base_url=url)
    credential.full_clean()
    credential.save()
    host = url.split("//")[1].split("/")[0].rsplit(":", 1)[0].strip("[]")
    # What the transport would connect to: public answers pass the guard.
    with egress.using_resolver(dns({host: ["93.184.215.14", "2606:2800:21f:cb07::1"]})):
        assert egress.checked_addresses(host, 443)


@pytest.mark.django_db
def test_private_network_mode_refuses_what_the_default_mode_allows(settings, upstream):
    """The same loopback proxy: reached by default, refused with the setting on."""
    credential = APIKeyCredentials(title="Team proxy", api_key=FAKE_KEY)
    credential.base_url = upstream.base_url
    credential.save()
    assert call(credential).text
    settings.LLM_BLOCK_PRIVATE_NETWORKS = True
    clients.evict()
    with pytest.raises(CredentialUnavailable, match="loopback"):
        call(credential)
    assert len(upstream.requests) == 1


def test_the_matrix_is_as_large_as_promised():
    hostile = (
        len(METADATA_LITERALS) + len(PRIVATE_LITERALS) + len(HOSTILE_ANSWERS) + len(PRIVATE_ANSWERS)
    )
    assert hostile >= 40
    assert len(LEGITIMATE) + len(PUBLIC) >= 10


@pytest.mark.django_db
def test_a_refusal_says_nothing_about_the_proxy_to_its_breaker(connects, settings):
    """A refused address is not a proxy that failed, nor one that answered: a refusal
    between two connection failures neither breaks their streak nor counts in it."""
    from llm.breaker import breakers

    settings.LLM_BREAKER_FAILURES = 2
    reachable = dns({"team-proxy.example": ["127.0.0.1"]})
    with DeadPort() as dead:
        url = f"http://team-proxy.example:{dead.port}/v1"
        credential = APIKeyCredentials(title="Team proxy", api_key=FAKE_KEY, base_url=url)
        credential.save()

        def dropped() -> None:
            with egress.using_resolver(reachable), pytest.raises(LLMError) as failed:
                call(credential)
            assert failed.value.connection_level

        dropped()
        assert breakers.state(url) == "closed"
        connects.clear()
        with egress.using_resolver(dns({"team-proxy.example": ["169.254.169.254"]})):
            assert_refused_at_connect(credential, connects)
        assert breakers.state(url) == "closed"
        dropped()
        assert breakers.state(url) == "open"  # two failures in a row
