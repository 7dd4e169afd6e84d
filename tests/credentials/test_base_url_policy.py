"""The base-URL policy (credentials/policy.py): which URLs an API key may be sent to."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from credentials.models import APIKeyCredentials
from credentials.policy import base_url_problem, normalize_base_url, validate_base_url
from tests.conftest import FAKE_KEY

# A fake password placed in the user-info of some refused URLs: no message may repeat it.
PASSWORD = "sk-test-fake-hunter2"

SCHEME = "must start with http:// or https://"
USER_INFO = "user name or password"
QUERY = "query (?...) or a fragment"
SPACE = "white space or control characters"
BACKSLASH = "backslash"
REFUSED_ADDRESS = "Link-local and cloud-metadata addresses are never allowed"
UNSPECIFIED = "where a server listens"
PERCENT = "percent-encoded or carry an IPv6 zone"
NO_HOST = "no host name"
MALFORMED = "malformed (check the host and the port)"
PORT_RANGE = "port must be between 1 and 65535"
ALLOW_LIST = "is not in LLM_ALLOWED_BASE_URL_HOSTS"

REFUSED = [
    # Schemes other than http(s).
    pytest.param("ftp://litellm:4000/v1", SCHEME, id="ftp"),
    pytest.param("file:///etc/passwd", SCHEME, id="file"),
    pytest.param("javascript:alert(1)", SCHEME, id="javascript"),
    pytest.param("litellm:4000/v1", SCHEME, id="no-scheme"),
    # User-info: the key has its own field.
    pytest.param(f"http://user:{PASSWORD}@litellm:4000/v1", USER_INFO, id="user-password"),
    pytest.param("http://user@litellm:4000/v1", USER_INFO, id="user"),
    pytest.param("http://@litellm:4000/v1", USER_INFO, id="empty-user-info"),
    pytest.param(f"http://user:{PASSWORD}@169.254.169.254/v1", USER_INFO, id="password-metadata"),
    pytest.param(f"http://user:{PASSWORD}@litellm/v1?x=1", USER_INFO, id="password-query"),
    # Query and fragment, even empty ones.
    pytest.param("http://litellm:4000/v1?x=1", QUERY, id="query"),
    pytest.param("http://litellm:4000/v1#frag", QUERY, id="fragment"),
    pytest.param("http://litellm:4000/v1?", QUERY, id="empty-query"),
    pytest.param("http://litellm:4000/v1#", QUERY, id="empty-fragment"),
    # White space and control characters anywhere.
    pytest.param("http://lite llm:4000/v1", SPACE, id="space-in-host"),
    pytest.param("http://litellm:4000/v1\t", SPACE, id="tab"),
    pytest.param("http://litellm:4000/v1\nHost: evil", SPACE, id="newline"),
    pytest.param("http://litellm:4000/\r/v1", SPACE, id="carriage-return"),
    pytest.param("http://lite\x00llm:4000", SPACE, id="nul"),
    pytest.param("http://litellm\x7f:4000", SPACE, id="del"),
    pytest.param("http://litellm\u00a0:4000", SPACE, id="no-break-space"),
    pytest.param(f"http://user:{PASSWORD}@lite llm/v1", SPACE, id="password-space"),
    pytest.param("http://litellm:4000\\@evil.example/v1", BACKSLASH, id="backslash"),
    # 169.254.169.254 in every spelling inet_aton(3) accepts.
    pytest.param("http://169.254.169.254/latest/meta-data", REFUSED_ADDRESS, id="metadata-dotted"),
    pytest.param("http://169.254.169.254:80/v1", REFUSED_ADDRESS, id="metadata-with-port"),
    pytest.param("http://2852039166/", REFUSED_ADDRESS, id="metadata-integer"),
    pytest.param("http://0xa9fea9fe/", REFUSED_ADDRESS, id="metadata-hex"),
    pytest.param("http://0XA9FEA9FE/", REFUSED_ADDRESS, id="metadata-hex-upper"),
    pytest.param("http://0x00a9fea9fe/", REFUSED_ADDRESS, id="metadata-hex-zero-padded"),
    pytest.param("http://0251.0376.0251.0376/", REFUSED_ADDRESS, id="metadata-octal"),
    pytest.param("http://169.254.43518/", REFUSED_ADDRESS, id="metadata-short-form"),
    pytest.param("http://169.16689662/", REFUSED_ADDRESS, id="metadata-two-part-form"),
    pytest.param("http://0xa9.0xfe.0xa9.0xfe/", REFUSED_ADDRESS, id="metadata-dotted-hex"),
    pytest.param("http://169.0xfe.0251.254/", REFUSED_ADDRESS, id="metadata-mixed-bases"),
    pytest.param("http://169.254.169.254./", REFUSED_ADDRESS, id="metadata-trailing-dot"),
    pytest.param("http://169.254.169.254../", REFUSED_ADDRESS, id="metadata-two-trailing-dots"),
    pytest.param("http://169.254.1.1:4000/v1", REFUSED_ADDRESS, id="link-local-v4"),
    pytest.param("http://169.254.255.255/", REFUSED_ADDRESS, id="link-local-v4-top"),
    pytest.param("http://[fe80::1]:4000/v1", REFUSED_ADDRESS, id="link-local-v6"),
    pytest.param("http://[FE80::A9FE:A9FE]/", REFUSED_ADDRESS, id="link-local-v6-upper"),
    pytest.param("http://[fe80::1%25eth0]:4000/v1", PERCENT, id="link-local-v6-zone-id"),
    pytest.param("http://[::ffff:169.254.169.254]/", REFUSED_ADDRESS, id="v4-mapped-dotted"),
    pytest.param("http://[::ffff:a9fe:a9fe]/", REFUSED_ADDRESS, id="v4-mapped-hex"),
    pytest.param("http://[::a9fe:a9fe]/", REFUSED_ADDRESS, id="v4-compatible"),
    pytest.param("http://[64:ff9b::a9fe:a9fe]/", REFUSED_ADDRESS, id="nat64"),
    pytest.param("http://[64:ff9b::169.254.169.254]/", REFUSED_ADDRESS, id="nat64-dotted"),
    pytest.param("http://[64:ff9b:1:a9fe:a9:fea9::]/", REFUSED_ADDRESS, id="nat64-local-use"),
    pytest.param("http://[::ffff:0:a9fe:a9fe]/", REFUSED_ADDRESS, id="v4-translated"),
    pytest.param("http://[2002:a9fe:a9fe::1]/", REFUSED_ADDRESS, id="6to4"),
    # Cloud metadata names and addresses outside 169.254/16.
    pytest.param("http://metadata.google.internal/", REFUSED_ADDRESS, id="gcp-name"),
    pytest.param("http://METADATA.GOOGLE.INTERNAL/", REFUSED_ADDRESS, id="gcp-name-upper"),
    pytest.param("http://metadata.google.internal./", REFUSED_ADDRESS, id="gcp-name-trailing-dot"),
    pytest.param("http://metadata/", REFUSED_ADDRESS, id="gcp-short-name"),
    pytest.param("http://instance-data.ec2.internal/", REFUSED_ADDRESS, id="aws-name"),
    pytest.param("http://[fd00:ec2::254]/", REFUSED_ADDRESS, id="aws-v6"),
    pytest.param("http://100.100.100.200/", REFUSED_ADDRESS, id="alibaba"),
    pytest.param("http://[::ffff:100.100.100.200]/", REFUSED_ADDRESS, id="alibaba-v4-mapped"),
    pytest.param("http://192.0.0.192/", REFUSED_ADDRESS, id="oracle"),
    # Addresses one cannot connect to.
    pytest.param("http://0.0.0.0:4000/v1", UNSPECIFIED, id="unspecified-v4"),
    pytest.param("http://[::]:4000/v1", UNSPECIFIED, id="unspecified-v6"),
    pytest.param("http://224.0.0.1/", "multicast", id="multicast"),
    # Percent-encoding, missing host, bad ports.
    pytest.param("http://%6c%6f%63%61%6c%68%6f%73%74:4000", PERCENT, id="percent-encoded-host"),
    pytest.param("http://%31%36%39.254.169.254/", PERCENT, id="percent-encoded-metadata"),
    pytest.param("http://", NO_HOST, id="nothing-after-scheme"),
    pytest.param("http:///v1", NO_HOST, id="no-host"),
    pytest.param("https://:4000/v1", NO_HOST, id="port-without-host"),
    pytest.param("http://litellm:99999/v1", MALFORMED, id="port-too-large"),
    pytest.param("http://litellm:abc/v1", MALFORMED, id="port-not-a-number"),
    pytest.param("http://litellm:-1/v1", MALFORMED, id="port-negative"),
    pytest.param("http://litellm:0/v1", PORT_RANGE, id="port-zero"),
    pytest.param(f"http://user:{PASSWORD}@litellm:99999/v1", MALFORMED, id="password-bad-port"),
    pytest.param("http://[169.254.169.254]/", MALFORMED, id="v4-in-brackets"),
    pytest.param("http://lite..llm/v1", "host name is not valid", id="empty-label"),
    pytest.param("http://lite!llm/v1", "host name is not valid", id="bad-character"),
]

SENTENCE_CASES = REFUSED

ACCEPTED = [
    "https://api.openai.com/v1",
    "http://litellm:4000/v1",
    "http://localhost:4000",
    "http://localhost.:4000",
    "http://127.0.0.1:4000/v1",
    "http://[::1]:4000",
    "http://10.0.0.5/v1",
    "http://192.168.1.20:8080",
    "http://172.17.0.1:4000",
    "https://openrouter.ai/api/v1",
    "http://my_proxy:4000",
    "http://litellm.internal.example:4000/v1/",
    "http://[2001:db8::1]:4000/v1",
    "http://[fd12:3456::10]:4000/v1",
    "HTTPS://API.OPENAI.COM/v1",
    "http://litellm:65535/v1",
    "http://xn--bcher-kva.example/v1",
]

LOOK_ALIKE_HOST_NAMES = [
    "http://169-254-169-254.nip.io/v1",
    "http://169.254.169.254.nip.io/v1",
    "http://a9fea9fe.example/v1",
    "http://metadata.google.internal.example/v1",
]

ALLOWED_HOSTS = ["litellm", ".corp.example"]


@pytest.fixture
def open_policy(settings):
    settings.LLM_ALLOWED_BASE_URL_HOSTS = []


@pytest.mark.parametrize(("url", "why"), REFUSED)
def test_it_refuses_url(url, why, open_policy):
    problem = base_url_problem(url)
    assert problem is not None
    assert why in problem
    assert PASSWORD not in problem
    with pytest.raises(ValidationError) as refused:
        validate_base_url(url)
    assert refused.value.code == "base_url_policy"
    assert refused.value.messages == [problem]


@pytest.mark.parametrize(("url", "why"), SENTENCE_CASES)
def test_it_explains_each_refusal_in_a_sentence(url, why):
    problem = base_url_problem(url)
    assert problem is not None
    assert problem[0].isupper()
    assert problem.endswith(".")


@pytest.mark.parametrize("url", ACCEPTED)
def test_it_accepts_url(url, open_policy):
    assert base_url_problem(url) is None
    validate_base_url(url)


@pytest.mark.parametrize("url", LOOK_ALIKE_HOST_NAMES)
def test_it_accepts_host_names_that_only_look_like_metadata_since_dns_is_not_resolved(
    url, open_policy
):
    assert base_url_problem(url) is None
    validate_base_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://litellm:4000/v1",
        "http://LITELLM:4000/v1",
        "http://litellm.:4000/v1",
        "http://a.corp.example/v1",
        "http://b.a.corp.example:8080",
        "http://corp.example",
    ],
)
def test_it_accepts_hosts_on_the_allow_list(url, settings):
    settings.LLM_ALLOWED_BASE_URL_HOSTS = ALLOWED_HOSTS
    assert base_url_problem(url, allowed_hosts=ALLOWED_HOSTS) is None
    validate_base_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example/v1",
        "http://127.0.0.1:4000/v1",
        "http://localhost:4000",
        "http://evilcorp.example/v1",
        "http://corp.example.evil/v1",
        "http://litellm.evil/v1",
        "http://x-litellm:4000/v1",
    ],
)
def test_it_refuses_hosts_off_the_allow_list(url, settings):
    settings.LLM_ALLOWED_BASE_URL_HOSTS = ALLOWED_HOSTS
    problem = base_url_problem(url, allowed_hosts=ALLOWED_HOSTS)
    assert problem is not None
    assert "LLM_ALLOWED_BASE_URL_HOSTS" in problem
    assert "litellm, .corp.example" in problem
    assert problem[0].isupper()
    assert problem.endswith(".")
    with pytest.raises(ValidationError, match="LLM_ALLOWED_BASE_URL_HOSTS"):
        validate_base_url(url)


def test_it_judges_an_address_on_the_allow_list_in_its_canonical_form():
    assert base_url_problem("http://2130706433:4000", allowed_hosts=["127.0.0.1"]) is None
    assert base_url_problem("http://[fd00:0:0::1]:4000", allowed_hosts=["fd00::1"]) is None


def test_it_accepts_an_ipv6_host_listed_in_brackets():
    assert base_url_problem("http://[::1]:4000/v1", allowed_hosts=["[::1]"]) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://metadata.google.internal/v1",
        "http://169.254.169.254/v1",
        "http://2852039166/v1",
        "http://[fe80::1]/v1",
    ],
)
def test_it_refuses_metadata_even_when_it_is_on_the_allow_list(url, settings):
    listed = ["metadata.google.internal", "169.254.169.254", "2852039166", "fe80::1"]
    settings.LLM_ALLOWED_BASE_URL_HOSTS = listed
    problem = base_url_problem(url, allowed_hosts=listed)
    assert problem is not None
    assert REFUSED_ADDRESS in problem
    with pytest.raises(ValidationError, match="never allowed"):
        validate_base_url(url)


@pytest.mark.parametrize(
    ("value", "normalised"),
    [
        ("  http://x:4000/v1/// ", "http://x:4000/v1"),
        ("http://x:4000/v1", "http://x:4000/v1"),
        ("http://x:4000/", "http://x:4000"),
        ("http://x:4000", "http://x:4000"),
        ("\thttps://openrouter.ai/api/v1/\n", "https://openrouter.ai/api/v1"),
        ("", ""),
    ],
)
def test_it_normalises_without_ever_adding_v1(value, normalised):
    assert normalize_base_url(value) == normalised


def test_it_refuses_a_metadata_base_url_on_the_model(db):
    credential = APIKeyCredentials(
        title="Metadata", api_key=FAKE_KEY, base_url="http://169.254.169.254/v1"
    )
    with pytest.raises(ValidationError) as refused:
        credential.full_clean()
    assert "base_url" in refused.value.error_dict
    (message,) = refused.value.message_dict["base_url"]
    assert REFUSED_ADDRESS in message
    assert FAKE_KEY not in str(refused.value)


def test_it_applies_the_allow_list_on_the_model(db, settings):
    settings.LLM_ALLOWED_BASE_URL_HOSTS = ALLOWED_HOSTS
    credential = APIKeyCredentials(
        title="Elsewhere", api_key=FAKE_KEY, base_url="http://evil.example/v1"
    )
    with pytest.raises(ValidationError) as refused:
        credential.full_clean()
    assert list(refused.value.error_dict) == ["base_url"]


@pytest.mark.parametrize(
    "base_url",
    ["http://litellm:4000/v1/", "  http://litellm:4000/v1///  ", "http://litellm:4000/v1"],
)
def test_it_strips_trailing_slashes_on_full_clean(base_url, db, open_policy):
    credential = APIKeyCredentials(title="Proxy", api_key=FAKE_KEY, base_url=base_url)
    credential.full_clean()
    assert credential.base_url == "http://litellm:4000/v1"


def test_it_allows_an_empty_base_url_on_the_model(db, open_policy):
    credential = APIKeyCredentials(title="Default route", api_key=FAKE_KEY, base_url="")
    credential.full_clean()
    assert credential.base_url == ""
