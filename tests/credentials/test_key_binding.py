from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from credentials.models import APIKeyCredentials
from tests.conftest import FAKE_KEY


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
