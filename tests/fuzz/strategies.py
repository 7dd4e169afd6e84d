"""What a hostile or clumsy client sends, as hypothesis strategies.

Text comes with lone surrogates, NUL, bidi marks and BOMs mixed in; JSON values nest and
carry NaN and infinities; raw bodies are bytes that JSON, UTF-8 or the content type do
not promise; deep nesting and huge numbers are built as text, since Python's json module
cannot write them. Most bodies are a valid request with one or two parts spoiled (a
field, a message, a leaf deep inside), so that the garbage reaches the code past the
first check; the others have any shape at all.

Only what a server lets through is sent: a request line of visible ASCII (other bytes
percent-encoded) no longer than uvicorn's 16 KB, header values without CR, LF or NUL.
Placeholders (`MINE`, `SHARED`...) stand for ids the fixtures create; the tests swap
them in (`Site.resolve`).
"""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any
from urllib.parse import quote, urlencode

from hypothesis import strategies as st

from llm.requests import MAX_BODY_BYTES, ROLES

MODEL = "gpt-test-mini"
HELLO = [{"role": "user", "content": "hello there"}]

# Ids of the fixtures' credentials, of users (alice, the admin), and the loopback
# upstream's base URL, swapped in by the tests.
MINE, SHARED, BOBS, INACTIVE = "@mine", "@shared", "@bobs", "@inactive"
PLACEHOLDERS = (MINE, SHARED, BOBS, INACTIVE)
ALICE, ADMIN, UPSTREAM = "@alice", "@admin", "@upstream"

SPECIALS = [
    "\x00",
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "\u200f",  # RIGHT-TO-LEFT MARK
    "\u2066",  # LEFT-TO-RIGHT ISOLATE
    "\ufeff",  # BOM
    "\u200b",  # ZERO WIDTH SPACE
    "\ud800",  # lone surrogates
    "\udfff",
    "\ud83d",
    "\U0001f600",
    "\U0010ffff",
    "\uffff",
    "\x7f",
    "\x85",
    "\u2028",
    "\r\n",
    "\t",
    "%00",
    "%ff",
    "'",
    '"',
    "\\",
    "<script>alert(1)</script>",
    "{{7*7}}",
    "../",
    "é",
    " ",
]

# Every code point, surrogates (category Cs) included.
any_char = st.characters(exclude_categories=())
# Control, format, surrogate, private and unassigned code points.
odd_char = st.characters(categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"])
texts = st.one_of(
    st.text(any_char, max_size=30),
    st.text(odd_char, min_size=1, max_size=5),
    st.lists(st.one_of(st.sampled_from(SPECIALS), st.text(any_char, max_size=3)), max_size=6).map(
        "".join
    ),
)
# Around and beyond the body limit (1 MB), in characters of 1, 2 and 3 bytes in UTF-8
# (6 as JSON escapes).
HUGE_SIZES = [MAX_BODY_BYTES // 2, MAX_BODY_BYTES - 100, MAX_BODY_BYTES + 1, 2 * MAX_BODY_BYTES]
huge_texts = st.builds(
    lambda size, char: char * size,
    st.sampled_from(HUGE_SIZES),
    st.sampled_from(["x", "é", "\u202e", "\x00"]),
)

numbers = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -0.0, 1, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 1e308, 5e-324]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)
    ),
    max_leaves=12,
)
MISSING = object()
# What replaces a part of a valid body (huge text once in eight: it is slow to send).
spoilers = st.one_of(
    *[texts] * 2,
    st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=3).map("".join),
    *[json_values] * 3,
    st.just(MISSING),
    huge_texts,
)


