"""`manage.py check_llm_routes` against the real LiteLLM Proxy: what it reports for a
healthy proxy, a dead one, a key it does not know and a base URL with a wrong path."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from tests.litellm.proxy import CHAT_MODEL, KEY_A, KEY_B, MASTER_KEY, MOCK_MODEL, UPSTREAM_KEY

UNKNOWN_KEY = "sk-test-fake-virtual-unknown-5555"

pytestmark = pytest.mark.django_db


def doctor(
    credential, *args: str, fails: bool, secrets: tuple[str, ...]
) -> tuple[str, dict[str, Any]]:
    """The table and the JSON finding for one credential; no key anywhere in either."""
    outputs = []
    for extra in ((), ("--json",)):
        out = io.StringIO()
        command = ("check_llm_routes", "--credential", str(credential.pk), *args, *extra)
        if fails:
            with pytest.raises(CommandError):
                call_command(*command, stdout=out, stderr=out)
        else:
            call_command(*command, stdout=out, stderr=out)
        outputs.append(out.getvalue())
    table, raw = outputs
    for key in (*secrets, MASTER_KEY, UPSTREAM_KEY):
        assert key not in table + raw
        assert key[-4:] not in table + raw
    (finding,) = json.loads(raw)
    return table, finding


def test_a_healthy_proxy_answers_liveliness_and_lists_the_keys_models(proxy, credential_factory):
    credential = credential_factory(title="Team", api_key=proxy.key, base_url=proxy.base_url)

    table, finding = doctor(credential, fails=False, secrets=(proxy.key,))

    assert finding["ok"] is True
    assert (finding["reachable"], finding["key_accepted"]) == (True, True)
    assert finding["liveliness"] == "ok"
    assert proxy.model in finding["models"]
    assert finding["fault"] is None
    assert "routes fail" not in table


def test_a_killed_proxy_is_connection_refused_with_its_hint(killable_proxy, credential_factory):
    dead, _ = killable_proxy
    credential = credential_factory(title="Team", api_key=KEY_B, base_url=dead.base_url)
    dead.kill()

    table, finding = doctor(credential, fails=True, secrets=(KEY_B,))

    assert (finding["fault"], finding["reachable"], finding["key_accepted"]) == (
        "refused",
        False,
        None,
    )
    assert (
        f"    connection refused: Nothing listens at 127.0.0.1:{dead.port}: is the proxy "
        "running, and on this port?"
    ) in table.splitlines()
    assert f"curl {dead.root}/health/liveliness" in finding["error"]


def test_a_key_the_proxy_does_not_know_is_key_rejected(proxy, credential_factory):
    credential = credential_factory(title="Stale", api_key=UNKNOWN_KEY, base_url=proxy.base_url)

    table, finding = doctor(credential, fails=True, secrets=(UNKNOWN_KEY,))

    assert (finding["fault"], finding["reachable"], finding["key_accepted"]) == (
        "rejected",
        True,
        False,
    )
    assert finding["liveliness"] == "ok"  # the proxy is up: only the key is wrong
    host = proxy.root.removeprefix("http://")
    assert (
        f"    key rejected (401/403): The proxy at {host} refused the key (401/403): it does "
        "not match the proxy's keys. Enter the right key in the admin."
    ) in table.splitlines()


def test_a_doubled_v1_gets_the_v1_hint_naming_the_url_that_works(proxy, credential_factory):
    # LiteLLM answers with and without /v1, and 404 to anything else under it.
    doubled = f"{proxy.base_url}/v1"
    credential = credential_factory(title="Team", api_key=proxy.key, base_url=doubled)

    table, finding = doctor(credential, fails=True, secrets=(proxy.key,))

    assert finding["fault"] == "not_found"
    assert f"    404 on /models: {finding['hint']}" in table.splitlines()
    assert finding["hint"] == (
        f"The base URL ends in /v1/v1: /v1 is doubled (GET {doubled}/models answered 404). "
        f"It works as {proxy.base_url}: set the credential's base URL to {proxy.base_url} in "
        "the admin (and enter its key again)."
    )


def test_a_path_the_proxy_does_not_serve_asks_whether_it_is_a_proxy(proxy, credential_factory):
    # As when a gateway serves the proxy under a prefix and the base URL leaves it out.
    wrong = f"{proxy.root}/api"
    credential = credential_factory(title="Team", api_key=proxy.key, base_url=wrong)

    _, finding = doctor(credential, fails=True, secrets=(proxy.key,))

    assert (finding["fault"], finding["reachable"]) == ("not_found", True)
    host = proxy.root.removeprefix("http://")
    assert finding["hint"] == (
        f"GET {wrong}/models answered 404, and so does {wrong}/v1/models: is {host} an "
        "OpenAI-compatible proxy? Correct the credential's base URL in the admin."
    )


def test_a_model_the_key_may_not_use_is_not_listed(proxy, credential_factory):
    proxy.require_own("key A, which may use only the mock model")
    credential = credential_factory(title="Team A", api_key=KEY_A, base_url=proxy.base_url)

    _, finding = doctor(credential, "--model", CHAT_MODEL, fails=True, secrets=(KEY_A,))

    assert (finding["fault"], finding["key_accepted"]) == ("model_missing", True)
    assert finding["models"] == [MOCK_MODEL]
    assert finding["hint"] == (
        f"The model '{CHAT_MODEL}' is not among the 1 model(s) this key may use at "
        f"{proxy.root.removeprefix('http://')} ({MOCK_MODEL}): check the name, or add the "
        "model to the proxy's config."
    )
