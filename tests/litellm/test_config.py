"""The proxy config deploy/ ships (deploy/litellm/config.yaml and keyroute_auth.py), as
the suite runs it: who gets in, and what a mistake in its key table does."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from typing import Any

from llm import services
from tests.litellm.proxy import (
    CHAT_MODEL,
    CONFIG,
    MASTER_KEY,
    MOCK_ANSWER,
    MOCK_MODEL,
    LiteLLMProxy,
    proxy_python,
)

MESSAGES = [{"role": "user", "content": "hello"}]


def status_of(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"model": MOCK_MODEL, "messages": MESSAGES}).encode()
    request = urllib.request.Request(  # noqa: S310 (loopback)
        url, data=body, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_a_request_without_a_key_is_a_401_not_a_500(proxy):
    proxy.require_own("the shipped config")

    status, body = status_of(f"{proxy.base_url}/chat/completions", {})

    assert status == 401
    assert body["error"]["type"] == "auth_error"


def test_the_master_key_as_the_sites_one_key_reaches_every_model(
    proxy, settings, db, django_user_model
):
    """The simplest set-up: OPENAI_API_KEY is the proxy's master key, no credentials."""
    _, upstream = proxy.require_own("the shipped config's master key")
    settings.OPENAI_BASE_URL = proxy.base_url
    settings.OPENAI_API_KEY = MASTER_KEY
    user = django_user_model.objects.create_user("bob")

    mock = services.chat(messages=MESSAGES, model=MOCK_MODEL, user=user)
    forwarded = services.chat(messages=MESSAGES, model=CHAT_MODEL, user=user)

    assert (mock.text, mock.route.source) == (MOCK_ANSWER, "global")
    assert (forwarded.text, forwarded.route.source) == ("echo: hello", "global")
    assert len(upstream.requests) == 1


MISTAKES = {
    "{not json": "KEYROUTE_VIRTUAL_KEYS is not JSON: Expecting property name enclosed in "
    "double quotes",
    '["sk-a"]': "KEYROUTE_VIRTUAL_KEYS must be a JSON object: key -> entry",
    '{"sk-test-fake-nomodels-0000": {"alias": "x"}}': "KEYROUTE_VIRTUAL_KEYS: the key '0000' "
    "needs models",
}
# Imports keyroute_auth as the proxy does at start (from the config's folder), once per
# table: what it raises, by table. One process: importing LiteLLM takes seconds.
LOAD_EACH = """
import importlib, json, os, sys
import litellm.proxy._types
said = {}
for table in json.loads(sys.argv[1]):
    os.environ["KEYROUTE_VIRTUAL_KEYS"] = table
    sys.modules.pop("keyroute_auth", None)
    try:
        importlib.import_module("keyroute_auth")
        said[table] = None
    except RuntimeError as error:
        said[table] = str(error)
print(json.dumps(said))
"""


def test_a_mistake_in_the_key_table_stops_the_proxy_with_a_sentence(proxy, tmp_path):
    own, _ = proxy.require_own("the shipped custom_auth")
    env = LiteLLMProxy(upstream_base_url=own.upstream_base_url, log=tmp_path / "x").environment()

    loaded = subprocess.run(
        [str(proxy_python()), "-c", LOAD_EACH, json.dumps([*MISTAKES, json.dumps({})])],
        cwd=CONFIG.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    said = json.loads(loaded.stdout)
    assert said == {**MISTAKES, "{}": None}
    assert "sk-test-fake-nomodels-0000" not in "".join(filter(None, said.values()))
