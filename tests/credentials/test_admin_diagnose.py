"""The admin's Diagnose action (the doctor's findings on a page) and the health column
(the breaker of each credential's base URL and its last probe)."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from llm import breaker
from llm.errors import ProxyUnreachable
from tests.conftest import FAKE_KEY
from tests.upstream import free_port

LIST_URL = reverse("admin:credentials_apikeycredentials_changelist")


@pytest.fixture(autouse=True)
def short_probes(settings):
    settings.LLM_PROBE_TIMEOUT_SECONDS = 1


@pytest.fixture
def breakers():
    yield breaker.breakers
    breaker.breakers.reset()


def act(client, action, *credentials, follow=False):
    return client.post(
        LIST_URL,
        {"action": action, "_selected_action": [str(c.pk) for c in credentials]},
        follow=follow,
    )


def test_diagnose_shows_the_findings_on_a_page(admin_client, credential_factory, upstream):
    port = free_port()
    healthy = credential_factory(title="Team proxy", base_url=upstream.base_url)
    down = credential_factory(title="Down", base_url=f"http://127.0.0.1:{port}/v1")

    response = act(admin_client, "diagnose", healthy, down)

    assert response.status_code == 200
    assert response.templates[0].name == "admin/credentials/diagnose.html"
    page = response.content.decode()
    assert "<title>Diagnosis" in page
    assert "<strong>1 of 2 fails</strong>" in page
    findings = {f.label: f for f in response.context["findings"]}
    assert findings["credential 'Team proxy'"].ok
    assert findings["credential 'Team proxy'"].liveliness == "ok"
    assert findings["credential 'Down'"].fault == "refused"
    assert (
        f"connection refused: Nothing listens at 127.0.0.1:{port}: is the proxy running, "
        "and on this port?"
    ) in page
    assert reverse("admin:credentials_apikeycredentials_change", args=[down.pk]) in page
    assert FAKE_KEY not in page
    assert FAKE_KEY[-4:] not in page
    assert {(r.method, r.path) for r in upstream.requests} == {("GET", "/v1/models")}


def test_a_view_only_staff_user_cannot_diagnose(
    client, django_user_model, credential_factory, upstream
):
    viewer = django_user_model.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_apikeycredentials"))
    client.force_login(viewer)
    credential = credential_factory(title="Team proxy", base_url=upstream.base_url)

    listing = client.get(LIST_URL).content.decode()
    response = act(client, "diagnose", credential, follow=True)

    assert 'value="diagnose"' not in listing
    assert "Team proxy" in listing  # the page itself works
    assert 'value="test_connection"' not in listing
    assert response.status_code == 200
    assert "findings" not in response.context
    assert upstream.requests == []


def test_the_health_column_shows_the_last_test_connection(
    admin_client, credential_factory, upstream
):
    port = free_port()
    healthy = credential_factory(title="Team proxy", base_url=upstream.base_url)
    down = credential_factory(title="Down", base_url=f"http://127.0.0.1:{port}/v1")
    untested = credential_factory(title="Untested", base_url=upstream.base_url)

    assert act(admin_client, "test_connection", healthy, down).status_code == 302
    page = admin_client.get(LIST_URL).content.decode()

    assert '<th scope="col" class="column-health">' in page
    rows = {c.title: health_of(page, c) for c in (healthy, down, untested)}
    assert rows["Team proxy"].startswith("breaker closed<br>")
    assert "OK: 3 model(s) in " in rows["Team proxy"]
    assert rows["Team proxy"].endswith(" ms, just now</small>")
    assert (
        "failed: Could not connect to the LLM proxy at "
        f"127.0.0.1:{port} (connection refused) for credential &#x27;Down&#x27;"
    ) in rows["Down"]
    assert "not tested yet" in rows["Untested"]
    assert FAKE_KEY[-4:] not in "".join(rows.values())


def test_diagnose_updates_the_health_column(admin_client, credential_factory, upstream):
    credential = credential_factory(title="No v1", base_url=f"http://127.0.0.1:{upstream.port}")

    act(admin_client, "diagnose", credential)
    page = admin_client.get(LIST_URL).content.decode()

    assert "failed: 404 on /models, just now" in health_of(page, credential)


def test_the_health_column_shows_an_open_breaker(
    admin_client, credential_factory, settings, breakers
):
    url = f"http://127.0.0.1:{free_port()}/v1"
    credential = credential_factory(title="Down", base_url=url)
    refused = ProxyUnreachable("Connection refused.", fault="refused")
    for _ in range(settings.LLM_BREAKER_FAILURES):
        breakers.done(breaker.Ticket(url), refused)
    deadline = time.monotonic() + 5
    while breaker.status(url).state != "open":  # published through the cache by a thread
        assert time.monotonic() < deadline, "the breaker did not open"
        time.sleep(0.05)

    page = admin_client.get(LIST_URL).content.decode()

    row = health_of(page, credential)
    assert f"breaker open ({settings.LLM_BREAKER_FAILURES} failures, retry in " in row


def health_of(page, credential):
    """The health cell of `credential`'s row in the changelist."""
    row = page.index(f'value="{credential.pk}"')
    start = page.index('<td class="field-health">', row) + len('<td class="field-health">')
    return page[start : page.index("</td>", start)]
