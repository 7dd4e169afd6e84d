"""Fixtures the credentials tests share: staff with chosen permissions."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType

from credentials.models import APIKeyCredentials


@pytest.fixture
def staff(client, django_user_model):
    """Sign in a staff user holding only the given credentials permissions (codenames
    without the model name: "view", "change", "test")."""

    def sign_in(*permissions: str):
        user = django_user_model.objects.create_user("staffer", is_staff=True)
        for name in permissions:
            user.user_permissions.add(
                Permission.objects.get(
                    codename=f"{name}_apikeycredentials",
                    content_type=ContentType.objects.get_for_model(APIKeyCredentials),
                )
            )
        client.force_login(user)
        return client

    return sign_in
