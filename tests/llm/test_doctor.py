"""manage.py check_llm_routes against real loopback servers: one hint per fault class,
the exit status, --json, and never a key in the output."""

from __future__ import annotations

import io
import json

import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command

from llm import doctor
from tests.conftest import FAKE_KEY, GLOBAL_KEY, database_url, run_manage, subprocess_env
from tests.upstream import Upstream, free_port

KEYS = (FAKE_KEY, GLOBAL_KEY, "sk-test-fake-failover-Qfov")  # hints no port number can hold
FIELDS = {
    "label",
    "source",
    "host",
    "base_url",
    "credential_id",
    "configured",
    "reachable",
    "key_accepted",
    "models",
    "latency_ms",
    "breaker",
    "liveliness",
    "fault",
    "hint",
    "error",
    "ok",
}


class RootUpstream(Upstream):
    """Serves the OpenAI API at its root (/models, no /v1), as some proxies do; it is
    not LiteLLM, so it has no /health/liveliness either."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/models", self.models_view)
        return app


pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def short_probes(settings):
    settings.LLM_PROBE_TIMEOUT_SECONDS = 1


def no_key_in(text):
    for key in KEYS:
        assert key not in text
        assert key[-4:] not in text  # not even the hint the admin shows


def doctor_says(*args, fails):
    """Run the command; its stdout and stderr together, after checking the exit status."""
    out, err = io.StringIO(), io.StringIO()
    if fails:
        with pytest.raises(CommandError) as caught:
            call_command("check_llm_routes", *args, stdout=out, stderr=err)
        assert caught.value.returncode == 1
        assert "routes fail: see the hint under each." in str(caught.value)
        no_key_in(str(caught.value))
    else:
        call_command("check_llm_routes", *args, stdout=out, stderr=err)
    text = out.getvalue() + err.getvalue()
    no_key_in(text)
    return text


def findings_of(*args, fails):
    findings = json.loads(doctor_says("--json", *args, fails=fails))
    assert isinstance(findings, list)
    for finding in findings:
        assert set(finding) == FIELDS
    return findings


def cells(text, label):
    """The cells after the route's label in its row of the table."""
    (row,) = [line for line in text.splitlines() if line.startswith(label)]
    return row[len(label) :].split()


def check_one(credential, *args, fails=True):
    return doctor_says("--credential", str(credential.pk), *args, fails=fails)


# ---- healthy ------------------------------------------------------------------------


def test_healthy_routes_pass_with_a_table_and_exit_status_0(global_route, credential_factory):
    credential_factory(title="Team proxy", base_url=global_route.base_url)

    text = doctor_says(fails=False)

    lines = text.splitlines()
    assert lines[0].split() == [
        "route",
        "source",
        "host",
        "reachable",
        "key",
        "accepted",
        "models",
        "latency",
        "breaker",
    ]
    host = f"127.0.0.1:{global_route.port}"
    for label, source in [
        ("global default", "global"),
        ("internal default", "internal"),
        ("credential 'Team proxy'", "credential"),
    ]:
        row = cells(text, label)
        assert row[:5] == [source, host, "yes", "yes", "3"]
        assert float(row[5]) >= 0
        assert row[6:] == ["ms", "closed"]
    assert lines[-1] == "3 route(s) work."
    # /models with each key, never a completion; liveliness is not recorded by the server.
    assert {(r.method, r.path) for r in global_route.requests} == {("GET", "/v1/models")}
    assert {r.authorization for r in global_route.requests} == {
        f"Bearer {GLOBAL_KEY}",
        f"Bearer {FAKE_KEY}",
    }


def test_json_parses_and_says_everything(global_route):
    findings = findings_of(fails=False)

    assert [f["label"] for f in findings] == ["global default", "internal default"]
    public = findings[0]
    assert public["ok"] is True
    assert public["reachable"] is True
    assert public["key_accepted"] is True
    assert public["models"] == ["embed-test", "gpt-test-large", "gpt-test-mini"]
    assert public["liveliness"] == "ok"
    assert public["breaker"] == "closed"
    assert public["fault"] is None
    assert public["hint"] is None
    assert public["base_url"] == global_route.base_url
    assert public["latency_ms"] >= 0


