from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable, Collection, Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models, router, transaction
from django.db.models import Q
from django.utils import timezone

from credentials.fields import BaseURLField, EncryptedKeyField, ModelListField, is_new_key
from credentials.policy import normalize_base_url, validate_base_url

BASE_URL_NEEDS_KEY = (
    "The API key is bound to its base URL: enter the key again to send it to a new address."
)
BASE_URL_IN_BULK = (
    "The base URL cannot be changed in bulk (update(), bulk_update() or an upsert): the "
    "API key is bound to it. Save each credential instead, with its key entered again: "
    "credential.base_url = ...; credential.api_key = ...; credential.save()."
)


@functools.lru_cache(maxsize=1024)
def model_matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """A test of a model name against names and `*` patterns (`*`: any characters,
    `/` included; everything else literal, case included, as LiteLLM compares names)."""
    exact = frozenset(p for p in patterns if "*" not in p)
    wild = [p for p in patterns if "*" in p]
    if not wild:
        return exact.__contains__
    regex = re.compile("|".join(".*".join(map(re.escape, p.split("*"))) for p in wild))
    return lambda model: model in exact or regex.fullmatch(model) is not None


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

    # ---- bulk writes: no bulk path may move a stored key or skip the policy ----------

    def update(self, **kwargs: Any) -> int:
        if "base_url" in kwargs:
            raise ValidationError({"base_url": BASE_URL_IN_BULK})
        return super().update(**kwargs)

    def bulk_update(
        self,
        objs: Iterable[APIKeyCredentials],
        fields: Iterable[str],
        batch_size: int | None = None,
    ) -> int:
        fields = list(fields)
        if "base_url" in fields:
            raise ValidationError({"base_url": BASE_URL_IN_BULK})
        return super().bulk_update(objs, fields, batch_size)

    def bulk_create(
        self,
        objs: Iterable[APIKeyCredentials],
        batch_size: int | None = None,
        ignore_conflicts: bool = False,
        update_conflicts: bool = False,
        update_fields: Collection[str] | None = None,
        unique_fields: Collection[str] | None = None,
    ) -> list[APIKeyCredentials]:
        if update_conflicts and update_fields and "base_url" in update_fields:
            raise ValidationError({"base_url": BASE_URL_IN_BULK})
        objs = list(objs)
        for credential in objs:
            credential.check_base_url_policy()
        return super().bulk_create(
            objs,
            batch_size=batch_size,
            ignore_conflicts=ignore_conflicts,
            update_conflicts=update_conflicts,
            update_fields=update_fields,
            unique_fields=unique_fields,
        )

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
    again (`save()` checks it against the stored row; `clean()` says so on the form),
    so nobody can send a stored key to a host of their choosing; bulk writes of
    `base_url` are refused (CredentialQuerySet).
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
    allowed_models = ModelListField(
        "allowed models",
        blank=True,
        help_text="The models this credential may use: exact names, or patterns with * "
        "(gpt-4o*, openai/*). Empty: any model.",
    )
    # Spend and rate limits: empty means no limit. Budgets are per calendar month (UTC).
    monthly_budget_usd = models.DecimalField(
        "monthly budget (USD)",
        max_digits=14,
        decimal_places=8,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="What calls with this credential may cost per calendar month (UTC), "
        "all users together. Empty: no budget.",
    )
    user_monthly_budget_usd = models.DecimalField(
        "monthly cap per user (USD)",
        max_digits=14,
        decimal_places=8,
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="What each user may spend with this credential per calendar month (UTC). "
        "Empty: no cap per user.",
    )
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="All users together. Empty: no limit."
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="All users together. Empty: no limit."
    )
    user_requests_per_minute = models.PositiveIntegerField(
        "requests per minute per user", null=True, blank=True, help_text="Empty: no limit."
    )
    user_tokens_per_minute = models.PositiveIntegerField(
        "tokens per minute per user", null=True, blank=True, help_text="Empty: no limit."
    )
    is_active = models.BooleanField("active", default=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = CredentialQuerySet.as_manager()

    class Meta:
        ordering = ["title"]
        verbose_name = "API key credentials"
        verbose_name_plural = "API key credentials"
        # Every manager, related ones and _base_manager included, refuses bulk writes
        # of the base URL (CredentialQuerySet).
        base_manager_name = "objects"
        permissions = [
            ("test_apikeycredentials", "Can test the connection of API key credentials"),
        ]

    def __str__(self) -> str:
        return self.title

    def save(
        self,
        *,
        force_insert: bool | tuple[models.base.ModelBase, ...] = False,
        force_update: bool = False,
        using: str | None = None,
        update_fields: Iterable[str] | None = None,
    ) -> None:
        """Save, refusing a base URL the policy refuses and a stored key sent elsewhere.

        An invariant, not only a form rule: whatever the instance knows or believes
        (loaded with only() or defer(), refreshed in part, stale), the base URL is
        compared with the row as stored, locked in the same transaction as the write.
        A save that does not write the base URL costs nothing more.

        The key (and its hint) are written only when a new key was entered: the token an
        instance loaded may have been re-encrypted by rotate_credential_keys, or replaced
        by another admin, since; writing it back would undo that.
        """
        fields = None if update_fields is None else list(update_fields)
        existing = (not self._state.adding or force_update) and not force_insert
        if existing and fields is None and not is_new_key(self.__dict__.get("api_key")):
            fields = self._loaded_fields(exclude={"api_key", "key_hint"})
        kwargs: dict[str, Any] = {
            "force_insert": force_insert,
            "force_update": force_update,
            "using": using,
            "update_fields": fields,
        }
        if not self._writes("base_url", fields):
            super().save(**kwargs)
            return
        self.check_base_url_policy()
        if not existing:
            super().save(**kwargs)  # a new row: there is no stored key to move
            return
        key_written = self._writes("api_key", fields)
        using = using or router.db_for_write(type(self), instance=self)
        # The refusal is raised outside the block: raised inside, it would spoil a
        # caller's transaction even though nothing was written.
        with transaction.atomic(using=using, savepoint=False):
            stored = self.stored_base_url(using=using, lock=True)
            refused = self.moves_key(stored, key_written=key_written)
            if not refused:
                super().save(**kwargs)
        if refused:
            raise ValidationError({"base_url": BASE_URL_NEEDS_KEY})

    def _loaded_fields(self, *, exclude: set[str]) -> list[str]:
        """The fields a save of this instance writes (the loaded ones, as Django picks
        them for a deferred instance), but those in `exclude`."""
        return [
            field.attname
            for field in self._meta.concrete_fields
            if not field.primary_key
            and field.attname in self.__dict__
            and field.name not in exclude
        ]

    def _writes(self, name: str, update_fields: list[str] | None) -> bool:
        """Whether a save with `update_fields` writes the field `name`. A deferred field
        is not written: Django saves only the loaded ones."""
        if update_fields is not None:
            return name in update_fields
        return self._state.adding or name in self.__dict__

    def check_base_url_policy(self) -> None:
        """The base-URL policy (credentials.policy), as the model's own error."""
        if not self.base_url:
            return  # the global default, checked where it is configured
        try:
            validate_base_url(self.base_url)
        except ValidationError as error:
            raise ValidationError({"base_url": error.messages}) from None

    def stored_base_url(self, *, using: str | None = None, lock: bool = False) -> str | None:
        """The base URL of this credential's row as stored now; None: no row yet."""
        if self.pk is None:
            return None
        rows = type(self)._base_manager.using(
            using or router.db_for_read(type(self), instance=self)
        )
        if lock:
            rows = rows.select_for_update()
        return rows.filter(pk=self.pk).values_list("base_url", flat=True).first()

    def moves_key(self, stored: str | None, *, key_written: bool = True) -> bool:
        """Whether saving would send the stored key to a base URL other than `stored`:
        the base URL differs and no new key is entered (and written) with it."""
        if stored is None:
            return False
        if normalize_base_url(self.base_url) == normalize_base_url(stored):
            return False
        return not (key_written and is_new_key(self.__dict__.get("api_key")))

    def allows_model(self, model: str) -> bool:
        """Whether `model` is on the allow-list (an empty list allows any model)."""
        return not self.allowed_models or model_matcher(tuple(self.allowed_models))(model)

    @property
    def has_budget(self) -> bool:
        return self.monthly_budget_usd is not None or self.user_monthly_budget_usd is not None

    @property
    def has_limits(self) -> bool:
        """Whether a call with this credential is checked against a budget or a rate."""
        return self.has_budget or any(
            limit is not None
            for limit in (
                self.requests_per_minute,
                self.tokens_per_minute,
                self.user_requests_per_minute,
                self.user_tokens_per_minute,
            )
        )

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

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if not self._state.adding and self.moves_key(self.stored_base_url()):
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
