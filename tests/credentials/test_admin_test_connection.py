from __future__ import annotations

from django.urls import reverse

from tests.conftest import FAKE_KEY
from tests.upstream import free_port

LIST_URL = reverse("admin:credentials_apikeycredentials_changelist")


def run_action(admin_client, *credentials):
    response = admin_client.post(
        LIST_URL,
        {"action": "test_connection", "_selected_action": [str(c.pk) for c in credentials]},
        follow=True,
    )
    assert response.status_code == 200
    return [str(message) for message in response.context["messages"]], response.content.decode()


def test_it_reports_ok_with_latency_and_model_count(admin_client, credential_factory, upstream):
    credential = credential_factory(title="Team proxy", base_url=upstream.base_url)

    messages, page = run_action(admin_client, credential)

    (message,) = messages
    assert message.startswith(f"Team proxy: OK, 127.0.0.1:{upstream.port} answered in ")
    assert message.endswith("ms with 3 model(s).")
    (request,) = upstream.requests
    assert (request.method, request.path) == ("GET", "/v1/models")
    assert request.authorization == f"Bearer {FAKE_KEY}"
    assert FAKE_KEY not in page


def test_it_reports_each_failure_as_a_sentence(admin_client, credential_factory, upstream):
    port = free_port()
    down = credential_factory(title="Down", base_url=f"http://127.0.0.1:{port}/v1")
    rejected = credential_factory(title="Rejected", base_url=upstream.base_url)
    upstream.respond(status=401, body={"error": {"message": f"bad key {FAKE_KEY}"}})

    messages, page = run_action(admin_client, down, rejected)

    assert sorted(messages) == sorted(
        [
            f"Down: Could not connect to the LLM proxy at 127.0.0.1:{port} (connection refused) "
            f"for credential 'Down'. Is the proxy running? "
            f"Try: curl http://127.0.0.1:{port}/health/liveliness",
            f"Rejected: The LLM proxy at 127.0.0.1:{upstream.port} rejected the key of credential "
            "'Rejected' (401): the key does not match the proxy's keys. Enter the right key in "
            'the admin. It said: "bad key [key]"',
        ]
    )
    assert FAKE_KEY not in page


def test_it_tests_an_inactive_credential_too(admin_client, credential_factory, upstream):
    credential = credential_factory(title="Not yet", base_url=upstream.base_url, is_active=False)

    messages, _ = run_action(admin_client, credential)

    assert "Not yet: OK" in messages[0]


def test_it_tests_several_credentials_at_once(admin_client, credential_factory, upstream):
    upstream.respond(delay=1.0)
    credentials = [
        credential_factory(title=f"Proxy {n}", base_url=upstream.base_url) for n in range(3)
    ]

    messages, _ = run_action(admin_client, *credentials)

    assert len(messages) == 3
    assert all(": OK, " in message for message in messages)
    assert upstream.most_in_flight == 3


def test_it_gives_up_after_the_probe_timeout_without_retrying(
    admin_client, credential_factory, upstream, settings
):
    settings.LLM_PROBE_TIMEOUT_SECONDS = 0.5
    settings.LLM_MAX_RETRIES = 2  # calls retry; probes never do
    credential = credential_factory(title="Stuck", base_url=upstream.base_url)
    upstream.respond(delay=5.0)

    (message,), _ = run_action(admin_client, credential)

    assert message == (
        f"Stuck: The LLM proxy at 127.0.0.1:{upstream.port} did not answer in time for "
        f"credential 'Stuck'. Is it overloaded or stuck? Try: curl {upstream.base_url}/models "
        "(the time budget is LLM_PROBE_TIMEOUT_SECONDS)."
    )
    assert len(upstream.requests) == 1


def test_it_reports_an_answer_that_is_not_a_model_list(admin_client, credential_factory, upstream):
    """A login page (or anything else) where the model list should be: a sentence, never
    a 500; the other credentials are tested all the same."""
    odd = credential_factory(title="Login page", base_url=upstream.base_url)
    port = free_port()
    down = credential_factory(title="Down", base_url=f"http://127.0.0.1:{port}/v1")
    upstream.respond(mode="verbatim", body="<html><body>Sign in</body></html>")

    messages, page = run_action(admin_client, odd, down)

    assert sorted(messages)[1] == (
        f"Login page: The LLM proxy at 127.0.0.1:{upstream.port} sent an answer that is not "
        "an OpenAI-compatible response, for credential 'Login page'. Is "
        f"{upstream.base_url} the proxy's OpenAI endpoint (often ending in /v1)?"
    )
    assert sorted(messages)[0].startswith("Down: Could not connect")
    assert FAKE_KEY not in page