def test_a_default_without_a_key_is_not_configured_not_a_failure(db):
    text = doctor_says(fails=False)

    assert "global default" in text
    assert (
        "    not configured: OPENAI_API_KEY is not set: calls without a credential are "
        "refused. Set it to give them a route."
    ) in text
    assert text.splitlines()[-1] == "0 route(s) work; 2 not configured."


# ---- one hint per fault class -------------------------------------------------------


def test_a_closed_port(credential_factory):
    port = free_port()
    credential = credential_factory(title="Down", base_url=f"http://127.0.0.1:{port}/v1")

    text = check_one(credential)

    assert cells(text, "credential 'Down'") == [
        "credential",
        f"127.0.0.1:{port}",
        "no",  # reachable
        "-",  # key accepted
        "-",  # models
        cells(text, "credential 'Down'")[5],
        "ms",
        "closed",
    ]
    assert (
        f"    connection refused: Nothing listens at 127.0.0.1:{port}: is the proxy running, "
        "and on this port?"
    ) in text.splitlines()


def test_an_unresolvable_name(credential_factory):
    credential = credential_factory(
        title="Typo", base_url="http://keyroute-no-such-host.invalid/v1"
    )

    text = check_one(credential)

    assert (
        "    DNS: The host name keyroute-no-such-host.invalid does not resolve: is it spelled "
        "right, and is this machine on the proxy's network?"
    ) in text.splitlines()


def test_tls_to_a_server_that_speaks_plain_http(credential_factory, upstream):
    credential = credential_factory(title="TLS", base_url=f"https://127.0.0.1:{upstream.port}/v1")

    (finding,) = findings_of("--credential", str(credential.pk), fails=True)

    assert finding["fault"] == "tls"
    assert finding["reachable"] is False
    assert finding["hint"] == (
        f"The TLS handshake with 127.0.0.1:{upstream.port} failed: is its certificate "
        "self-signed, expired or made out to another host name? Or does it speak plain http://?"
    )


def test_a_rejected_key_of_a_credential(credential_factory, upstream):
    upstream.respond(status=401, body={"error": {"message": f"invalid key {FAKE_KEY}"}})
    credential = credential_factory(title="Old key", base_url=upstream.base_url)

    text = check_one(credential)

    assert cells(text, "credential 'Old key'")[2:4] == ["yes", "no"]  # reachable, key accepted
    assert (
        "    key rejected (401/403): The proxy at "
        f"127.0.0.1:{upstream.port} refused the key (401/403): it does not match the proxy's "
        "keys. Enter the right key in the admin."
    ) in text.splitlines()


def test_the_upstreams_words_keep_no_part_of_the_key(credential_factory, upstream):
    # LiteLLM's own 401 echoes the key masked to its last four characters.
    said = f"Authentication Error, Received API Key = sk-...{FAKE_KEY[-4:]}, Key Hash=abc"
    upstream.respond(status=401, body={"error": {"message": said}})
    credential = credential_factory(title="Old key", base_url=upstream.base_url)

    (finding,) = findings_of("--credential", str(credential.pk), fails=True)

    assert finding["error"].endswith(
        'It said: "Authentication Error, Received API Key = [key], Key Hash=abc"'
    )


def test_a_base_url_the_policy_refuses_is_not_tried(settings, credential_factory, upstream):
    credential = credential_factory(title="Elsewhere", base_url=upstream.base_url)
    settings.LLM_ALLOWED_BASE_URL_HOSTS = ["litellm.example.org"]

    (finding,) = findings_of("--credential", str(credential.pk), fails=True)

    assert (finding["fault"], finding["reachable"], finding["liveliness"]) == (
        "unavailable",
        None,
        None,
    )
    assert finding["hint"].startswith("The base URL of credential 'Elsewhere' is refused: ")
    assert upstream.requests == []


def test_a_rejected_global_key_names_the_variable(global_route):
    global_route.respond(status=403)

    findings = findings_of(fails=True)

    assert findings[0]["fault"] == "rejected"
    assert findings[0]["key_accepted"] is False
    assert findings[0]["hint"].endswith(
        "it does not match the proxy's keys. Set OPENAI_API_KEY to a key the proxy accepts."
    )
    assert findings[1]["hint"].endswith("Set OPENAI_INTERNAL_API_KEY to a key the proxy accepts.")


