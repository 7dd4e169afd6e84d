from __future__ import annotations

from typing import Any

from django.apps import AppConfig


class LlmConfig(AppConfig):
    name = "llm"
    verbose_name = "LLM routing"

    def ready(self) -> None:
        from django.core import checks
        from django.core.signals import setting_changed
        from django.db.models.signals import post_delete, post_save

        from credentials.models import APIKeyCredentials
        from credentials.signals import credentials_rotated
        from llm import clients, prices
        from llm.checks import check_failover_route
        from llm.models import ModelPrice

        checks.register(check_failover_route)

        def evict_credential(sender: Any, instance: APIKeyCredentials, **kwargs: Any) -> None:
            clients.evict(instance.pk)

        def evict_rotated(sender: Any, pks: list[Any], **kwargs: Any) -> None:
            for pk in pks:
                clients.evict(pk)

        def evict_all(sender: Any, setting: str, **kwargs: Any) -> None:
            if setting.startswith(("LLM_", "OPENAI_", "CREDENTIALS_")):
                clients.evict()

        def prices_changed(sender: Any, **kwargs: Any) -> None:
            prices.changed()

        post_save.connect(prices_changed, sender=ModelPrice, weak=False)
        post_delete.connect(prices_changed, sender=ModelPrice, weak=False)
        post_save.connect(evict_credential, sender=APIKeyCredentials, weak=False)
        post_delete.connect(evict_credential, sender=APIKeyCredentials, weak=False)
        credentials_rotated.connect(evict_rotated, weak=False)
        setting_changed.connect(evict_all, weak=False)
