"""Parsing and validating what the JSON API and the playground receive.

Every problem becomes a field error with a sentence; nothing here touches the network.
What passes is safe to send and to record: a JSON object at most MAX_DEPTH levels deep,
with no text the SDK cannot encode (lone UTF-16 surrogates), no number too large to use,
and model names and credential ids without control or formatting characters (they end
up in usage records, headers and logs). Text a user writes (message content, prompts,
embeddings input) may hold any valid Unicode, NUL and other control characters included:
JSON carries them and the upstream decides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_BODY_BYTES = 1024 * 1024
MAX_MESSAGES = 256
MAX_INPUTS = 2048
# Nothing legitimate nests deeper (body > messages > message > content is 3 levels);
# deeper JSON makes Python's recursive encoders (the SDK's json.dumps) fail.
MAX_DEPTH = 32
# More digits than any count or limit this API takes; Python refuses to parse integers of
# more than 4,300 digits anyway, and huge ones overflow floats and database columns.
MAX_DIGITS = 20
TOO_MANY_DIGITS = 10**MAX_DIGITS
MAX_MODEL_LENGTH = 200
ROLES = ("system", "developer", "user", "assistant", "tool")
PURPOSES = ("chat", "code", "embeddings")
# At most this many problems of one field are named: a body may hold thousands.
MAX_SENTENCES = 10
# Values (array items and object members, at any depth) a body may hold: ten times what
# the largest legitimate request needs (MAX_INPUTS texts; MAX_MESSAGES messages of a few
# parts). The check below walks every value on the event loop, so this bounds its time
# (a megabyte of empty arrays is 350,000 values: 0.3 s unbounded, refused at once here).
MAX_VALUES = 20_000


TOO_BIG = f"The request body is larger than {MAX_BODY_BYTES // 1024} KB."
TOO_DEEP = (
    f"The request body is nested too deeply: at most {MAX_DEPTH} levels of arrays and "
    "objects are accepted."
)
NOT_JSON = "The request body is not valid JSON: send a JSON object as UTF-8."
NOT_A_NUMBER = (
    "The request body is not valid JSON: NaN, Infinity and -Infinity are not JSON numbers."
)
NOT_AN_OBJECT = "The request body must be a JSON object."
TOO_MANY_VALUES = (
    f"The request body holds too many values: at most {MAX_VALUES:,} array items and "
    "object members in all are accepted."
)
CONTROL_CHARACTERS = (
    "no control or formatting characters (such as NUL, a line break or a direction mark)"
)


class InvalidRequest(Exception):
    def __init__(self, message: str, fields: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or {}


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    credential: str | None = None
    stream: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EmbeddingsRequest:
    model: str
    texts: list[str]
    credential: str | None = None


@dataclass
class PlaygroundRequest:
    """What the playground's Send posts: a purpose, a prompt and the call's fields."""

    purpose: str
    prompt: str
    chat: ChatRequest | None = None  # purposes chat and code
    embeddings: EmbeddingsRequest | None = None  # purpose embeddings


# ---- the body ----------------------------------------------------------------------------


class _TooLarge:
    """An integer of more digits than Python parses, kept (not raised) so that the field
    holding it can be named."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _integer(text: str) -> int | _TooLarge:
    if len(text.lstrip("-")) > MAX_DIGITS:
        return _TooLarge(text)
    return int(text)