def test_404_on_models_without_v1_says_it_works_with_v1(credential_factory, upstream):
    root = f"http://127.0.0.1:{upstream.port}"
    credential = credential_factory(title="No v1", base_url=root)

    text = check_one(credential)

    assert (
        f"    404 on /models: GET {root}/models answered 404, but the proxy works with /v1: "
        f"set the credential's base URL to {root}/v1 in the admin (and enter its key again)."
    ) in text.splitlines()
    (finding,) = findings_of("--credential", str(credential.pk), fails=True)
    assert (finding["reachable"], finding["key_accepted"]) == (True, None)
    assert finding["liveliness"] == "ok"


def test_404_on_models_with_v1_says_it_works_without_v1(credential_factory):
    root_server = RootUpstream().start()
    try:
        root = f"http://127.0.0.1:{root_server.port}"
        credential = credential_factory(title="Extra v1", base_url=f"{root}/v1")

        (finding,) = findings_of("--credential", str(credential.pk), fails=True)
    finally:
        root_server.stop()

    assert finding["fault"] == "not_found"
    assert finding["hint"] == (
        f"GET {root}/v1/models answered 404, but the proxy works without /v1: set the "
        f"credential's base URL to {root} in the admin (and enter its key again)."
    )
    assert finding["liveliness"] == "absent"  # not LiteLLM, and not a failure by itself


def test_a_doubled_v1(credential_factory, upstream):
    credential = credential_factory(title="Doubled", base_url=f"{upstream.base_url}/v1")

    text = check_one(credential)

    assert (
        f"    404 on /models: The base URL ends in /v1/v1: /v1 is doubled (GET "
        f"{upstream.base_url}/v1/models answered 404). It works as {upstream.base_url}: set the "
        f"credential's base URL to {upstream.base_url} in the admin (and enter its key again)."
    ) in text.splitlines()


def test_a_404_on_a_global_default_names_the_variable(settings, upstream):
    settings.OPENAI_BASE_URL = f"http://127.0.0.1:{upstream.port}"
    settings.OPENAI_API_KEY = GLOBAL_KEY

    findings = findings_of(fails=True)

    assert findings[0]["hint"].endswith(
        f"but the proxy works with /v1: set OPENAI_BASE_URL={upstream.base_url}."
    )


def test_a_slow_server_times_out_within_the_probe_budget(settings, credential_factory, upstream):
    settings.LLM_PROBE_TIMEOUT_SECONDS = 0.5
    upstream.respond(delay=3)
    credential = credential_factory(title="Slow", base_url=upstream.base_url)

    text = check_one(credential)

    assert (
        f"    timeout: 127.0.0.1:{upstream.port} did not answer within "
        "LLM_PROBE_TIMEOUT_SECONDS (0.5 s): the proxy is overloaded or stuck; check its logs."
    ) in text.splitlines()
    assert len(upstream.requests) == 1  # no retries


def test_the_internal_route_failing_while_the_public_one_works(global_route, settings):
    port = free_port()
    settings.OPENAI_INTERNAL_BASE_URL = f"http://127.0.0.1:{port}/v1"

    findings = findings_of(fails=True)

    public, internal = findings
    assert public["ok"] is True
    assert internal["hint"] == (
        f"Nothing listens at 127.0.0.1:{port}: is the proxy running, and on this port? The "
        f"global route works: OPENAI_INTERNAL_BASE_URL (http://127.0.0.1:{port}/v1) differs "
        f"from OPENAI_BASE_URL ({global_route.base_url}); correct it, or leave it empty to "
        "follow OPENAI_BASE_URL."
    )


def test_a_model_missing_from_the_list(global_route):
    text = doctor_says("--model", "gpt-nope", fails=True)

    assert (
        "    model not listed: The model 'gpt-nope' is not among the 3 model(s) this key may "
        f"use at 127.0.0.1:{global_route.port} (embed-test, gpt-test-large, gpt-test-mini): "
        "check the name, or add the model to the proxy's config."
    ) in text.splitlines()
    assert doctor_says("--model", "gpt-test-mini", fails=False).endswith("2 route(s) work.\n")


