"""Strict, bounded JSON at the edge: every inbound JSON text (Socket.IO
packets on both paths, HTTP bodies) is read by `loads`, and every reply,
push and HTTP body is written by `dumps`.

Inbound, `loads` refuses (JsonRefused, a ValueError whose message is ours,
never the input's):
- nesting deeper than MAX_DEPTH, found by a pre-scan before the parser
  recurses (the stdlib parser raises RecursionError, not ValueError, about
  1,000 levels down);
- NaN, Infinity, -Infinity (not JSON) and numbers that overflow to infinity
  (`1e999`): a strict parser on the other end (JSON.parse in
  socket.io-client) cannot read them back;
- integers of more than MAX_INT_DIGITS digits (int() is quadratic in the
  digits; no field takes more than 19);
- NUL in an object key (MongoDB cannot store it) and lone surrogates in any
  string (not Unicode: they cannot be encoded to UTF-8 or BSON).

Outbound, `dumps` never writes NaN or Infinity. Nothing non-finite gets in
any more, but a document stored before this check may hold one: it is
written as null (logged at most once a minute), so one old value cannot
break a client's parser (docs/protocol.md, **Decision**).

Also here: the header of a Socket.IO packet (`split_packet`), read with a
bounded ack id, so that a packet whose JSON is refused can still be answered
on its ack id.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# Deepest nesting of arrays and objects accepted, the outermost counting 1.
# Our payloads nest at most ~20 deep (a body, `data` up to 16 levels, its
# values); the parser itself fails at about 1,000 (RecursionError).
MAX_DEPTH = 32
# Digits (sign not counted) of an integer: every field is bounded far below
# (2**53 - 1 has 16 digits, int64 19), so a number that could be valid is
# still refused by its own field, with its name, up to this length.
MAX_INT_DIGITS = 32
# Digits of a Socket.IO ack id: the clients count from 0, and a reply must
# never echo an attacker's 10,000 digits (JavaScript's safe integers have 16).
MAX_ACK_DIGITS = 15


class JsonRefused(ValueError):
    """Parseable perhaps, but not accepted; the message says why (no input in it)."""


def why(exc: ValueError) -> str:
    """A reason to put on the wire: ours, or a generic one for the parser's."""
    return str(exc) if isinstance(exc, JsonRefused) else "not valid JSON"


# -- nesting ---------------------------------------------------------------
# Short texts cannot nest deeper than they have brackets: counting them is
# all a GPS fix (~110 characters) costs. Longer ones are reduced to their
# brackets outside strings, all in C: UTF-8 (whose multi-byte characters
# hold no ASCII byte), escapes `\\` and `\"` out, every byte but brackets
# and quotes deleted, strings out, `{}` read as `[]`.
_COUNT_BELOW = 512
_OTHER_BYTES = bytes(b for b in range(256) if b not in b'[]{}"')
_SQUARE = bytes.maketrans(b"{}", b"[]")


def _nested(levels: int) -> re.Pattern[bytes]:
    """Brackets that balance within `levels` levels: a regular language
    (D0 = empty, Dk = ("[" Dk-1 "]")*), matched in linear time, with no
    backtracking (possessive repeats)."""
    inner = b""
    for _ in range(levels):
        inner = rb"(?:\[" + inner + rb"\])*+"
    return re.compile(inner)


_WITHIN = _nested(MAX_DEPTH)


def _may_nest_deeper(text: str) -> bool:
    return len(text) >= _COUNT_BELOW or text.count("[") + text.count("{") > MAX_DEPTH


def nesting_refused(text: str) -> str | None:
    """Why `text` cannot be JSON nested at most MAX_DEPTH deep, or None.
    Linear: about a tenth of what parsing the same text costs."""
    if not _may_nest_deeper(text):
        return None
    raw = text.encode("utf-8", "surrogatepass")
    if b"\\" in raw:  # so that an escaped quote does not end a string
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    raw = raw.translate(None, _OTHER_BYTES)
    # Adjacent quotes go first (most strings hold no bracket): removing two
    # keeps every later quote's parity, so what is outside strings stays so.
    raw = raw.replace(b'""', b"")
    if b'"' in raw:
        raw = b"".join(raw.split(b'"')[::2])  # even pieces: outside strings
    if _WITHIN.fullmatch(raw.translate(_SQUARE)) is None:
        return f"JSON nests deeper than {MAX_DEPTH} levels, or its brackets do not balance"
    return None


# -- tokens ----------------------------------------------------------------
def _constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not JSON")


def _float(text: str, _float: Any = float, _isinf: Any = math.isinf) -> float:
    value: float = _float(text)
    if _isinf(value):
        raise JsonRefused("a number is too large for a double (beyond 1.8e308 in magnitude)")
    return value


