from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import transaction

from credentials import crypto
from credentials.fields import EncryptedSecret
from credentials.models import BASE_URL_NEEDS_KEY, APIKeyCredentials
from tests.conftest import FAKE_KEY, raw_api_key


def test_it_refuses_a_new_base_url_without_the_key(credential_factory):
    credential = credential_factory(base_url="http://litellm:4000/v1")
    loaded = APIKeyCredentials.objects.get(pk=credential.pk)
    loaded.base_url = "http://attacker.example/v1"

    with pytest.raises(ValidationError) as caught:
        loaded.full_clean()
    assert "enter the key again" in caught.value.message_dict["base_url"][0]
    with pytest.raises(ValidationError):
        loaded.save()
    assert APIKeyCredentials.objects.get(pk=credential.pk).base_url == "http://litellm:4000/v1"


def test_it_refuses_moving_from_the_global_default_without_the_key(credential_factory):
    loaded = APIKeyCredentials.objects.get(pk=credential_factory(base_url="").pk)
    loaded.base_url = "http://attacker.example/v1"

    with pytest.raises(ValidationError):
        loaded.save()


def test_it_accepts_a_new_base_url_with_the_key_entered_again(credential_factory):
    loaded = APIKeyCredentials.objects.get(pk=credential_factory().pk)
    loaded.base_url = "http://litellm-2:4000/v1"
    loaded.api_key = "sk-test-fake-entered-again-0002"
    loaded.full_clean()
    loaded.save()

    saved = APIKeyCredentials.objects.get(pk=loaded.pk)
    assert saved.base_url == "http://litellm-2:4000/v1"
    assert saved.api_key.get_secret_value() == "sk-test-fake-entered-again-0002"


def test_the_binding_holds_again_after_a_save(credential_factory):
    credential = credential_factory()
    credential.base_url = "http://litellm-2:4000/v1"
    credential.api_key = "sk-test-fake-entered-again-0002"
    credential.save()
    # The key was entered for litellm-2 only; another move needs it again.
    credential.base_url = "http://litellm-3:4000/v1"

    with pytest.raises(ValidationError):
        credential.save()


def test_other_edits_keep_the_stored_key(credential_factory):
    loaded = APIKeyCredentials.objects.get(pk=credential_factory(title="Old").pk)
    loaded.title = "New"
    loaded.full_clean()
    loaded.save()

    assert APIKeyCredentials.objects.get(pk=loaded.pk).api_key.get_secret_value() == FAKE_KEY


def test_it_refuses_a_fallback_loop(credential_factory):
    first = credential_factory(title="First")
    second = credential_factory(title="Second", fallback=first)
    first.fallback = second

    with pytest.raises(ValidationError) as caught:
        first.full_clean()

    assert caught.value.message_dict["fallback"] == [
        "This fallback would make a loop: First → Second → First."
    ]


def test_it_refuses_itself_as_fallback(credential_factory):
    credential = credential_factory(title="Alone")
    credential.fallback = credential

    with pytest.raises(ValidationError, match="loop"):
        credential.full_clean()


def test_it_accepts_a_fallback_chain(credential_factory):
    direct = credential_factory(title="Direct")
    proxy = credential_factory(title="Proxy", fallback=direct)
    edge = credential_factory(title="Edge", fallback=proxy)

    edge.full_clean()
    assert edge.fallback_loop() == []


# ---- the binding and the policy hold on every path that writes a base URL ------------

ELSEWHERE = "http://attacker.example/v1"
METADATA = "http://169.254.169.254/v1"
NEW_KEY = "sk-test-fake-entered-again-0004"


def stored(credential: APIKeyCredentials) -> tuple[str, str]:
    """The row as stored now (a fresh query): base URL and the key it opens with."""
    row = APIKeyCredentials.objects.get(pk=credential.pk)
    return row.base_url, row.api_key.get_secret_value()


@pytest.fixture
def proxied(credential_factory):
    return credential_factory(title="Proxied", base_url="http://litellm:4000/v1")


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(
            lambda pk: APIKeyCredentials.objects.only("title", "base_url").get(pk=pk), id="only"
        ),
        pytest.param(lambda pk: APIKeyCredentials.objects.defer("api_key").get(pk=pk), id="defer"),
        pytest.param(
            lambda pk: APIKeyCredentials.objects.only("title").get(pk=pk),
            id="only-then-deferred-load",
        ),
    ],
)
def test_a_partial_load_cannot_move_the_key(proxied, load):
    partial = load(proxied.pk)
    partial.base_url = ELSEWHERE

    with pytest.raises(ValidationError) as caught:
        partial.save()

    assert caught.value.message_dict["base_url"] == [BASE_URL_NEEDS_KEY]
    assert stored(proxied) == ("http://litellm:4000/v1", FAKE_KEY)


def test_a_refresh_of_some_fields_cannot_move_the_key(proxied):
    partial = APIKeyCredentials.objects.only("title").get(pk=proxied.pk)
    partial.refresh_from_db(fields=["base_url"])
    partial.base_url = ELSEWHERE

    with pytest.raises(ValidationError):
        partial.save()

    assert stored(proxied) == ("http://litellm:4000/v1", FAKE_KEY)


