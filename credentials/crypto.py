"""Encryption of API keys at rest: MultiFernet over CREDENTIALS_ENCRYPTION_KEYS.

The first key encrypts, every key decrypts. The keys are independent of SECRET_KEY,
so rotating one never makes the other's data unreadable.
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

WHAT_TO_DO = (
    "Put the key it was encrypted with back into CREDENTIALS_ENCRYPTION_KEYS "
    "(after the current one), or enter the API key again in the admin."
)


class DecryptionError(Exception):
    """A stored API key that none of the configured keys opens."""


def generate_key() -> str:
    return Fernet.generate_key().decode()


def key_problems(keys: list[str]) -> list[str]:
    """Sentences describing malformed keys, by position (never by value)."""
    problems = []
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            problems.append(
                f"Key number {position} in CREDENTIALS_ENCRYPTION_KEYS is not a Fernet key "
                "(44 characters of url-safe base64)."
            )
    return problems


@lru_cache(maxsize=4)
def _fernets(keys: tuple[str, ...]) -> tuple[Fernet, MultiFernet]:
    if not keys:
        raise ImproperlyConfigured(
            "CREDENTIALS_ENCRYPTION_KEYS is empty: API keys cannot be stored or read. "
            "Generate one with: python manage.py generate_encryption_key"
        )
    problems = key_problems(list(keys))
    if problems:
        raise ImproperlyConfigured(" ".join(problems))
    fernets = [Fernet(key) for key in keys]
    return fernets[0], MultiFernet(fernets)


def _configured() -> tuple[Fernet, MultiFernet]:
    return _fernets(tuple(settings.CREDENTIALS_ENCRYPTION_KEYS))


def encrypt(plaintext: str) -> str:
    return _configured()[1].encrypt(plaintext.encode()).decode()


def undecryptable(what: str) -> str:
    return f"{what} cannot be decrypted with any key in CREDENTIALS_ENCRYPTION_KEYS. {WHAT_TO_DO}"


def decrypt(token: str) -> str:
    """The plaintext of `token`; DecryptionError if no configured key opens it.

    Memoized per (configured keys, token): each call of a request would otherwise pay
    for a decryption, which costs 10-80 us next to the HTTP work (measured in
    bench/routing.py). The plaintexts held are the ones the cached clients hold anyway;
    changing the keys starts afresh, so a removed key opens nothing.
    """
    return _decrypt(tuple(settings.CREDENTIALS_ENCRYPTION_KEYS), token)


@lru_cache(maxsize=1024)
def _decrypt(keys: tuple[str, ...], token: str) -> str:
    try:
        return _fernets(keys)[1].decrypt(token.encode()).decode()
    except InvalidToken:
        raise DecryptionError(undecryptable("A stored API key")) from None


def is_current(token: str) -> bool:
    """Whether `token` is already encrypted under the first (current) key."""
    try:
        _configured()[0].decrypt(token.encode())
    except InvalidToken:
        return False
    return True


def rotate(token: str) -> str:
    """`token` re-encrypted under the first key; DecryptionError if no key opens it."""
    try:
        return _configured()[1].rotate(token.encode()).decode()
    except InvalidToken:
        raise DecryptionError("No key in CREDENTIALS_ENCRYPTION_KEYS opens this token.") from None
