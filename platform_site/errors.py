"""Error reports that show no key and no secret setting, whatever DEBUG says.

Django's `SafeExceptionReporterFilter` hides sensitive POST fields and variables only
when DEBUG is false, and `make run` writes DEBUG=true: the debug page showed the key an
admin had just typed, and the SDK's frames show its `Authorization: Bearer ...` header.
The same reports go to ADMINS by e-mail. Here every part of a report is filtered always
(settings DEFAULT_EXCEPTION_REPORTER_FILTER and DEFAULT_EXCEPTION_REPORTER):

- settings, request headers (META) and cookies: by name (SECRET_NAMES), and any value
  that holds a URL password, a bearer token or a key-shaped string;
- POST and GET parameters: by name, whether or not the view declared them with
  `sensitive_post_parameters`, and by value;
- the variables of every frame: by name (`api_key`, `headers`' Authorization, `token`,
  ...), inside dicts, lists and tuples, and by what the value shows (its repr);
- the exception's message, the URL, and finally the whole page: every secret setting's
  value and every secret the request carried (the key just posted, whatever its
  shape) are replaced wherever they still appear.

Over-hiding costs a little debugging; under-hiding leaks a customer's key.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, QueryDict
from django.utils.datastructures import MultiValueDict
from django.utils.safestring import SafeString, mark_safe
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

SUBSTITUTE = SafeExceptionReporterFilter.cleansed_substitute

# Names (of settings, headers, cookies, parameters, dict keys, variables) whose values are
# secrets: Django's own list, and PLAINTEXT and DSN (a Sentry DSN holds its key).
SECRET_NAMES = re.compile(
    r"API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|PLAINTEXT|DSN", re.I
)
# Settings whose values are replaced wherever they appear on a page (names ending so).
_SECRET_SETTING = re.compile(r"(KEYS?|KEY_FALLBACKS|TOKENS?|SECRETS?|PASSWORD|PASS|SIGNATURE)$")
# Shorter strings are not replaced all over a page: they would hit ordinary words.
_SHORTEST_REPLACED = 8

# scheme://user:PASSWORD@host
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.\-]{0,30}://[^/\s:@'\"<>]*:)([^@\s/'\"<>]+)(@)", re.I)
# (clues, pattern, replacement): a pattern runs only on text holding one of its clues
# (lower case), which keeps a page with long values quick.
_SECRET_VALUES = [
    (("://",), _URL_PASSWORD, r"\1%s\3"),
    # Authorization: Bearer ..., Basic ...
    (
        ("bearer", "basic"),
        re.compile(r"\b(Bearer|Basic)(\s+)[A-Za-z0-9._~+/=\-]+", re.I),
        r"\1\2%s",
    ),
    # OpenAI, LiteLLM and Anthropic keys (sk-...), Google API keys.
    (("sk-", "aiza"), re.compile(r"\b(?:sk-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{30,})"), "%s"),
    # api_key=..., "token": "...", ('x-api-key', '...'), password='...'
    (
        ("key", "token", "secret", "passw", "authorization"),
        re.compile(
            r"((?:api[_-]?key|token|secret|password|passwd|authorization)"
            r"(?:['\"]?\s*[:=]|['\"]\s*,)\s*[bB]?['\"]?)([^'\"\s,;&)}\]<>]+)",
            re.I,
        ),
        r"\1%s",
    ),
]
# Django shows the first 4096 characters of a value: longer ones are cut before redaction.
_LONGEST_SHOWN = 20_000


def redact(text: str) -> str:
    """`text` with URL passwords, bearer tokens, key-shaped strings and key=value hidden."""
    text = str(text)  # a lazy string (some settings are) is not one for `re`
    lowered = text.lower()
    for clues, pattern, replacement in _SECRET_VALUES:
        if any(clue in lowered for clue in clues):
            text = pattern.sub(replacement % SUBSTITUTE, text)
    return text


class _Shown:
    """A value shown as the given text (its repr, already redacted)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _is_secret_name(name: object) -> bool:
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return isinstance(name, str) and bool(SECRET_NAMES.search(name))