def test_a_refresh_after_the_move_cannot_launder_it(proxied):
    loaded = APIKeyCredentials.objects.get(pk=proxied.pk)
    loaded.base_url = ELSEWHERE
    loaded.refresh_from_db(fields=["title"])

    with pytest.raises(ValidationError):
        loaded.save()

    assert stored(proxied) == ("http://litellm:4000/v1", FAKE_KEY)


def test_a_stale_instance_cannot_write_its_old_base_url_over_a_new_one(proxied):
    stale = APIKeyCredentials.objects.defer("api_key").get(pk=proxied.pk)
    # Meanwhile an admin moves the credential, with its new key.
    fresh = APIKeyCredentials.objects.get(pk=proxied.pk)
    fresh.base_url = "http://litellm-2:4000/v1"
    fresh.api_key = NEW_KEY
    fresh.save()
    stale.title = "Renamed"

    with pytest.raises(ValidationError):
        stale.save()  # would send the new key to the old host

    assert stored(proxied) == ("http://litellm-2:4000/v1", NEW_KEY)
    assert APIKeyCredentials.objects.get(pk=proxied.pk).title == "Proxied"


def test_a_stale_instance_may_still_save_fields_other_than_the_base_url(proxied):
    stale = APIKeyCredentials.objects.get(pk=proxied.pk)
    APIKeyCredentials.objects.filter(pk=proxied.pk).update(title="Renamed elsewhere")
    stale.is_active = False

    stale.save(update_fields=["is_active", "updated_at"])

    assert APIKeyCredentials.objects.get(pk=proxied.pk).is_active is False


def test_update_cannot_move_the_key(proxied):
    with pytest.raises(ValidationError) as caught:
        APIKeyCredentials.objects.filter(pk=proxied.pk).update(base_url=ELSEWHERE)

    assert "Save each credential" in caught.value.message_dict["base_url"][0]
    assert stored(proxied) == ("http://litellm:4000/v1", FAKE_KEY)


def test_update_through_every_manager_is_refused(proxied, alice):
    APIKeyCredentials.objects.filter(pk=proxied.pk).update(owner=alice)

    for queryset in [
        APIKeyCredentials._base_manager.filter(pk=proxied.pk),
        APIKeyCredentials._default_manager.filter(pk=proxied.pk),
        alice.api_key_credentials.all(),
    ]:
        with pytest.raises(ValidationError):
            queryset.update(base_url=METADATA)

    assert stored(proxied) == ("http://litellm:4000/v1", FAKE_KEY)


def test_update_of_other_fields_still_works(proxied):
    APIKeyCredentials.objects.filter(pk=proxied.pk).update(title="Renamed", is_active=False)

    row = APIKeyCredentials.objects.get(pk=proxied.pk)
    assert (row.title, row.is_active) == ("Renamed", False)


def test_bulk_update_cannot_move_the_key(proxied):
    loaded = APIKeyCredentials.objects.get(pk=proxied.pk)
    loaded.base_url = ELSEWHERE
    loaded.api_key = NEW_KEY  # even with a new key: bulk writes are not checked one by one

    with pytest.raises(ValidationError) as caught:
        APIKeyCredentials.objects.bulk_update([loaded], ["title", "base_url"])

    assert "Save each credential" in caught.value.message_dict["base_url"][0]
    assert stored(proxied) == ("http://litellm:4000/v1", FAKE_KEY)


def test_bulk_update_of_other_fields_still_works(proxied):
    loaded = APIKeyCredentials.objects.get(pk=proxied.pk)
    loaded.title = "Renamed"

    APIKeyCredentials.objects.bulk_update([loaded], ["title"])

    assert APIKeyCredentials.objects.get(pk=proxied.pk).title == "Renamed"


def test_bulk_create_applies_the_policy(db):
    good = APIKeyCredentials(title="Good", api_key=FAKE_KEY, base_url="http://litellm:4000/v1")
    bad = APIKeyCredentials(title="Bad", api_key=FAKE_KEY, base_url=METADATA)

    with pytest.raises(ValidationError) as caught:
        APIKeyCredentials.objects.bulk_create([good, bad])

    assert "Link-local and cloud-metadata" in caught.value.message_dict["base_url"][0]
    assert not APIKeyCredentials.objects.exists()


def test_bulk_create_of_good_rows_still_works(db):
    APIKeyCredentials.objects.bulk_create(
        [
            APIKeyCredentials(title="One", api_key=FAKE_KEY, base_url="http://litellm:4000/v1"),
            APIKeyCredentials(title="Two", api_key=FAKE_KEY, base_url=""),
        ]
    )

    assert APIKeyCredentials.objects.count() == 2


def test_bulk_create_cannot_move_a_key_as_an_upsert(proxied):
    twin = APIKeyCredentials(
        id=proxied.pk, title="Proxied", api_key=FAKE_KEY, base_url="http://other-proxy:4000/v1"
    )

    with pytest.raises(ValidationError):
        APIKeyCredentials.objects.bulk_create(
            [twin], update_conflicts=True, unique_fields=["id"], update_fields=["base_url"]
        )

    assert stored(proxied) == ("http://litellm:4000/v1", FAKE_KEY)