def _constant(name: str) -> Any:
    raise InvalidRequest(NOT_A_NUMBER)


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body or b"null", parse_constant=_constant)
    except ValueError as error:
        if "integer string conversion" not in str(error):
            raise
    # An integer of thousands of digits: read again, keeping such numbers to name their
    # field (only then: a hook called for every number costs a megabyte of them dearly).
    return json.loads(body, parse_int=_integer, parse_constant=_constant)


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object that is safe to validate and to send (see the module)."""
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(TOO_BIG)
    try:
        data = _loads(body)
    except RecursionError:
        # Python's parser gives up on nesting a few hundred levels deep; the checks below
        # refuse what it parses beyond MAX_DEPTH.
        raise InvalidRequest(TOO_DEEP) from None
    except ValueError:  # UnicodeDecodeError included
        raise InvalidRequest(NOT_JSON) from None
    problems = _problems(data)
    if not isinstance(data, dict):
        raise InvalidRequest(NOT_AN_OBJECT)
    if problems:
        raise InvalidRequest("The request has errors: see fields.", problems)
    return data


def _problems(data: Any) -> dict[str, list[str]]:
    """Text that cannot be sent and numbers too large, by top-level field; raises when
    `data` nests deeper than MAX_DEPTH or holds more than MAX_VALUES values. Iterative
    (nesting never costs the stack), and a path is only spelled out for a problem."""
    problems: dict[str, list[str]] = {}
    if not isinstance(data, dict | list):
        return problems
    # Containers to read: (container, its depth, its top-level field, its path).
    stack: list[tuple[Any, int, str, tuple[str | int, ...]]] = [(data, 1, "", ())]
    values = 0
    while stack:
        container, depth, name, path = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(TOO_DEEP)
        values += len(container)
        if values > MAX_VALUES:
            raise InvalidRequest(TOO_MANY_VALUES)
        inner: list[tuple[Any, int, str, tuple[str | int, ...]]] = []
        items: Iterable[tuple[str | int, Any]]
        if isinstance(container, dict):
            items = container.items()
            for key in container:
                if code := lone_surrogate(key):
                    where = f'The field name "{shown_text(key)}"'
                    where += f" in {_spelled(path)}" if path else ""
                    _add(problems, name or key, f"{where} {_unsendable(code)}")
        else:
            items = enumerate(container)
        for key, item in items:
            field = name or (key if isinstance(key, str) else "")
            kind = type(item)
            if kind is str:
                if code := lone_surrogate(item):
                    spelled = _spelled((*path, key))
                    _add(problems, field, f"The value of {spelled} {_unsendable(code)}")
            elif kind is dict or kind is list:
                inner.append((item, depth + 1, field, (*path, key)))
            elif (
                (kind is int and not -TOO_MANY_DIGITS < item < TOO_MANY_DIGITS)
                or (kind is float and not math.isfinite(item))
                or kind is _TooLarge
            ):
                spelled = _spelled((*path, key))
                _add(problems, field, f"The value of {spelled} is a number too large to use.")
        # Reversed: popped in document order, so problems are named in that order.
        stack.extend(reversed(inner))
    return problems


def _spelled(path: tuple[str | int, ...]) -> str:
    """A value's place in the body, as in messages[0].content."""
    spelled = ""
    for part in path:
        if isinstance(part, int):
            spelled += f"[{part}]"
        else:
            spelled += f".{shown_text(part)}" if spelled else shown_text(part)
    return spelled or "the body"


def _add(problems: dict[str, list[str]], name: str, sentence: str) -> None:
    sentences = problems.setdefault(name, [])
    if len(sentences) < MAX_SENTENCES:
        sentences.append(sentence)


def _unsendable(code: str) -> str:
    return f"contains a lone UTF-16 surrogate ({code}), which cannot be sent; send valid Unicode."


def lone_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in `text`, escaped ("\\ud800"); None if none.

    JSON's "\\ud800" escapes (and raw bytes the JSON decoder passes through) decode into
    such code points, which UTF-8 cannot encode: the SDK would fail to send them, and
    PostgreSQL to store them."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"\\u{ord(text[error.start]):04x}"
    return None


def shown_text(text: str, limit: int = 40) -> str:
    """`text` as a sentence may show it: lone surrogates escaped, clipped."""
    return _clip(text.encode("utf-8", "backslashreplace").decode(), limit)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


# ---- fields ------------------------------------------------------------------------------


def credential_problem(credential: Any) -> str | None:
    """Why `credential` is not a credential id to look up (None: look it up; an id that
    names no credential the user may use is a 404, not this)."""
    if not isinstance(credential, str):
        return "Give the credential's id as a string, or null for the default."
    if not credential.isprintable():
        return f"The credential id may hold {CONTROL_CHARACTERS}."
    return None


def credential_from_query(value: str | None) -> str | None:
    """A credential id from a query string: None for the default; 400 if unusable."""
    if value is None or value == "":
        return None
    if problem := credential_problem(value):
        raise InvalidRequest("The request has errors: see fields.", {"credential": [problem]})
    return value


