"""Who may run the credentials admin's actions, and the history they leave.

Each action is posted as a browser posts it from the changelist (action, the selected
row, the index of the action bar), by a staff user holding only the permissions named.
"""

from __future__ import annotations

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.urls import reverse

from credentials.models import APIKeyCredentials
from tests.conftest import FAKE_KEY

LIST_URL = reverse("admin:credentials_apikeycredentials_changelist")
ACTIONS = ["activate", "deactivate", "test_connection", "diagnose"]


@pytest.fixture(autouse=True)
def short_probes(settings):
    settings.LLM_PROBE_TIMEOUT_SECONDS = 1


def post_action(client, action: str, credential: APIKeyCredentials):
    return client.post(
        LIST_URL,
        {"action": action, "_selected_action": str(credential.pk), "index": "0"},
        follow=True,
    )


def offered(client) -> set[str]:
    """The actions in the changelist's action select."""
    response = client.get(LIST_URL)
    assert response.status_code == 200
    form = response.context.get("action_form")
    return {value for value, _ in form.fields["action"].choices if value} if form else set()


def history(client, credential: APIKeyCredentials):
    url = reverse("admin:credentials_apikeycredentials_history", args=[credential.pk])
    response = client.get(url)
    assert response.status_code == 200
    return response.content.decode()


@pytest.mark.parametrize("action", ACTIONS)
def test_a_view_only_staff_user_can_run_no_action(staff, credential_factory, upstream, action):
    client = staff("view")
    credential = credential_factory(
        title="Team proxy", base_url=upstream.base_url, is_active=action != "activate"
    )

    response = post_action(client, action, credential)

    assert response.status_code == 200
    stored = APIKeyCredentials.objects.get(pk=credential.pk)
    assert stored.is_active is (action != "activate")
    assert stored.updated_at == credential.updated_at
    assert upstream.requests == []
    assert not LogEntry.objects.exists()
    assert "Team proxy" in response.content.decode()  # the changelist, still viewable
    assert action not in offered(client)


@pytest.mark.parametrize(
    ("action", "active_before", "active_after", "logged"),
    [
        ("activate", False, True, "Activated."),
        ("deactivate", True, False, "Deactivated."),
    ],
)
def test_a_user_with_change_activates_and_deactivates_with_history(
    staff, credential_factory, action, active_before, active_after, logged
):
    client = staff("view", "change")
    credential = credential_factory(title="Team proxy", is_active=active_before)

    assert {"activate", "deactivate"} <= offered(client)
    response = post_action(client, action, credential)

    assert response.status_code == 200
    assert APIKeyCredentials.objects.get(pk=credential.pk).is_active is active_after
    (entry,) = LogEntry.objects.all()
    assert entry.is_change()
    assert entry.object_id == str(credential.pk)
    assert entry.get_change_message() == logged
    assert logged in history(client, credential)


def test_an_action_logs_only_the_credentials_it_changed(admin_client, credential_factory):
    already = credential_factory(title="Already active", is_active=True)
    dormant = credential_factory(title="Dormant", is_active=False)

    admin_client.post(
        LIST_URL,
        {"action": "activate", "_selected_action": [str(already.pk), str(dormant.pk)]},
    )

    (entry,) = LogEntry.objects.all()
    assert entry.object_id == str(dormant.pk)


@pytest.mark.parametrize("permission", ["test", "change"])
@pytest.mark.parametrize("action", ["test_connection", "diagnose"])
def test_a_user_who_may_test_probes_with_history(
    staff, credential_factory, upstream, permission, action
):
    client = staff("view", permission)
    credential = credential_factory(title="Team proxy", base_url=upstream.base_url)

    assert {"test_connection", "diagnose"} <= offered(client)
    response = post_action(client, action, credential)

    assert response.status_code == 200
    listings = [r for r in upstream.requests if r.path == "/v1/models"]
    assert [r.authorization for r in listings] == [f"Bearer {FAKE_KEY}"]
    (entry,) = LogEntry.objects.all()
    assert entry.object_id == str(credential.pk)
    message = entry.get_change_message()
    prefix = "Tested the connection" if action == "test_connection" else "Diagnosed"
    assert message.startswith(f"{prefix}: OK: 3 model(s) in ")
    page = history(client, credential)
    assert prefix in page
    assert FAKE_KEY not in page
    assert FAKE_KEY not in message


def test_the_test_permission_alone_changes_nothing(staff, credential_factory):
    client = staff("view", "test")
    credential = credential_factory(title="Team proxy", is_active=True)

    assert not {"activate", "deactivate"} & offered(client)
    post_action(client, "deactivate", credential)

    assert APIKeyCredentials.objects.get(pk=credential.pk).is_active is True


def test_a_failed_probe_is_logged_with_its_reason_and_no_key(
    admin_client, credential_factory, upstream
):
    credential = credential_factory(title="Rejected", base_url=upstream.base_url)
    upstream.respond(status=401, body={"error": {"message": f"bad key {FAKE_KEY}"}})

    post_action(admin_client, "test_connection", credential)

    (entry,) = LogEntry.objects.all()
    message = entry.get_change_message()
    assert message.startswith("Tested the connection: failed: ")
    assert "rejected the key" in message
    assert FAKE_KEY not in message


def test_the_permission_exists_with_its_name(db):
    permission = Permission.objects.get(codename="test_apikeycredentials")

    assert permission.name == "Can test the connection of API key credentials"