def either(*choices: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One of `choices`, or a value of any JSON type (every wrong type for the field)."""
    return st.one_of(*choices, json_values)


credential_refs = either(
    st.none(),
    st.sampled_from(PLACEHOLDERS),
    st.uuids().map(str),
    st.sampled_from(["", " ", "0", "null", "00000000-0000-0000-0000-000000000000"]),
    texts,
)

# ---- valid bodies, spoiled ---------------------------------------------------------------

VALID_BODIES: dict[str, dict[str, Any]] = {
    "/api/llm/chat": {"model": MODEL, "messages": HELLO},
    "/api/llm/embeddings": {"model": "embed-test", "input": "hello there"},
    "/llm/send": {"purpose": "chat", "prompt": "hello there", "model": MODEL},
}
# Optional fields a valid body may carry, with a valid value.
OPTIONAL_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/api/llm/chat": {
        "credential": st.sampled_from([None, MINE, SHARED]),
        "temperature": st.floats(0, 2),
        "max_tokens": st.integers(1, 1_000_000),
        "stream": st.booleans(),
    },
    "/api/llm/embeddings": {
        "credential": st.sampled_from([None, MINE, SHARED]),
        "input": st.lists(st.sampled_from(["a", "b c"]), min_size=1, max_size=3),
    },
    "/llm/send": {
        "credential": st.sampled_from([None, MINE, SHARED]),
        "purpose": st.sampled_from(["chat", "code", "embeddings"]),
        "temperature": st.floats(0, 2),
        "max_tokens": st.integers(1, 1_000_000),
    },
}


def _places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a JSON value (paths of keys and indexes), the value included."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _places(item, (*path, key))
        found.append((*path, "unknown"))  # a field that is not there
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _places(item, (*path, index))
    return found


def _spoil(body: Any, path: tuple[Any, ...], spoiler: Any) -> Any:
    """`body` with the value at `path` replaced by `spoiler` (or removed: MISSING)."""
    if not path:
        return {} if spoiler is MISSING else spoiler
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    if spoiler is MISSING:
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent.pop(path[-1])
    else:
        parent[path[-1]] = spoiler
    return body


# Valid, if odd, replacements: text any JSON can carry (no lone surrogates: NUL, bidi
# marks, emoji, long), numbers and booleans of the kind the field takes.
odd_texts = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30),
    st.lists(
        st.sampled_from([c for c in SPECIALS if not any("\ud800" <= x <= "\udfff" for x in c)]),
        min_size=1,
        max_size=4,
    ).map(lambda parts: "hi " + "".join(parts)),
    st.builds(lambda size: "word " * size, st.sampled_from([1_000, 50_000])),
)


# Model names, credential ids and the like: printable text (no control or format
# characters, which such fields refuse), any script, up to the 200 characters allowed.
names = st.text(
    st.characters(exclude_categories=["Cs", "Cc", "Cf", "Zl", "Zp"]), min_size=1, max_size=200
).filter(str.strip)
PLAUSIBLE_BY_KEY: dict[Any, st.SearchStrategy[Any]] = {
    "role": st.sampled_from(ROLES),
    "purpose": st.sampled_from(["chat", "code", "embeddings"]),
    "model": st.one_of(names, st.sampled_from(["gpt-test-mini:latest", "openai/gpt-4o", "模型"])),
    "credential": st.sampled_from([None, "", MINE, SHARED, BOBS, INACTIVE]),
}


def plausible(value: Any, key: Any = None) -> st.SearchStrategy[Any]:
    """A replacement of the kind `value` (at `key`) is, which validation may accept."""
    if key in PLAUSIBLE_BY_KEY:
        return PLAUSIBLE_BY_KEY[key]
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.sampled_from([1, 2, 999_999, 1_000_000, 1_000_001, 0, -1])
    if isinstance(value, float):
        return st.sampled_from([0.0, -0.0, 2.0, 1e-300, 2.0000001, 5e-324])
    if isinstance(value, str):
        return odd_texts
    return st.nothing()


@st.composite
def spoiled(draw: st.DrawFn, path: str) -> Any:
    """The endpoint's valid body (with some optional fields) with one or two parts
    spoiled: replaced by a value of the same kind (odd text, a boundary number), text of
    any kind, a value of any type, huge text, or removed."""
    body = copy.deepcopy(VALID_BODIES[path])
    for name, valid in OPTIONAL_FIELDS[path].items():
        if draw(st.booleans()):
            body[name] = draw(valid)
    if path == "/api/llm/chat" and draw(st.booleans()):
        body["messages"] = [
            {"role": draw(st.sampled_from(ROLES)), "content": "hello"}
            for _ in range(draw(st.integers(1, 3)))
        ]
    for _ in range(draw(st.sampled_from([1, 1, 2]))):
        place = draw(st.sampled_from(_places(body)[1:]))  # not the body itself: see shaped
        current = None
        with contextlib.suppress(KeyError, IndexError, TypeError):  # the first spoil moved it
            current = _at(body, place)
        spoiler = draw(st.one_of(plausible(current, place[-1]), spoilers))
        with contextlib.suppress(KeyError, IndexError, TypeError):  # the first spoil moved it
            body = _spoil(body, place, spoiler)
    return body


SALT = ["\ud800", "\udfff", "\udc80\ud800", "\x00", "\u202e", "\ufeff", "\U0001f600", "\x1b[31m"]


@st.composite
def salted(draw: st.DrawFn, path: str) -> Any:
    """The endpoint's valid body with a lone surrogate, NUL, a bidi mark, a BOM, an
    emoji or an escape sequence put into one of its strings (a value or a field name)."""
    body = copy.deepcopy(VALID_BODIES[path])
    for name, valid in OPTIONAL_FIELDS[path].items():
        if draw(st.booleans()):
            body[name] = draw(valid)
    strings = [
        place
        for place in _places(body)[1:]
        if place[-1] != "unknown" and isinstance(_at(body, place), str)
    ]
    place = draw(st.sampled_from(strings))
    text = _at(body, place)
    at = draw(st.integers(0, len(text)))
    salt = draw(st.sampled_from(SALT))
    if draw(st.booleans()):  # the field's name instead of its value
        parent = _at(body, place[:-1])
        if isinstance(parent, dict):
            parent[place[-1] + salt] = parent.pop(place[-1])
            return body
    return _spoil(body, place, text[:at] + salt + text[at:])


def _at(body: Any, place: tuple[Any, ...]) -> Any:
    for step in place:
        body = body[step]
    return body


def shaped(path: str) -> st.SearchStrategy[Any]:
    """Bodies of an endpoint: a spoiled valid one (mostly), or any JSON object."""
    any_object = st.dictionaries(
        st.sampled_from([*VALID_BODIES[path], *OPTIONAL_FIELDS[path]]) | texts,
        json_values,
        max_size=5,
    )
    return st.one_of(spoiled(path), spoiled(path), spoiled(path), any_object)


# ---- raw bodies ------------------------------------------------------------------------


def with_slot(path: str, slot: str | None, raw: str) -> str:
    """The endpoint's valid body with `raw` (JSON text, maybe invalid) as field `slot`."""
    if slot is None:
        return raw
    fields = {k: v for k, v in VALID_BODIES[path].items() if k != slot}
    head = json.dumps(fields)[:-1]
    return f'{head}, "{slot}": {raw}}}'


SLOTS = [None, "model", "messages", "credential", "temperature", "max_tokens", "stream"]
SLOTS += ["input", "prompt", "purpose", "unknown"]


@st.composite
def nested(draw: st.DrawFn) -> str:
    """JSON nested 1 to 5,000 levels deep, as text (closed or not)."""
    depth = draw(st.one_of(st.integers(1, 5000), st.sampled_from([31, 32, 33, 990, 1010, 5000])))
    kind = draw(st.sampled_from(["list", "object", "mixed", "message"]))
    opener, closer = {
        "list": ("[", "]"),
        "object": ('{"a": ', "}"),
        "mixed": ('[{"a": ', "}]"),
        "message": ('[{"role": "user", "content": ', "}]"),
    }[kind]
    inner = draw(st.sampled_from(['"hi"', "1", "null", "[]", "{}"]))
    closed = draw(st.booleans())
    return opener * depth + inner + (closer * depth if closed else "")


literals = st.one_of(
    st.integers(1, 6000).map(lambda digits: "9" * digits),
    st.integers(1, 6000).map(lambda digits: "-1" + "0" * digits),
    st.integers(300, 5000).map(lambda digits: "0." + "0" * digits + "1"),
    st.integers(300, 5000).map(lambda digits: "1" + "0" * digits + ".5e-3"),
    st.sampled_from(
        [
            "1e999",
            "-1e999",
            "1E400",
            "1e-400",
            "-0",
            "-0.0",
            "0e0",
            "NaN",
            "-NaN",
            "Infinity",
            "-Infinity",
            "1.7976931348623157e309",
            "4294967297",
            "18446744073709551617",
            "01",
            "0x10",
            "+1",
            ".5",
            "1.",
            '"\\ud800"',
            '"\\udfff\\ud800"',
            '"\\u0000"',
            '"\\u202e"',
            '"a\\ud83d"',
            '"\\x00"',
            '"\\uZZZZ"',
            '"\\ud800": 1}',
            "true",
            "tru",
            "",
        ]
    ),
)
charsets = st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig", "latin-1"])


def encoded(value: Any, charset: str) -> bytes:
    errors = "surrogatepass" if "utf" in charset else "replace"
    return json.dumps(value, ensure_ascii=False).encode(charset, errors)


@st.composite
def raw_bodies(draw: st.DrawFn, path: str) -> bytes:
    """Bytes for a JSON endpoint: JSON or not, UTF-8 or not, deep, huge, escaped."""
    slot = draw(st.sampled_from(SLOTS))
    valid = VALID_BODIES[path]
    body: bytes = draw(
        st.one_of(
            st.binary(max_size=64),
            nested().map(lambda raw: with_slot(path, slot, raw).encode()),
            literals.map(lambda raw: with_slot(path, slot, raw).encode()),
            # Lone surrogates as \ud800 escapes (ASCII bodies) ...
            shaped(path).map(lambda value: json.dumps(value).encode()),
            # ... as UTF-8 of surrogates (invalid UTF-8) ...
            shaped(path).map(
                lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
            ),
            # ... and in UTF-16/32, which json.loads detects and decodes with surrogatepass.
            st.builds(encoded, shaped(path), charsets),
            st.builds(lambda charset: encoded(valid, charset), charsets),
            st.builds(
                lambda size: b'{"model": "' + b"x" * size + b'"}',
                st.sampled_from([MAX_BODY_BYTES - 13, MAX_BODY_BYTES - 12, MAX_BODY_BYTES]),
            ),
            st.binary(min_size=1, max_size=16).map(lambda junk: json.dumps(valid).encode() + junk),
        )
    )
    return body


content_types = st.sampled_from(
    [
        "application/json",
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=utf-16",
        "application/json; charset=nonsense",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=fuzz",
        "multipart/form-data",
        "application/octet-stream",
        "",
        "\xff\xfe",
        None,  # no Content-Type header
    ]
)

# ---- forms, query strings, headers ----------------------------------------------------

# Header values a server lets through: visible ASCII, Latin-1 and spaces, no CR/LF/NUL.
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=60,
)
# Long text in a query string: uvicorn (h11) refuses a request line and headers over
# 16 KB, so no longer query reaches the site.
query_texts = st.one_of(
    texts,
    st.builds(
        lambda size, char: char * size,
        st.sampled_from([300, 1_500]),
        st.sampled_from(["x", "é", "\x00", "\u202e", "%"]),
    ),
)
# Long text in a form: up to DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB) and beyond it.
form_texts = st.one_of(
    query_texts,
    st.builds(
        lambda size, char: char * size,
        st.sampled_from([70_000, 400_000]),
        st.sampled_from(["x", "é", "\x00", "\u202e", "%"]),
    ),
    st.just("x" * 2_700_000),
)


