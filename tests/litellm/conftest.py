"""The real LiteLLM Proxy between the site and a loopback upstream.

One proxy per test process (pytest-xdist worker), started with deploy/litellm/config.yaml
in front of a loopback upstream of its own. Its first start builds the proxy's cached
environment (tests/litellm/proxy.py); a failed install fails the suite with pip's output.

A team can aim these tests at its own proxy: with LITELLM_PROXY_URL (its address, with or
without /v1) and LITELLM_PROXY_KEY (a virtual key), the tests that need nothing of this
suite's config run against that proxy (LITELLM_PROXY_MODEL names the chat model to call,
else the first one the key lists); the others are skipped, each saying why.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.litellm.proxy import CHAT_MODEL, KEY_B, LiteLLMProxy, ProxyInstallFailed
from tests.upstream import Upstream


@dataclass
class ProxyUnderTest:
    """The proxy the tests talk to: the suite's own, or a team's (LITELLM_PROXY_URL)."""

    root: str  # without /v1
    key: str  # a virtual key that may call `model`
    model: str
    own: LiteLLMProxy | None  # None: a team's proxy, whose config the suite does not know
    upstream: Upstream | None  # what the suite's own proxy forwards to

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def require_own(self, needs: str) -> tuple[LiteLLMProxy, Upstream]:
        """Skip, saying why, when the proxy is not the suite's own."""
        if self.own is None or self.upstream is None:
            pytest.skip(f"needs the suite's own proxy config ({needs}); LITELLM_PROXY_URL is set")
        return self.own, self.upstream


def _external() -> tuple[str, str] | None:
    url = os.environ.get("LITELLM_PROXY_URL", "").strip().rstrip("/")
    key = os.environ.get("LITELLM_PROXY_KEY", "").strip()
    if bool(url) != bool(key):
        raise pytest.UsageError("Set both LITELLM_PROXY_URL and LITELLM_PROXY_KEY, or neither.")
    if not url:
        return None
    return url.removesuffix("/v1"), key


def _first_model(root: str, key: str) -> str:
    request = urllib.request.Request(  # noqa: S310 (the team's own proxy)
        f"{root}/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        models = [row["id"] for row in json.load(answer)["data"]]
    if not models:
        raise pytest.UsageError("LITELLM_PROXY_KEY may use no model on LITELLM_PROXY_URL.")
    return str(models[0])


@pytest.fixture(scope="session")
def litellm_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyUnderTest]:
    external = _external()
    if external is not None:
        root, key = external
        model = os.environ.get("LITELLM_PROXY_MODEL", "").strip() or _first_model(root, key)
        yield ProxyUnderTest(root, key, model, None, None)
        return
    with Upstream() as upstream:
        log = tmp_path_factory.mktemp("litellm") / "proxy.log"
        proxy = LiteLLMProxy(upstream_base_url=upstream.base_url, log=log)
        try:
            proxy.start()
        except ProxyInstallFailed as error:
            pytest.fail(str(error), pytrace=False)
        try:
            yield ProxyUnderTest(proxy.root, KEY_B, CHAT_MODEL, proxy, upstream)
        finally:
            proxy.stop()


@pytest.fixture
def proxy(litellm_proxy: ProxyUnderTest) -> Iterator[ProxyUnderTest]:
    """The session's proxy, its upstream's record and behaviour fresh for each test."""
    if litellm_proxy.upstream is not None:
        litellm_proxy.upstream.reset()
    yield litellm_proxy
    if litellm_proxy.upstream is not None:
        litellm_proxy.upstream.reset()


@pytest.fixture
def killable_proxy(proxy: ProxyUnderTest) -> Iterator[tuple[LiteLLMProxy, Upstream]]:
    """The suite's own proxy, which the test may kill: it is running again afterwards."""
    own, upstream = proxy.require_own("a proxy process the test kills")
    try:
        yield own, upstream
    finally:
        if not own.alive:
            own.start()
