"""Spend control in the credentials admin: the Limits fieldset, the allowed models'
suggestions from the credential's /models, this month's spend on the change page and
in the list.

Usage records are created directly, in the current UTC month and around its edges.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from decimal import Decimal
from html import unescape

import pytest
from django.contrib.admin.models import LogEntry
from django.urls import reverse
from django.utils import timezone

from credentials.models import APIKeyCredentials
from llm import reports
from llm.models import UsageRecord
from tests.conftest import FAKE_KEY
from tests.upstream import free_port

ADD_URL = reverse("admin:credentials_apikeycredentials_add")
LIST_URL = reverse("admin:credentials_apikeycredentials_changelist")
MODELS = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]


def change_url(credential: APIKeyCredentials) -> str:
    return reverse("admin:credentials_apikeycredentials_change", args=[credential.pk])


def models_url(credential_id: object) -> str:
    return reverse("admin:credentials_apikeycredentials_models", args=[credential_id])


def text(response) -> str:
    """The page as a reader sees it: tags dropped, white space folded."""
    plain = re.sub(r"<script.*?</script>|<[^>]+>", " ", response.content.decode(), flags=re.S)
    return " ".join(unescape(plain).split())


def form_data(credential: APIKeyCredentials, **overrides: str) -> dict[str, str]:
    data = {
        "title": credential.title,
        "provider": credential.provider,
        "owner": "",
        "api_key": "",
        "base_url": credential.base_url,
        "fallback": "",
        "is_active": "on",
        "expires_at_0": "",
        "expires_at_1": "",
        "allowed_models": "",
        "monthly_budget_usd": "",
        "user_monthly_budget_usd": "",
        "requests_per_minute": "",
        "tokens_per_minute": "",
        "user_requests_per_minute": "",
        "user_tokens_per_minute": "",
        "_save": "Save",
    }
    data.update(overrides)
    return data


@pytest.fixture(autouse=True)
def short_probes(settings):
    settings.LLM_PROBE_TIMEOUT_SECONDS = 2


@pytest.fixture
def proxy(start_upstream):
    return start_upstream(models=MODELS)


@pytest.fixture
def credential(credential_factory, proxy):
    return credential_factory(title="Team proxy", base_url=proxy.base_url)


# ---- the Limits fieldset ------------------------------------------------------------------


def test_the_change_page_has_a_limits_fieldset_that_says_what_empty_means(admin_client, credential):
    page = text(admin_client.get(change_url(credential)))

    assert "Limits Checked before each call with this credential. Budgets are in USD per " in page
    assert "calendar month (UTC) and reset on the 1st at 00:00 UTC; rates are per minute. " in page
    assert "Empty: no limit." in page
    for label in [
        "Allowed models:",
        "Monthly budget (USD):",
        "Monthly cap per user (USD):",
        "Requests per minute:",
        "Tokens per minute:",
        "Requests per minute per user:",
        "Tokens per minute per user:",
    ]:
        assert label in page


def test_it_saves_the_limits_from_the_form(admin_client, credential):
    response = admin_client.post(
        change_url(credential),
        form_data(
            credential,
            allowed_models="gpt-4o*\n openai/* , text-embedding-3-small\n\ngpt-4o*",
            monthly_budget_usd="10",
            user_monthly_budget_usd="0.5",
            requests_per_minute="60",
            tokens_per_minute="100000",
            user_requests_per_minute="10",
            user_tokens_per_minute="20000",
        ),
    )

    assert response.status_code == 302
    stored = APIKeyCredentials.objects.get(pk=credential.pk)
    assert stored.allowed_models == ["gpt-4o*", "openai/*", "text-embedding-3-small"]
    assert (stored.monthly_budget_usd, stored.user_monthly_budget_usd) == (
        Decimal(10),
        Decimal("0.5"),
    )
    assert (stored.requests_per_minute, stored.tokens_per_minute) == (60, 100000)
    assert (stored.user_requests_per_minute, stored.user_tokens_per_minute) == (10, 20000)
    assert stored.api_key.get_secret_value() == FAKE_KEY
    page = admin_client.get(change_url(credential)).content.decode()
    assert "gpt-4o*\nopenai/*\ntext-embedding-3-small</textarea>" in page
    assert 'name="monthly_budget_usd" value="10"' in page  # not 10.00000000
    assert 'name="user_monthly_budget_usd" value="0.5"' in page


def test_saving_an_unchanged_budget_changes_nothing(admin_client, credential):
    credential.monthly_budget_usd = Decimal(10)
    credential.save()

    response = admin_client.post(
        change_url(credential), form_data(credential, monthly_budget_usd="10")
    )

    assert response.status_code == 302
    entry = LogEntry.objects.get(object_id=str(credential.pk))
    assert entry.get_change_message() == "No fields changed."


def test_a_view_only_staff_user_reads_the_limits_without_suggestions(staff, credential):
    credential.allowed_models = ["gpt-4o*", "openai/*"]
    credential.monthly_budget_usd = Decimal(10)
    credential.save()
    client = staff("view")

    response = client.get(change_url(credential))

    assert response.status_code == 200
    page = text(response)
    assert "Suggest models" not in page
    assert "Allowed models: gpt-4o*, openai/*" in page  # not a JSON list
    assert "Monthly budget (USD): $10.00" in page  # not 10.00000000
    assert "Monthly cap per user (USD): No limit" in page
    assert "$0.00 of $10.00 (0%)" in page
    assert "10.00000000" not in response.content.decode()


def test_a_view_only_page_says_any_model_when_the_list_is_empty(staff, credential):
    page = text(staff("view").get(change_url(credential)))

    assert "Allowed models: Any model" in page
    assert "Monthly budget (USD): No limit" in page


def test_emptying_the_limits_removes_them(admin_client, credential_factory):
    credential = credential_factory(
        title="Capped",
        allowed_models=["gpt-4o"],
        monthly_budget_usd=Decimal(5),
        tokens_per_minute=9,
    )

    response = admin_client.post(change_url(credential), form_data(credential))

    assert response.status_code == 302
    stored = APIKeyCredentials.objects.get(pk=credential.pk)
    assert stored.allowed_models == []
    assert stored.monthly_budget_usd is None
    assert stored.tokens_per_minute is None
    assert not stored.has_limits


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        (
            "allowed_models",
            "gpt-4o\ngpt 4o",
            "Not a model name: 'gpt 4o'. Write one name or pattern per line, without spaces",
        ),
        ("allowed_models", "x" * 201, "A model name is at most 200 characters"),
        ("monthly_budget_usd", "-1", "Ensure this value is greater than or equal to 0."),
        ("monthly_budget_usd", "ten", "Enter a number."),
        (
            "user_monthly_budget_usd",
            "1e99",
            "Ensure that there are no more than 14 digits in total.",
        ),
        ("requests_per_minute", "-5", "Ensure this value is greater than or equal to 0."),
        ("tokens_per_minute", "1.5", "Enter a whole number."),
    ],
)
def test_a_bad_limit_is_a_sentence_on_the_form(admin_client, credential, field, value, error):
    response = admin_client.post(change_url(credential), form_data(credential, **{field: value}))

    assert response.status_code == 200
    assert error in text(response)
    assert not APIKeyCredentials.objects.get(pk=credential.pk).has_limits


# ---- suggestions from /models ---------------------------------------------------------


def test_the_change_page_offers_suggestions_from_the_credentials_models(admin_client, credential):
    page = admin_client.get(change_url(credential)).content.decode()

    assert "Suggest models from this credential's /models</button>" in page
    assert f'data-url="{models_url(credential.pk)}"' in page
    assert "A <code>*</code> matches any characters, <code>/</code> included" in page


def test_the_add_page_says_to_save_first(admin_client):
    page = admin_client.get(ADD_URL).content.decode()

    assert re.search(r'class="button suggest-models" disabled>', page)
    assert "Save the credential first: the suggestions come from its saved base URL" in page
    assert "data-url=" not in page


def test_it_lists_the_models_with_the_stored_key(admin_client, credential, proxy):
    response = admin_client.get(models_url(credential.pk))

    assert response.status_code == 200
    assert response.json() == {"models": MODELS}
    assert FAKE_KEY not in response.content.decode()
    (request,) = proxy.requests
    assert (request.method, request.path) == ("GET", "/v1/models")
    assert request.authorization == f"Bearer {FAKE_KEY}"
    entry = LogEntry.objects.get(object_id=str(credential.pk))
    assert entry.get_change_message().startswith("Listed its models: OK: 3 model(s) in ")


def test_it_lists_the_models_of_an_inactive_credential(admin_client, credential_factory, proxy):
    credential = credential_factory(title="Not yet", base_url=proxy.base_url, is_active=False)

    response = admin_client.get(models_url(credential.pk))

    assert response.json() == {"models": MODELS}


def test_a_rejected_key_is_a_502_with_the_sentence_and_no_key(admin_client, credential, proxy):
    proxy.respond(status=401, body={"error": {"message": f"bad key {FAKE_KEY}"}})

    response = admin_client.get(models_url(credential.pk))

    assert response.status_code == 502
    assert response.json() == {
        "error": f"The LLM proxy at 127.0.0.1:{proxy.port} rejected the key of credential "
        "'Team proxy' (401): the key does not match the proxy's keys. Enter the right key in "
        'the admin. It said: "bad key [key]"'
    }
    assert FAKE_KEY not in response.content.decode()


def test_a_proxy_that_is_down_is_a_502_with_the_sentence(admin_client, credential_factory):
    port = free_port()
    credential = credential_factory(title="Down", base_url=f"http://127.0.0.1:{port}/v1")

    response = admin_client.get(models_url(credential.pk))

    assert response.status_code == 502
    assert response.json()["error"].startswith(
        f"Could not connect to the LLM proxy at 127.0.0.1:{port} (connection refused)"
    )


def test_an_answer_that_is_no_model_list_is_a_502(admin_client, credential, proxy):
    proxy.respond(mode="verbatim", body="<html><body>Sign in</body></html>")

    response = admin_client.get(models_url(credential.pk))

    assert response.status_code == 502
    assert "sent an answer that is not an OpenAI-compatible response" in response.json()["error"]


@pytest.mark.parametrize(
    "object_id", ["00000000-0000-0000-0000-000000000000", "not-a-uuid", "a/b", "%00"]
)
def test_an_unknown_credential_is_a_404(admin_client, db, object_id):
    response = admin_client.get(models_url(object_id))

    assert response.status_code == 404
    assert response.json() == {"error": "There is no credential with this id."}


def test_only_get_lists_the_models(admin_client, credential, proxy):
    response = admin_client.post(models_url(credential.pk))

    assert response.status_code == 405
    assert response.json() == {"error": "Only GET lists the models."}
    assert proxy.requests == []


def test_a_view_only_staff_user_gets_a_403_and_nothing_is_sent(staff, credential, proxy):
    client = staff("view")

    response = client.get(models_url(credential.pk))

    assert response.status_code == 403
    assert response.json() == {
        "error": "Listing a credential's models sends its key to its base URL: that needs "
        "the permission to test or to change API key credentials."
    }
    assert proxy.requests == []


def test_a_403_does_not_say_whether_the_credential_exists(staff, db):
    client = staff("view")

    response = client.get(models_url("00000000-0000-0000-0000-000000000000"))

    assert response.status_code == 403


@pytest.mark.parametrize("permissions", [("view", "test"), ("change",)])
def test_staff_who_may_test_or_change_get_the_models(staff, credential, permissions):
    client = staff(*permissions)

    response = client.get(models_url(credential.pk))

    assert response.status_code == 200
    assert response.json() == {"models": MODELS}


def test_a_user_who_is_not_staff_is_sent_to_sign_in(client, alice, credential, proxy):
    client.force_login(alice)

    response = client.get(models_url(credential.pk))

    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert proxy.requests == []


# ---- this month's spend ------------------------------------------------------------------


@pytest.fixture
def month():
    return reports.month_bounds()


def record(credential, *, cost: str | None, user=None, model="gpt-4o", tokens=100, when=None):
    return UsageRecord.objects.create(
        credential=credential,
        user=user,
        purpose="chat",
        model=model,
        total_tokens=tokens,
        cost_usd=None if cost is None else Decimal(cost),
        created_at=when or timezone.now(),
    )


@pytest.fixture
def spending(credential, credential_factory, alice, django_user_model, month):
    """This month: alice $2.50 in 2 calls, bob $1.00, the platform $0.25; outside it or on
    another credential: what must not count."""
    bob = django_user_model.objects.create_user("bob")
    start, _ = month
    record(credential, cost="2.00", user=alice, tokens=1000, when=start)
    record(credential, cost="0.50", user=alice, model="gpt-4o-mini", tokens=500)
    record(credential, cost="1.00", user=bob, model="gpt-4o-mini", tokens=300)
    record(credential, cost="0.25", model="text-embedding-3-small", tokens=50)
    record(credential, cost=None, user=bob, model="unpriced-model", tokens=10)
    record(credential, cost="40", user=alice, when=start - timedelta(microseconds=1))
    record(credential_factory(title="Other"), cost="99", user=alice)
    return bob


def spend_section(response) -> str:
    page = text(response)
    return page.split("Spend this month", 1)[1].split("History", 1)[0]


def test_the_spend_of_the_month_is_shown_against_the_budget(
    admin_client, credential, spending, month
):
    credential.monthly_budget_usd = Decimal(10)
    credential.save()
    _, end = month

    response = admin_client.get(change_url(credential))

    resets = f"{end.day} {end:%B %Y} 00:00 UTC"
    section = spend_section(response)
    assert f"$3.75 of $10.00 (38%), resets on {resets}." in section
    page = response.content.decode()
    assert ('<meter min="0" max="10" value="3.75" low="8" high="10"') in page


def test_a_spent_budget_says_calls_are_refused(admin_client, credential, spending):
    credential.monthly_budget_usd = Decimal("3.5")
    credential.save()

    section = spend_section(admin_client.get(change_url(credential)))

    assert "$3.75 of $3.50 (107%), resets on " in section
    assert "Calls with this credential are refused until then." in section


def test_a_budget_of_zero_says_it_refuses_every_call(admin_client, credential):
    credential.monthly_budget_usd = Decimal(0)
    credential.save()

    section = spend_section(admin_client.get(change_url(credential)))

    assert "$0.00 of $0.00 (a budget of $0 refuses every call), resets on " in section


def test_without_a_budget_it_says_so(admin_client, credential, spending, month):
    section = spend_section(admin_client.get(change_url(credential)))

    assert f"$3.75, no budget ({month[0]:%B %Y}, UTC)." in section
    assert "<meter" not in admin_client.get(change_url(credential)).content.decode()


def test_it_lists_the_top_users_and_models_of_the_month(admin_client, credential, spending):
    credential.user_monthly_budget_usd = Decimal(2)
    credential.save()

    section = spend_section(admin_client.get(change_url(credential)))

    assert "Cap per user: $2.00 a month each." in section
    assert (
        "User Calls Tokens Cost Of the cap alice 2 1500 $2.50 125% bob 2 310 $1.00 50% "
        "no user (the platform, or a deleted user) 1 50 $0.25 –"
    ) in section
    assert (
        "Model Calls Tokens Cost gpt-4o 1 1000 $2.00 gpt-4o-mini 2 800 $1.50 "
        "text-embedding-3-small 1 50 $0.25 unpriced-model 1 10 $0.00"
    ) in section


def test_a_deleted_user_is_named_by_id(admin_client, credential, spending):
    bob_id = spending.pk
    spending.delete()  # his records lose their user (SET_NULL)
    ghost = record(credential, cost="0.10")
    UsageRecord.objects.filter(pk=ghost.pk).update(user_id=9999)

    section = spend_section(admin_client.get(change_url(credential)))

    assert f"#{bob_id} (deleted)" not in section
    assert "#9999 (deleted) 1 100 $0.10" in section


def test_the_top_lists_keep_five(admin_client, credential, django_user_model):
    for n in range(7):
        user = django_user_model.objects.create_user(f"user{n}")
        record(credential, cost=f"{n + 1}", user=user, model=f"model-{n}")

    section = spend_section(admin_client.get(change_url(credential)))

    assert "user6 1 100 $7.00 user5" in section
    assert "user2 1 100 $3.00" in section
    assert "user1 " not in section
    assert "model-2 1 100 $3.00" in section
    assert "model-1 " not in section


def test_the_months_records_link_lists_them(admin_client, credential, spending):
    page = admin_client.get(change_url(credential)).content.decode()
    (link,) = re.findall(r'<a href="([^"]+)">This month\'s usage records', page)

    response = admin_client.get(unescape(link))

    assert response.status_code == 200
    assert response.context["cl"].result_count == 5


def test_a_new_credential_has_no_spend_yet(admin_client):
    page = text(admin_client.get(ADD_URL))

    assert "Spend this month: No calls yet." in page


def test_a_month_with_no_calls_says_so(admin_client, credential):
    section = spend_section(admin_client.get(change_url(credential)))

    assert "$0.00, no budget" in section
    assert "No calls this month." in section


def test_the_month_is_the_utc_calendar_month(credential, month):
    start, end = month
    record(credential, cost="1", when=start)
    record(credential, cost="2", when=end - timedelta(microseconds=1))
    record(credential, cost="4", when=end)
    record(credential, cost="8", when=start - timedelta(seconds=1))

    assert reports.month_spend(credential.pk) == Decimal(3)
    assert reports.month_spend(credential.pk, now=end) == Decimal(4)
    assert reports.month_spend(credential.pk, now=start - timedelta(days=1)) == Decimal(8)
    assert start.utcoffset() == timedelta(0)
    assert (start.day, start.hour, start.minute) == (1, 0, 0)


def test_the_spend_counts_the_chosen_credential_even_when_a_fallback_served(
    credential, credential_factory, alice
):
    fallback = credential_factory(title="Fallback")
    UsageRecord.objects.create(
        credential=credential,
        serving_credential=fallback,
        failed_over=True,
        user=alice,
        purpose="chat",
        model="gpt-4o",
        cost_usd=Decimal("1.5"),
    )

    assert reports.month_spend(credential.pk) == Decimal("1.5")
    assert reports.month_spend(credential.pk, user_id=alice.pk) == Decimal("1.5")
    assert reports.month_spend(fallback.pk) == Decimal(0)


def test_no_page_shows_the_key(admin_client, credential, spending):
    credential.monthly_budget_usd = Decimal(10)
    credential.save()

    for url in [LIST_URL, change_url(credential), ADD_URL]:
        assert FAKE_KEY not in admin_client.get(url).content.decode()


# ---- the list's column ------------------------------------------------------------------


def column(response) -> dict[str, str]:
    """Title -> the spend column's text, in the list's order."""
    rows = re.findall(
        r'<th class="field-title"><a [^>]*>([^<]+)</a></th>.*?'
        r'<td class="field-month_spend_display">([^<]*)</td>',
        response.content.decode(),
        flags=re.S,
    )
    return {unescape(title): unescape(spent) for title, spent in rows}


def test_the_list_shows_the_spend_against_the_budget(
    admin_client, credential, credential_factory, spending
):
    credential.monthly_budget_usd = Decimal(10)
    credential.save()
    credential_factory(title="Idle")

    response = admin_client.get(LIST_URL)

    assert column(response) == {
        "Idle": "$0.00",
        "Other": "$99.00",
        "Team proxy": "$3.75 / $10.00",
    }


def test_the_spend_column_sorts(admin_client, credential, credential_factory, spending):
    credential_factory(title="Idle")
    response = admin_client.get(LIST_URL)
    # The column's index in the list, as its header's sort link gives it.
    index = response.context["cl"].list_display.index("month_spend_display")

    descending = column(admin_client.get(f"{LIST_URL}?o=-{index}"))
    ascending = column(admin_client.get(f"{LIST_URL}?o={index}"))

    assert list(descending) == ["Other", "Team proxy", "Idle"]
    assert list(ascending) == ["Idle", "Team proxy", "Other"]


@pytest.mark.parametrize("count", [1, 20])
def test_the_list_costs_the_same_queries_for_1_or_20_credentials(
    admin_client, credential_factory, django_user_model, count, django_assert_max_num_queries
):
    for n in range(count):
        owner = django_user_model.objects.create_user(f"owner{n}")
        credential = credential_factory(
            title=f"Proxy {n}", owner=owner, monthly_budget_usd=Decimal(n + 1)
        )
        record(credential, cost="0.5", user=owner)
    admin_client.get(LIST_URL)  # the session and the permissions, read once

    with django_assert_max_num_queries(6):  # 4 today: user, 2 counts, the page
        response = admin_client.get(LIST_URL)

    assert len(column(response)) == count
    assert column(response)["Proxy 0"] == "$0.50 / $1.00"


def test_delete_selected_still_works_on_the_annotated_list(admin_client, credential, spending):
    response = admin_client.post(
        LIST_URL,
        {"action": "delete_selected", "_selected_action": [str(credential.pk)], "post": "yes"},
        follow=True,
    )

    assert response.status_code == 200
    assert not APIKeyCredentials.objects.filter(pk=credential.pk).exists()
    assert json.loads(json.dumps(list(column(response)))) == ["Other"]