form_garbage = st.one_of(
    texts,
    st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=3).map("".join),
    form_texts,
    st.lists(texts, min_size=2, max_size=3),
    st.just(MISSING),
)
query_garbage = st.one_of(
    texts,
    st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=3).map("".join),
    query_texts,
    st.lists(texts, min_size=2, max_size=3),
    st.just(MISSING),
)


@st.composite
def spoiled_form(
    draw: st.DrawFn,
    required: dict[str, st.SearchStrategy[Any]],
    optional: dict[str, st.SearchStrategy[Any]] | None = None,
    *,
    garbage: st.SearchStrategy[Any] | None = None,
) -> dict[str, Any]:
    """A valid form (the `required` fields, some `optional` ones) with zero to two fields
    spoiled: text of any kind (long too), the field given several times, or removed."""
    garbage = form_garbage if garbage is None else garbage
    optional = optional or {}
    fields = {name: draw(valid) for name, valid in required.items()}
    for name, valid in optional.items():
        if draw(st.booleans()):
            fields[name] = draw(valid)
    names = sorted({*required, *optional, "unknown"})
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(names))
        value = draw(garbage)
        if value is MISSING:
            fields.pop(name, None)
        else:
            fields[name] = value
    return fields


def form_body(fields: dict[str, Any] | list[tuple[str, Any]]) -> bytes:
    """URL-encoded as browsers do it; lone surrogates become the bytes of their UTF-8."""
    pairs = fields.items() if isinstance(fields, dict) else fields
    present = [(k, v) for k, v in pairs if v is not None]
    return urlencode(present, doseq=True, encoding="utf-8", errors="surrogatepass").encode()


def multipart_body(fields: dict[str, Any], boundary: str = "fuzzboundary") -> bytes:
    parts = []
    for name, value in fields.items():
        for one in value if isinstance(value, list) else [value]:
            if one is None:
                continue
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            part = head + one + "\r\n"
            parts.append(part.encode("utf-8", "surrogatepass"))
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


# A request line carries visible ASCII only (h11 refuses the rest); '#' ends it.
url_bytes = st.binary(max_size=40).map(
    lambda raw: bytes(byte for byte in raw if 0x21 <= byte <= 0x7E and byte != 0x23)
)
raw_queries = st.one_of(
    url_bytes,
    st.lists(
        st.tuples(
            st.sampled_from(["q", "o", "p", "e", "credential", "_popup", "_to_field", "all"])
            | texts,
            query_texts,
        ),
        max_size=3,
    ).map(form_body),
    st.sampled_from([b"%ED%A0%80", b"q=%00", b"q=%FF%FE", b"p=-1", b"o=1.-2.x", b"%", b"=&=&"]),
)


def path_segment(value: str) -> str:
    return quote(value.encode("utf-8", "surrogatepass"), safe="")
