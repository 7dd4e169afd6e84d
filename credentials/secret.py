"""A string that does not show itself.

The plaintext comes out through one named method, so a leak is a visible call in the
code, not an accident of `str()`, `repr()`, logging or a template.
"""

from __future__ import annotations

from typing import NoReturn

MASK = "********"


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{MASK}')"

    def __str__(self) -> str:
        return MASK

    def __bool__(self) -> bool:
        return bool(self.get_secret_value())

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: object) -> Secret:
        return self

    def __reduce__(self) -> NoReturn:
        # Pickling would write the plaintext into a cache, a session or a queue.
        raise TypeError(f"A {type(self).__name__} cannot be pickled.")


def hint_for(plaintext: str) -> str:
    """The last four characters of a key, for display; nothing for short keys."""
    return plaintext[-4:] if len(plaintext) >= 12 else ""
