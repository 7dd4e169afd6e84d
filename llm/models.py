from __future__ import annotations

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from credentials.models import Provider
from llm.routes import PURPOSES


class CostSource(models.TextChoices):
    HEADER = "header", "the upstream (x-litellm-response-cost or usage.cost)"
    PRICE_TABLE = "price_table", "the price table"
    NONE = "none", "none"


class UsageRecord(models.Model):
    """One call through llm.services, successful or not. Holds no key and no prompt.

    Usage outlives what it names, and nothing it names can make it unstorable:
    - `credential` and `serving_credential` keep the credential's id after it is
      deleted (no database constraint, DO_NOTHING), and `credential_title` and
      `serving_credential_title` keep its title as it was at the call. A record buffered
      for a credential an admin deletes before the flush is written all the same; the
      admin shows it as "Title (deleted)". Read the ids (`credential_id`), never
      `record.credential`, which raises for a deleted credential.
    - `user` has no database constraint either. Deleting a user empties the user of
      their records (SET_NULL, as before); the flush empties it too in records buffered
      for a user deleted before it (llm.usage.write), so a record for a deleted user is
      written without one instead of failing.
    """

    credential = models.ForeignKey(
        "credentials.APIKeyCredentials",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="usage_records",
    )
    # The credential whose account paid: the chosen one, or after a failover the
    # fallback that served (None for the global and LLM_FAILOVER_* routes).
    serving_credential = models.ForeignKey(
        "credentials.APIKeyCredentials",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="served_usage_records",
        verbose_name="served by",
    )
    # db_default: a worker still running the code of before (a rolling deploy) writes
    # records without these columns.
    credential_title = models.CharField(max_length=200, blank=True, default="", db_default="")
    serving_credential_title = models.CharField(
        "served by (title)", max_length=200, blank=True, default="", db_default=""
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        db_constraint=False,
        related_name="llm_usage_records",
    )
    purpose = models.CharField(max_length=20, choices=[(p, p) for p in PURPOSES])
    model = models.CharField(max_length=200, blank=True)
    route_source = models.CharField(max_length=20, blank=True)
    route_host = models.CharField(max_length=255, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True)
    cost_source = models.CharField(
        max_length=20,
        choices=CostSource.choices,
        default=CostSource.NONE,
        db_default=CostSource.NONE,
        help_text="Where the cost came from. None with tokens: the model has no price.",
    )
    latency_ms = models.FloatField(default=0)
    outcome = models.CharField(max_length=40, default="ok", help_text="ok, or the error's class")
    failed_over = models.BooleanField(
        default=False, help_text="Served by a fallback: the chosen route was down."
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["credential", "created_at"]),
            models.Index(fields=["serving_credential", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.purpose} {self.model} via {self.route_host or '?'}: {self.outcome}"


class ModelPrice(models.Model):
    """What a model costs, for calls whose answer carries no cost (llm.prices).

    `model` is a name or a pattern with `*`; an empty `provider` applies to every
    credential, a provider to that provider's credentials only (and wins over it).
    """

    model = models.CharField(
        max_length=200,
        help_text="A model name as the calls name it (gpt-4o-mini), or a pattern with * "
        "(gpt-4o*, anthropic/*).",
    )
    provider = models.CharField(
        max_length=20,
        choices=Provider.choices,
        blank=True,
        help_text="Only for credentials of this provider. Empty: any credential.",
    )
    input_usd_per_million = models.DecimalField(
        "input (USD per 1M tokens)",
        max_digits=14,
        decimal_places=6,
        validators=[MinValueValidator(0)],
    )
    output_usd_per_million = models.DecimalField(
        "output (USD per 1M tokens)",
        max_digits=14,
        decimal_places=6,
        validators=[MinValueValidator(0)],
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "provider"]
        verbose_name = "model price"
        constraints = [
            models.UniqueConstraint(fields=["model", "provider"], name="llm_one_price_per_model")
        ]

    def __str__(self) -> str:
        where = f" ({self.get_provider_display()})" if self.provider else ""
        return f"{self.model}{where}"


class PlaygroundChoice(models.Model):
    """What a user last chose in the playground, to offer it again."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="playground_choice"
    )
    credential = models.ForeignKey(
        "credentials.APIKeyCredentials", null=True, blank=True, on_delete=models.SET_NULL
    )
    purpose = models.CharField(max_length=20, default="chat")
    model = models.CharField(max_length=200, blank=True)

    def __str__(self) -> str:
        return f"{self.user}: {self.purpose} {self.model}"