class _Fields:
    """Collects field errors while reading a JSON object."""

    def __init__(self, data: dict[str, Any], allowed: set[str]) -> None:
        self.data = data
        self.errors: dict[str, list[str]] = {}
        for name in sorted(set(data) - allowed):
            self.add(name, f"Unknown field: use only {', '.join(sorted(allowed))}.")

    def add(self, name: str, message: str) -> None:
        self.errors.setdefault(name, []).append(message)

    def model(self) -> str:
        model = self.data.get("model")
        if not isinstance(model, str) or not model.strip():
            self.add("model", 'Name the model as a non-empty string, e.g. "gpt-4o-mini".')
            return ""
        model = model.strip()
        if len(model) > MAX_MODEL_LENGTH:
            self.add("model", f"The model name is longer than {MAX_MODEL_LENGTH} characters.")
        elif not model.isprintable():
            self.add("model", f"The model name may hold {CONTROL_CHARACTERS}.")
        return model

    def credential(self) -> str | None:
        credential = self.data.get("credential")
        if credential is None or credential == "":
            return None
        if problem := credential_problem(credential):
            self.add("credential", problem)
            return None
        return str(credential)

    def number(self, name: str, low: float, high: float, *, integer: bool = False) -> None:
        if name not in self.data or self.data[name] is None:
            return
        value = self.data[name]
        kind = "a whole number" if integer else "a number"
        valid_type = isinstance(value, int) if integer else isinstance(value, int | float)
        # (math.isfinite of a huge int overflows: only floats are asked.)
        infinite = isinstance(value, float) and not math.isfinite(value)
        if isinstance(value, bool) or not valid_type or infinite:
            self.add(name, f"{name} must be {kind}.")
        elif not low <= value <= high:
            self.add(name, f"{name} must be between {low:g} and {high:g}.")

    def raise_if_any(self) -> None:
        if self.errors:
            raise InvalidRequest("The request has errors: see fields.", self.errors)


def _messages(fields: _Fields) -> list[dict[str, Any]]:
    messages = fields.data.get("messages")
    if not isinstance(messages, list) or not messages:
        fields.add("messages", 'Give at least one message: [{"role": "user", "content": "..."}].')
        return []
    if len(messages) > MAX_MESSAGES:
        fields.add("messages", f"At most {MAX_MESSAGES} messages are accepted.")
        return []
    valid = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            fields.add("messages", f"Message {number} must be an object with role and content.")
        elif not isinstance(message.get("role"), str) or message["role"] not in ROLES:
            fields.add("messages", f"Message {number} needs a role: one of {', '.join(ROLES)}.")
        elif not isinstance(message.get("content"), str):
            fields.add("messages", f"Message {number} needs its content as a string.")
        else:
            valid.append({"role": message["role"], "content": message["content"]})
    return valid


def chat_request(data: dict[str, Any]) -> ChatRequest:
    fields = _Fields(
        data, {"credential", "model", "messages", "temperature", "max_tokens", "stream"}
    )
    model, credential, messages = fields.model(), fields.credential(), _messages(fields)
    fields.number("temperature", 0, 2)
    fields.number("max_tokens", 1, 1_000_000, integer=True)
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        fields.add("stream", "stream must be true or false.")
    fields.raise_if_any()
    options = {
        name: data[name] for name in ("temperature", "max_tokens") if data.get(name) is not None
    }
    return ChatRequest(
        model=model, messages=messages, credential=credential, stream=stream, options=options
    )


def embeddings_request(data: dict[str, Any]) -> EmbeddingsRequest:
    fields = _Fields(data, {"credential", "model", "input"})
    model, credential = fields.model(), fields.credential()
    texts = data.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        fields.add("input", "Give the input as a string or a non-empty list of strings.")
        texts = []
    elif len(texts) > MAX_INPUTS:
        fields.add("input", f"At most {MAX_INPUTS} inputs are accepted.")
    fields.raise_if_any()
    return EmbeddingsRequest(model=model, texts=texts, credential=credential)


def playground_request(data: dict[str, Any]) -> PlaygroundRequest:
    """The playground's Send: `purpose` and `prompt`, then the fields of its call."""
    data = dict(data)
    purpose = data.pop("purpose", "chat")
    prompt = data.pop("prompt", "")
    if not isinstance(purpose, str) or purpose not in PURPOSES:
        raise InvalidRequest("Choose a purpose.", {"purpose": ["Use chat, code or embeddings."]})
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("Write a prompt first.", {"prompt": ["Write a prompt first."]})
    if purpose == "embeddings":
        embeddings = embeddings_request({**data, "input": prompt})
        return PlaygroundRequest(purpose, prompt, embeddings=embeddings)
    chat = chat_request({**data, "messages": [{"role": "user", "content": prompt}]})
    return PlaygroundRequest(purpose, prompt, chat=chat)
