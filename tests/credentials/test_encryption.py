from __future__ import annotations

import io
import json
import pickle

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.management import call_command
from django.db import connection

from credentials.crypto import DecryptionError
from credentials.fields import EncryptedSecret
from credentials.models import APIKeyCredentials
from credentials.secret import Secret
from tests.conftest import FAKE_KEY, TEST_FERNET_KEY, raw_api_key


def test_it_never_stores_the_plaintext(credential_factory):
    credential = credential_factory(api_key=FAKE_KEY)

    stored = raw_api_key(credential.pk)

    assert FAKE_KEY not in stored
    assert Fernet(TEST_FERNET_KEY).decrypt(stored.encode()).decode() == FAKE_KEY


def test_it_reads_back_a_masked_secret(credential_factory):
    credential = credential_factory(api_key=FAKE_KEY)

    key = APIKeyCredentials.objects.get(pk=credential.pk).api_key

    assert isinstance(key, Secret)
    assert FAKE_KEY not in str(key)
    assert FAKE_KEY not in repr(key)
    assert FAKE_KEY not in f"{key} {key!r} {[key]}"
    assert key.get_secret_value() == FAKE_KEY


def test_it_masks_a_freshly_assigned_key():
    credential = APIKeyCredentials(title="Fresh", api_key=FAKE_KEY)

    assert FAKE_KEY not in repr(credential.api_key)
    assert credential.api_key.get_secret_value() == FAKE_KEY
    assert credential.key_hint == FAKE_KEY[-4:]


def test_it_keeps_the_last_four_characters_as_hint(credential_factory):
    credential = credential_factory(api_key=FAKE_KEY)
    credential.api_key = "sk-test-fake-replaced-WXYZ"
    credential.save()

    assert APIKeyCredentials.objects.get(pk=credential.pk).key_hint == "WXYZ"


def test_it_decrypts_nothing_when_listing(credential_factory, settings):
    credential_factory()
    # Without any key, loading rows and their hints still works: nothing is decrypted.
    settings.CREDENTIALS_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]

    rows = list(APIKeyCredentials.objects.all())

    assert rows[0].key_hint == FAKE_KEY[-4:]


def test_dumpdata_holds_no_plaintext_and_loaddata_round_trips(credential_factory, tmp_path):
    credential = credential_factory(api_key=FAKE_KEY)
    out = io.StringIO()

    call_command("dumpdata", "credentials", stdout=out)

    assert FAKE_KEY not in out.getvalue()
    fixture = tmp_path / "credentials.json"
    fixture.write_text(out.getvalue())
    APIKeyCredentials.objects.all().delete()
    call_command("loaddata", str(fixture), verbosity=0)
    assert APIKeyCredentials.objects.get(pk=credential.pk).api_key.get_secret_value() == FAKE_KEY
    assert json.loads(out.getvalue())[0]["fields"]["api_key"] == raw_api_key(credential.pk)


def test_it_names_the_credential_when_no_key_opens_it(credential_factory, settings):
    credential = credential_factory(title="Team proxy", api_key=FAKE_KEY)
    token = raw_api_key(credential.pk)
    settings.CREDENTIALS_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]
    loaded = APIKeyCredentials.objects.get(pk=credential.pk)

    with pytest.raises(DecryptionError) as caught:
        loaded.api_key.get_secret_value()

    message = str(caught.value)
    assert "'Team proxy'" in message
    assert str(credential.pk) in message
    assert "CREDENTIALS_ENCRYPTION_KEYS" in message
    assert token not in message
    assert FAKE_KEY not in message


def test_it_refuses_to_work_without_keys(credential_factory, settings):
    credential = credential_factory()
    settings.CREDENTIALS_ENCRYPTION_KEYS = []

    with pytest.raises(ImproperlyConfigured, match="generate_encryption_key"):
        APIKeyCredentials.objects.get(pk=credential.pk).api_key.get_secret_value()
    with pytest.raises(ImproperlyConfigured, match="CREDENTIALS_ENCRYPTION_KEYS is empty"):
        credential_factory(title="Another")


def test_it_pickles_the_token_only(credential_factory):
    credential = APIKeyCredentials.objects.get(pk=credential_factory(api_key=FAKE_KEY).pk)

    pickled = pickle.dumps(credential)

    assert FAKE_KEY.encode() not in pickled
    assert pickle.loads(pickled).api_key.get_secret_value() == FAKE_KEY


def test_it_refuses_to_pickle_a_plaintext_secret():
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(Secret(FAKE_KEY))


def test_it_refuses_queries_on_the_key(credential_factory):
    credential_factory()

    with pytest.raises(Exception, match="cannot be queried"):
        APIKeyCredentials.objects.filter(api_key=FAKE_KEY).exists()


def test_a_token_written_elsewhere_is_not_a_key(db):
    # A string given to the field's to_python is a stored token (fixtures, serializers).
    value = APIKeyCredentials._meta.get_field("api_key").to_python("gAAAA-not-a-token")

    assert isinstance(value, EncryptedSecret)
    with pytest.raises(DecryptionError):
        value.get_secret_value()


def test_the_column_is_text_on_every_database(credential_factory):
    credential_factory()

    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key, key_hint FROM credentials_apikeycredentials")
        stored, hint = cursor.fetchone()

    assert stored.startswith("gAAAAA")
    assert hint == FAKE_KEY[-4:]


@pytest.mark.parametrize("blank", ["", Secret("")])
def test_it_refuses_a_blank_key(db, blank):
    credential = APIKeyCredentials(title="Blank", api_key=blank)

    with pytest.raises(ValidationError) as caught:
        credential.full_clean()

    assert "api_key" in caught.value.message_dict