def test_an_allow_list_that_matches_none_of_the_proxys_models(credential_factory, upstream):
    credential = credential_factory(
        base_url=upstream.base_url, allowed_models=["gpt-4o*", "claude-*"]
    )

    text = check_one(credential)

    assert (
        "    model not allowed: None of the 3 model(s) this key may use at "
        f"127.0.0.1:{upstream.port} matches the credential's allowed models (gpt-4o*, "
        "claude-*): every call would be refused. Correct the allowed models in the admin."
    ) in text.splitlines()


def test_a_model_the_allow_list_refuses(credential_factory, upstream):
    credential = credential_factory(base_url=upstream.base_url, allowed_models=["gpt-test-*"])

    text = check_one(credential, "--model", "embed-test")

    assert (
        "    model not allowed: The credential's allowed models (gpt-test-*) do not include "
        "'embed-test': calls for it are refused. Add it to the allowed models in the admin."
    ) in text.splitlines()
    check_one(credential, "--model", "gpt-test-mini", fails=False)


def test_a_key_no_encryption_key_opens(settings, credential_factory):
    credential = credential_factory(title="Lost key", base_url="http://127.0.0.1:9/v1")
    settings.CREDENTIALS_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]

    (finding,) = findings_of("--credential", str(credential.pk), fails=True)

    assert finding["fault"] == "unavailable"
    assert finding["reachable"] is None
    assert "cannot be decrypted with any key in CREDENTIALS_ENCRYPTION_KEYS" in finding["hint"]


def test_the_failover_route(settings, upstream):
    settings.LLM_FAILOVER_BASE_URL = upstream.base_url
    findings = findings_of(fails=False)
    assert findings[-1]["label"] == "failover"
    assert findings[-1]["configured"] is False
    assert findings[-1]["hint"] == (
        "LLM_FAILOVER_API_KEY is not set: there is no failover route until "
        "LLM_FAILOVER_BASE_URL and LLM_FAILOVER_API_KEY are both set."
    )

    settings.LLM_FAILOVER_API_KEY = KEYS[2]
    findings = findings_of(fails=False)
    assert (findings[-1]["label"], findings[-1]["ok"]) == ("failover", True)
    assert upstream.requests[-1].authorization == f"Bearer {KEYS[2]}"


def test_without_a_choice_it_checks_the_live_credentials_only(credential_factory, upstream):
    credential_factory(title="Live", base_url=upstream.base_url)
    credential_factory(title="Off", base_url=upstream.base_url, is_active=False)

    labels = [f["label"] for f in findings_of(fails=False)]

    assert labels == ["global default", "internal default", "credential 'Live'"]


def test_an_unknown_credential_id(db):
    with pytest.raises(CommandError, match="No credential has the id 'nope'"):
        call_command("check_llm_routes", "--credential", "nope", stdout=io.StringIO())


def test_it_remembers_each_credentials_result_for_the_admin(credential_factory, upstream):
    credential = credential_factory(title="Team proxy", base_url=upstream.base_url)

    check_one(credential, fails=False)

    probe = doctor.last_probes([credential.pk])[str(credential.pk)]
    assert probe["ok"] is True
    assert probe["summary"].startswith("OK: 3 model(s) in ")
    assert probe["when"] is not None


# ---- the real exit status, in a process of its own ----------------------------------


def test_the_exit_status_of_the_process(transactional_db, credential_factory, upstream):
    env = subprocess_env(
        DATABASE_URL=database_url(),
        OPENAI_BASE_URL=upstream.base_url,
        OPENAI_API_KEY=GLOBAL_KEY,
        LLM_PROBE_TIMEOUT_SECONDS="1",
    )
    healthy = run_manage("check_llm_routes", env=env)
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout.splitlines()[-1] == "2 route(s) work."

    port = free_port()
    credential_factory(title="Down", base_url=f"http://127.0.0.1:{port}/v1")
    failing = run_manage("check_llm_routes", env=env)
    assert failing.returncode == 1
    assert f"Nothing listens at 127.0.0.1:{port}" in failing.stdout
    assert failing.stderr == "CommandError: 1 of 3 routes fail: see the hint under each.\n"

    as_json = run_manage("check_llm_routes", "--json", env=env)
    assert as_json.returncode == 1
    assert [f["ok"] for f in json.loads(as_json.stdout)] == [True, True, False]
    for result in (healthy, failing, as_json):
        no_key_in(result.stdout + result.stderr)
