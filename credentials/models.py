from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

from credentials.fields import BaseURLField, EncryptedKeyField, EncryptedSecret

BASE_URL_NEEDS_KEY = (
    "The API key is bound to its base URL: enter the key again to send it to a new address."
)


class Platform:
    """The platform itself, not a user: a call made for the site, which owns no credential.

    Pass `user=PLATFORM` to use a credential without checking whose it is (an admin's
    connection test, a nightly job). A forgotten `user` is nobody, and nobody may use
    any credential: skipping the ownership check is always written at the call site.
    """

    def __repr__(self) -> str:
        return "PLATFORM"


PLATFORM = Platform()


def _signed_in(user: Any) -> bool:
    return user is not None and bool(user.is_authenticated) and bool(user.is_active)


class CredentialQuerySet(models.QuerySet["APIKeyCredentials"]):
    """Who may use which credential, as a query; `APIKeyCredentials.unusable_by` is its twin."""

    def expired(self) -> CredentialQuerySet:
        return self.filter(expires_at__lte=timezone.now())

    def live(self) -> CredentialQuerySet:
        """Active and not expired."""
        return self.filter(is_active=True).exclude(expires_at__lte=timezone.now())

    def usable_by(self, user: Any) -> CredentialQuerySet:
        """Live credentials `user` owns or that are shared; every live one for PLATFORM."""
        if user is PLATFORM:
            return self.live()
        if not _signed_in(user):
            return self.none()
        return self.live().filter(Q(owner=user) | Q(owner__isnull=True))


class Provider(models.TextChoices):
    OPENAI = "openai", "OpenAI"
    LITELLM = "litellm", "LiteLLM Proxy"
    OPENROUTER = "openrouter", "OpenRouter"
    OTHER = "other", "Other OpenAI-compatible"


class APIKeyCredentials(models.Model):
    """An API key (encrypted at rest) and where to send it.

    `owner` empty means shared with every signed-in user. `base_url` empty means the
    global default of the purpose (OPENAI_BASE_URL, or OPENAI_INTERNAL_BASE_URL for
    embeddings). Changing `base_url` of a saved credential requires entering the key
    again (see `clean()`), so nobody can send a stored key to a host of their choosing.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    title = models.CharField(max_length=200)
    provider = models.CharField(max_length=20, choices=Provider.choices, default=Provider.LITELLM)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="api_key_credentials",
        help_text="Empty: shared with every signed-in user.",
    )
    # key_hint comes before api_key: assigning a key sets the hint, and fields are
    # initialised in this order.
    key_hint = models.CharField(max_length=4, blank=True, editable=False)
    api_key = EncryptedKeyField("API key", hint_field="key_hint")
    base_url = BaseURLField(
        "base URL",
        max_length=2048,
        blank=True,
        help_text="Usually a LiteLLM Proxy, e.g. http://litellm:4000/v1. "
        "Empty: the global default.",
    )
    fallback = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="fallback_for",
        help_text="Used when this credential's proxy is down.",
    )
    is_active = models.BooleanField("active", default=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = CredentialQuerySet.as_manager()

    # base_url as last loaded or saved: moving away from it needs the key again.
    _saved_base_url: str | None = None

    class Meta:
        ordering = ["title"]
        verbose_name = "API key credentials"
        verbose_name_plural = "API key credentials"

    def __str__(self) -> str:
        return self.title

    def save(self, *args: Any, **kwargs: Any) -> None:
        # An invariant, not only a form rule: no code path may re-point a stored key.
        if self.base_url_change_without_key():
            raise ValidationError({"base_url": BASE_URL_NEEDS_KEY})
        super().save(*args, **kwargs)
        self._saved_base_url = self.base_url

    @classmethod
    def from_db(cls, db: str | None, field_names: Any, values: Any) -> APIKeyCredentials:
        instance = super().from_db(db, field_names, values)
        instance._saved_base_url = instance.__dict__.get("base_url")
        return instance

    def refresh_from_db(self, *args: Any, **kwargs: Any) -> None:
        super().refresh_from_db(*args, **kwargs)
        self._saved_base_url = self.__dict__.get("base_url")

    @property
    def effective_base_url(self) -> str:
        """Where chat and code calls with this credential go: its own URL or the default."""
        return self.base_url or settings.OPENAI_BASE_URL

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    def unusable_by(self, user: Any) -> str | None:
        """Why `user` may not use this credential (None: they may); `usable_by`'s twin.

        "not_yours" comes first: someone else's credential is answered like a missing
        one, whatever its state.
        """
        if user is not PLATFORM and (not _signed_in(user) or self.owner_id not in (None, user.pk)):
            return "not_yours"
        if not self.is_active:
            return "inactive"
        if self.is_expired:
            return "expired"
        return None

    def base_url_change_without_key(self) -> bool:
        """Whether base_url moved away from its saved value while the stored key stayed."""
        if self._state.adding or self._saved_base_url is None:
            return False
        key_kept = isinstance(self.__dict__.get("api_key"), EncryptedSecret)
        return key_kept and self.base_url != self._saved_base_url

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self.base_url_change_without_key():
            errors["base_url"] = BASE_URL_NEEDS_KEY
        loop = self.fallback_loop()
        if loop:
            errors["fallback"] = f"This fallback would make a loop: {' → '.join(loop)}."
        if errors:
            raise ValidationError(errors)

    def fallback_loop(self) -> list[str]:
        """Titles along the fallback chain when it comes back to this credential."""
        chain = [self.title]
        seen = {self.pk}
        current = self.fallback
        while current is not None:
            chain.append(current.title)
            if current.pk in seen:
                return chain
            seen.add(current.pk)
            current = current.fallback
        return []
