"""deploy/env/litellm.env.example gives the proxy what its config reads, and its key
table holds the site's virtual keys, each allowed models the proxy serves."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.deploy.recipe import DEPLOY, PLACEHOLDER, env_example, load_yaml, service_env

CONFIG = DEPLOY / "litellm" / "config.yaml"
AUTH = DEPLOY / "litellm" / "keyroute_auth.py"
# LiteLLM's own switches: no price list fetched at start, no usage reports sent.
LITELLM_SWITCHES = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY_DISABLED": "True"}


def config_models() -> dict[str, dict[str, Any]]:
    """deploy/litellm/config.yaml's models, by the name clients call them."""
    config = load_yaml(CONFIG)
    return {entry["model_name"]: entry for entry in config["model_list"]}


def key_table() -> dict[str, dict[str, Any]]:
    """KEYROUTE_VIRTUAL_KEYS as the proxy reads it: virtual key -> alias and models."""
    table: dict[str, dict[str, Any]] = json.loads(env_example("litellm")["KEYROUTE_VIRTUAL_KEYS"])
    return table


def test_it_gives_the_proxy_every_variable_its_config_and_custom_auth_read():
    read = set(re.findall(r"os\.environ/([A-Z0-9_]+)", CONFIG.read_text()))
    read |= set(re.findall(r"os\.environ\.get\(\s*\"([A-Z0-9_]+)\"", AUTH.read_text()))
    litellm = env_example("litellm")

    assert {"LITELLM_MASTER_KEY", "KEYROUTE_VIRTUAL_KEYS"} <= read
    assert set(litellm) == read | set(LITELLM_SWITCHES)
    for name, value in LITELLM_SWITCHES.items():
        assert litellm[name] == value


def test_it_holds_a_master_key_litellm_accepts():
    master = env_example("litellm")["LITELLM_MASTER_KEY"]

    assert master.startswith("sk-")
    assert master != "sk-1234"
    assert master not in key_table()


def test_it_grants_the_sites_keys_models_the_proxy_serves():
    table = key_table()
    models = config_models()
    site = service_env("site")
    embedding = [
        name
        for name, entry in models.items()
        if entry.get("model_info", {}).get("mode") == "embedding"
    ]

    platform = table[site["OPENAI_API_KEY"]]
    internal = table[site["OPENAI_INTERNAL_API_KEY"]]
    assert platform["alias"] == "platform"
    assert internal["alias"] == "internal"
    assert internal["models"] == embedding
    assert not set(platform["models"]) & set(embedding)
    for key, entry in table.items():
        assert PLACEHOLDER in key
        assert entry["models"], entry["alias"]
        for model in entry["models"]:
            assert model in models, f"{entry['alias']} may use {model}, which is not served"


def test_it_gives_a_team_a_key_of_its_own():
    aliases = {entry["alias"]: entry["models"] for entry in key_table().values()}

    assert aliases == {
        "platform": ["gpt-4o-mini", "keyroute-smoke-test"],
        "internal": ["text-embedding-3-small"],
        "team-a": ["gpt-4o-mini"],
    }