def _int(text: str, _int: Any = int) -> int:
    if len(text) > MAX_INT_DIGITS and len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonRefused(f"an integer has more than {MAX_INT_DIGITS} digits")
    value: int = _int(text)
    return value


_decode = json.JSONDecoder(parse_float=_float, parse_int=_int, parse_constant=_constant).decode
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_strings(value: Any) -> None:
    """NUL in keys, lone surrogates anywhere (only a \\u escape makes either)."""
    if isinstance(value, str):
        if not value.isascii() and _SURROGATE.search(value):
            raise JsonRefused("a string holds a lone surrogate (not Unicode)")
    elif isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                raise JsonRefused("an object key holds a NUL character")
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def loads(text: str) -> Any:
    """Parse strict, bounded JSON; JsonRefused or json's ValueError otherwise."""
    if len(text) >= _COUNT_BELOW or text.count("[") + text.count("{") > MAX_DEPTH:
        refused = nesting_refused(text)  # (its gate inlined above: it runs for every GPS fix)
        if refused is not None:
            raise JsonRefused(refused)
    try:
        value = _decode(text)
    except RecursionError:  # the pre-scan makes this unreachable; never a traceback if not
        raise JsonRefused(f"JSON nests deeper than {MAX_DEPTH} levels") from None
    if "\\u" in text:  # depth is bounded, so is this walk
        _check_strings(value)
    return value


_decode_plain = json.JSONDecoder(parse_constant=_constant).decode


def loads_checked_later(text: str) -> Any:
    """As `loads`, for a caller that checks every value itself (the GPS fast
    path: fast_point admits only finite numbers in range and known keys, and
    hands anything else to the regular path, which parses with `loads`):
    numbers are not hooked one by one (a Python call per float and int, a
    third of the parse on every fix). NaN and Infinity are still refused,
    and the depth is bounded the same way."""
    if len(text) >= _COUNT_BELOW or text.count("[") + text.count("{") > MAX_DEPTH:
        return loads(text)
    return _decode_plain(text)


# -- outbound --------------------------------------------------------------
# One encoder (json.dumps with arguments builds one per call); compact and
# ASCII-only, as python-socketio encodes; never NaN or Infinity.
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_WARN_EVERY_S = 60.0
_warned_at = -_WARN_EVERY_S
nulled = 0  # replies in which a non-finite number was written as null


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Strict JSON text. A non-finite float (stored before strict parsing)
    is written as null rather than as `Infinity`, which no strict parser reads."""
    try:
        return _encode(value)
    except ValueError as exc:
        if "Out of range float" not in str(exc):  # e.g. a circular reference: a bug
            raise
    global _warned_at, nulled
    nulled += 1
    now = time.monotonic()
    if now - _warned_at >= _WARN_EVERY_S:
        _warned_at = now
        log.warning("a stored non-finite number was sent as null (%d replies so far); "
                    "it predates strict JSON parsing", nulled)
    return _encode(_finite(value))


# -- Socket.IO packet header -------------------------------------------------
class PacketHead(NamedTuple):
    kind: int  # 0..6, socketio.packet.CONNECT .. BINARY_ACK
    namespace: str | None  # None: the default namespace "/"
    ack_id: int | None
    body: str  # the JSON text after the header, "" when there is none


_DIGITS = frozenset("0123456789")
BINARY_KINDS = (5, 6)  # BINARY_EVENT, BINARY_ACK: an attachment count and '-' follow the type


def split_packet(text: str) -> PacketHead | None:
    """`<type>[<attachments>-][/<namespace>,][<ack id>]<json>` (Socket.IO v5)
    without reading the JSON; None when no header can be read (no reply is
    possible), including an ack id of more than MAX_ACK_DIGITS digits."""
    if not text or text[0] not in "0123456":
        return None
    kind, i, n = ord(text[0]) - 48, 1, len(text)
    if kind in BINARY_KINDS:
        dash = text.find("-", 1, 12)
        if dash < 2 or not _DIGITS.issuperset(text[1:dash]):
            return None
        i = dash + 1
    namespace = None
    if text.startswith("/", i):
        comma = text.find(",", i)
        namespace, i = (text[i:], n) if comma < 0 else (text[i:comma], comma + 1)
        query = namespace.find("?")  # CONNECT may carry a query: not part of the name
        if query >= 0:
            namespace = namespace[:query]
    j = i
    while j < n and j - i <= MAX_ACK_DIGITS and text[j] in _DIGITS:
        j += 1
    if j - i > MAX_ACK_DIGITS:
        return None
    return PacketHead(kind, namespace, int(text[i:j]) if j > i else None, text[j:])
