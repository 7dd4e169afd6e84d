from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from credentials import crypto
from credentials.policy import site_base_url_problem

GLOBAL_BASE_URLS = ("OPENAI_BASE_URL", "OPENAI_INTERNAL_BASE_URL", "LLM_FAILOVER_BASE_URL")


def check_encryption_keys(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    keys = settings.CREDENTIALS_ENCRYPTION_KEYS
    if not keys:
        return [
            checks.Error(
                "CREDENTIALS_ENCRYPTION_KEYS is empty: API keys cannot be stored or read.",
                hint="Generate one with: python manage.py generate_encryption_key, "
                "and set CREDENTIALS_ENCRYPTION_KEYS=<that key> in .env or the environment.",
                id="credentials.E001",
            )
        ]
    return [
        checks.Error(
            problem,
            hint="Replace it with a key made by: python manage.py generate_encryption_key "
            "(keep the old keys while rotate_credential_keys has not run).",
            id="credentials.E002",
        )
        for problem in crypto.key_problems(keys)
    ]


def check_global_base_urls(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for name in GLOBAL_BASE_URLS:
        value = getattr(settings, name)
        problem = value and site_base_url_problem(value)
        if problem:
            errors.append(
                checks.Error(
                    f"{name} is refused by the base-URL policy. {problem}",
                    hint=f"Point {name} at your LiteLLM proxy or the provider's API.",
                    id="credentials.E003",
                )
            )
    return errors