class SecretsFilter(SafeExceptionReporterFilter):
    hidden_settings = SECRET_NAMES

    def is_active(self, request: HttpRequest | None) -> bool:
        """Always: DEBUG=true is exactly when the page is shown to a browser."""
        return True

    def cleanse_setting(self, key: int | str, value: Any) -> Any:
        # Also request.META and cookies. Django recurses into dicts, lists and tuples
        # through this method, so every string inside a setting comes by here.
        secret = _is_secret_name(key) or key == settings.SESSION_COOKIE_NAME
        if isinstance(value, str) and not secret:
            return redact(value)
        return super().cleanse_setting(key, value)

    def cleanse_parameters(self, parameters: MultiValueDict[str, Any]) -> QueryDict:
        """GET or POST: secret names hidden, every other value redacted."""
        cleansed = QueryDict(mutable=True)
        for name, values in parameters.lists():
            if _is_secret_name(name):
                cleansed.setlist(name, [SUBSTITUTE] * len(values))
            else:
                cleansed.setlist(name, [self.cleanse_value(value) for value in values])
        return cleansed

    def get_cleansed_multivaluedict(
        self, request: HttpRequest, multivaluedict: QueryDict
    ) -> QueryDict:
        super_cleansed = super().get_cleansed_multivaluedict(request, multivaluedict)
        return self.cleanse_parameters(super_cleansed)

    def get_post_parameters(self, request: HttpRequest | None) -> dict[str, Any]:
        if request is None:
            return {}
        # Django's first: it honours sensitive_post_parameters (then it is active).
        declared: Any = super().get_post_parameters(request)
        return self.cleanse_parameters(declared)

    def get_traceback_frame_variables(self, request: Any, tb_frame: Any) -> Any:
        variables = super().get_traceback_frame_variables(request, tb_frame)
        return {name: self.cleanse_variable(name, value) for name, value in variables}.items()

    def cleanse_variable(self, name: str, value: Any) -> Any:
        if isinstance(value, str) and value == SUBSTITUTE:
            return value
        # A number or None is never a key, and `max_tokens` is worth seeing.
        if _is_secret_name(name) and not isinstance(value, (int, float, type(None))):
            return SUBSTITUTE
        return self.cleanse_value(value)

    def cleanse_value(self, value: Any, depth: int = 0) -> Any:
        """What a value may show: by key inside containers, by its text otherwise."""
        if hasattr(value, "get_secret_value"):  # Secret, EncryptedSecret, SecretStr
            return _Shown(f"{type(value).__name__}({SUBSTITUTE!r})")
        if isinstance(value, str):
            hidden = redact(value[:_LONGEST_SHOWN])
            return value if hidden == value[:_LONGEST_SHOWN] else hidden
        if isinstance(value, bytes):
            text = value[:_LONGEST_SHOWN].decode("latin-1")
            hidden = redact(text)
            return value if hidden == text else hidden.encode("latin-1", "replace")
        if depth < 4 and type(value) in (dict, list, tuple) and len(value) <= 1000:
            return self._cleanse_container(value, depth + 1)
        try:
            shown = repr(value)[:_LONGEST_SHOWN]
        except Exception:  # Django shows its own message for a repr that fails
            return value
        hidden = redact(shown)
        return value if hidden == shown else _Shown(hidden)

    def _cleanse_container(self, value: Any, depth: int) -> Any:
        if isinstance(value, dict):
            return {
                key: SUBSTITUTE if _is_secret_name(key) else self.cleanse_value(item, depth)
                for key, item in value.items()
            }
        if isinstance(value, tuple) and len(value) == 2 and _is_secret_name(value[0]):
            return (value[0], SUBSTITUTE)  # a header as a (name, value) pair
        items = [self.cleanse_value(item, depth) for item in value]
        return tuple(items) if isinstance(value, tuple) else items


class SecretsReporter(ExceptionReporter):
    """Django's reporter, with the parts its filter does not see filtered too, and a
    last pass over the whole page."""

    filter: SecretsFilter

    def get_traceback_data(self) -> dict[str, Any]:
        data = super().get_traceback_data()
        for name in ("exception_value", "exception_notes", "unicode_hint"):
            if isinstance(data.get(name), str):
                data[name] = redact(data[name])
        if self.request is not None and isinstance(self.filter, SecretsFilter):
            data["request_GET_items"] = self.filter.cleanse_parameters(self.request.GET).items()
            data["request_insecure_uri"] = redact(str(data.get("request_insecure_uri", "")))
        return data

    def get_traceback_html(self) -> SafeString:
        return mark_safe(self.scrub(super().get_traceback_html(), escaped=True))  # noqa: S308

    def get_traceback_text(self) -> SafeString:
        return mark_safe(self.scrub(super().get_traceback_text(), escaped=False))  # noqa: S308

    def scrub(self, page: str, *, escaped: bool) -> str:
        """The last pass: known secrets, wherever they still appear, in every form a page
        shows a string (as is, HTML-escaped, inside a repr). Lone surrogates (text the
        request carried) are escaped, or the page could not be sent at all."""
        for secret in sorted(set(self.known_secrets()), key=len, reverse=True):
            forms = {secret, repr(secret)[1:-1]}
            if escaped:
                forms |= {html.escape(form) for form in list(forms)}
            for form in sorted(forms, key=len, reverse=True):
                page = page.replace(form, SUBSTITUTE)
        page = redact(page)
        return page.encode("utf-8", "backslashreplace").decode("utf-8")

    def known_secrets(self) -> Iterator[str]:
        """The secret settings' values, and the secrets this request carried."""
        for name in dir(settings):
            if name.isupper() and _SECRET_SETTING.search(name):
                yield from _strings(getattr(settings, name, None))
        for config in (*settings.DATABASES.values(), *settings.CACHES.values()):
            yield from _strings(config.get("PASSWORD"))
            for location in _strings(config.get("LOCATION")):
                yield from _url_passwords(location)
        request = self.request
        if request is None:
            return
        for parameters in (request.GET, request.POST, request.COOKIES):
            for name, values in _lists(parameters):
                if _is_secret_name(name) or name == settings.SESSION_COOKIE_NAME:
                    yield from _strings(values)
        declared = getattr(request, "sensitive_post_parameters", ())
        if declared and declared != "__ALL__":
            for name in declared:
                yield from _strings(request.POST.getlist(name))
        for name, value in request.META.items():
            if name.startswith("HTTP_") and _is_secret_name(name) and isinstance(value, str):
                # As sent, and without its scheme (Bearer ...).
                yield from _strings([value, value.partition(" ")[2]])


def _lists(parameters: Any) -> Iterator[tuple[str, list[Any]]]:
    if isinstance(parameters, MultiValueDict):
        yield from parameters.lists()
    else:
        yield from ((name, [value]) for name, value in parameters.items())


def _strings(value: Any) -> Iterator[str]:
    """The strings worth replacing in `value` (a string, or a list or tuple of them)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if isinstance(item, str) and len(item) >= _SHORTEST_REPLACED:
            yield str(item)  # a lazy string too


def _url_passwords(url: str) -> Iterator[str]:
    for match in _URL_PASSWORD.finditer(url):
        yield from _strings(match.group(2))
