"""Parsing and validating what the JSON API and the playground receive.

Every problem becomes a field error with a sentence; nothing here touches the network.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_BODY_BYTES = 1024 * 1024
MAX_MESSAGES = 256
MAX_INPUTS = 2048
ROLES = ("system", "developer", "user", "assistant", "tool")


TOO_BIG = f"The request body is larger than {MAX_BODY_BYTES // 1024} KB."


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
        if len(model) > 200:
            self.add("model", "The model name is longer than 200 characters.")
        return model.strip()

    def credential(self) -> str | None:
        credential = self.data.get("credential")
        if credential is None or credential == "":
            return None
        if not isinstance(credential, str):
            self.add("credential", "Give the credential's id as a string, or null for the default.")
            return None
        return credential

    def number(self, name: str, low: float, high: float, *, integer: bool = False) -> None:
        if name not in self.data or self.data[name] is None:
            return
        value = self.data[name]
        kind = "a whole number" if integer else "a number"
        valid_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not valid_type or not math.isfinite(value):
            self.add(name, f"{name} must be {kind}.")
        elif not low <= value <= high:
            self.add(name, f"{name} must be between {low:g} and {high:g}.")

    def raise_if_any(self) -> None:
        if self.errors:
            raise InvalidRequest("The request has errors: see fields.", self.errors)


def parse_json(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest(TOO_BIG)
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


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
        elif message.get("role") not in ROLES:
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