@pytest.mark.parametrize("base_url", [METADATA, "http://0251.0376.0251.0376/v1", "ftp://x/v1"])
def test_save_applies_the_policy_to_a_new_credential(db, base_url):
    credential = APIKeyCredentials(title="Metadata", api_key=FAKE_KEY, base_url=base_url)

    with pytest.raises(ValidationError) as caught:
        credential.save()

    assert caught.value.message_dict["base_url"]
    assert not APIKeyCredentials.objects.exists()


def test_save_applies_the_policy_even_with_the_key_entered_again(proxied):
    loaded = APIKeyCredentials.objects.get(pk=proxied.pk)
    loaded.base_url = METADATA
    loaded.api_key = NEW_KEY

    with pytest.raises(ValidationError) as caught:
        loaded.save()

    assert "Link-local and cloud-metadata" in caught.value.message_dict["base_url"][0]
    assert stored(proxied) == ("http://litellm:4000/v1", FAKE_KEY)


def test_create_applies_the_policy(db):
    with pytest.raises(ValidationError):
        APIKeyCredentials.objects.create(title="Metadata", api_key=FAKE_KEY, base_url=METADATA)

    assert not APIKeyCredentials.objects.exists()


def test_a_partial_load_may_move_the_key_with_a_new_key(proxied):
    partial = APIKeyCredentials.objects.only("title", "base_url").get(pk=proxied.pk)
    partial.base_url = "http://litellm-2:4000/v1"
    partial.api_key = NEW_KEY

    partial.save()

    assert stored(proxied) == ("http://litellm-2:4000/v1", NEW_KEY)


def test_a_new_key_that_is_not_written_does_not_count(proxied):
    loaded = APIKeyCredentials.objects.get(pk=proxied.pk)
    loaded.base_url = ELSEWHERE
    loaded.api_key = NEW_KEY

    with pytest.raises(ValidationError):
        loaded.save(update_fields=["base_url"])  # the old key would go to ELSEWHERE

    assert stored(proxied) == ("http://litellm:4000/v1", FAKE_KEY)


def test_a_refused_save_leaves_the_callers_transaction_usable(proxied):
    loaded = APIKeyCredentials.objects.get(pk=proxied.pk)
    loaded.base_url = ELSEWHERE

    with transaction.atomic():
        with pytest.raises(ValidationError):
            loaded.save()
        loaded.refresh_from_db()
        loaded.title = "Renamed"
        loaded.save()

    assert APIKeyCredentials.objects.get(pk=proxied.pk).title == "Renamed"


def test_saving_other_fields_does_not_read_the_row_again(proxied, django_assert_num_queries):
    loaded = APIKeyCredentials.objects.get(pk=proxied.pk)
    loaded.is_active = False

    with django_assert_num_queries(1):  # the UPDATE alone
        loaded.save(update_fields=["is_active", "updated_at"])


def test_a_same_base_url_with_a_trailing_slash_is_not_a_move(proxied):
    loaded = APIKeyCredentials.objects.get(pk=proxied.pk)
    loaded.base_url = "http://litellm:4000/v1/"
    loaded.title = "Renamed"

    loaded.save()

    assert APIKeyCredentials.objects.get(pk=proxied.pk).title == "Renamed"


def test_saving_a_partial_load_without_the_base_url_does_not_read_it(proxied):
    partial = APIKeyCredentials.objects.only("title").get(pk=proxied.pk)
    partial.title = "Renamed"

    partial.save()

    assert "base_url" not in partial.__dict__
    assert APIKeyCredentials.objects.get(pk=proxied.pk).title == "Renamed"


# ---- a save writes the stored key only when a new key was entered ---------------------


def test_a_stale_save_does_not_write_back_a_token_the_rotation_replaced(proxied):
    held = APIKeyCredentials.objects.get(pk=proxied.pk)
    rotated = APIKeyCredentials.objects.get(pk=proxied.pk)
    assert isinstance(rotated.api_key, EncryptedSecret)
    rotated.api_key = EncryptedSecret(crypto.rotate(rotated.api_key.token))
    APIKeyCredentials.objects.bulk_update([rotated], ["api_key"])  # as the command does
    held.title = "Renamed"

    held.save()

    assert raw_api_key(proxied.pk) == rotated.api_key.token
    assert APIKeyCredentials.objects.get(pk=proxied.pk).title == "Renamed"


def test_a_stale_save_does_not_undo_a_key_entered_meanwhile(proxied):
    held = APIKeyCredentials.objects.get(pk=proxied.pk)
    other = APIKeyCredentials.objects.get(pk=proxied.pk)
    other.api_key = NEW_KEY
    other.save()
    held.title = "Renamed"

    held.save()

    row = APIKeyCredentials.objects.get(pk=proxied.pk)
    assert (row.title, row.api_key.get_secret_value(), row.key_hint) == (
        "Renamed",
        NEW_KEY,
        NEW_KEY[-4:],
    )
