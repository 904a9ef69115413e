"""Wire format between :class:`~trl_agent_distill.agent.sandbox.PythonSandbox` and its worker process.

A frame is ``length (4 bytes) | MAC (32 bytes) | payload``. The payload is a pickle of *plain data* only
(None, bool, int, float, complex, str, bytes, Fraction, Decimal and lists / tuples / dicts / sets of those),
written without a memo, so that it is a tree no larger than the frame.

The MAC is an HMAC-SHA256 over the frame's sequence number on its channel and the payload, keyed with a
secret that the host hands the worker in its first message, before any sandboxed code exists. Sandboxed
code can reach the worker's socket by its descriptor number, but it cannot know the key: a frame it writes
(a forged result, or a stale one from a thread left by an earlier run) fails the check, and so does a frame
replayed or taken out of order.

Decoding trusts nothing, since a worker may have been fully compromised: before unpickling, the opcode
stream is scanned with bounds on the number of items, nesting depth and integer size, and references to the
memo (shared or cyclic structures) are refused; the only globals are checked constructors of complex,
Fraction and Decimal that refuse special values (``Decimal('sNaN')``) and oversized numbers. Whatever
passes can be printed, compared, hashed and pickled by the host in bounded time.

This module is imported both as part of the package (host side) and from its file by the worker
script, so it must only use the standard library.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import math
import pickle
import pickletools
import secrets
import struct
from decimal import Decimal
from fractions import Fraction
from typing import Any

HEADER = struct.Struct("!I")
MAC_BYTES = hashlib.sha256().digest_size
KEY_BYTES = 32
# Hard cap on one frame. Printed output and values are truncated by the worker long before this; the cap
# only protects the reader from a writer that lies about the length of what it is sending.
MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_ITEMS = 1_000_000  # opcodes of one payload: bounds the time the host spends decoding it
MAX_DEPTH = 110  # of a whole message: a value (at most VALUE_DEPTH) inside the message's own containers
VALUE_DEPTH = 100
MAX_INT_DIGITS = 4000  # below Python's default int/str conversion limit (4300), so str() always works
_MAX_INT_BITS = math.ceil(MAX_INT_DIGITS * math.log2(10))
_MAX_NUMBER_CHARS = 2 * MAX_INT_DIGITS + 16  # text of a Fraction or Decimal

_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, Fraction, Decimal)


class ProtocolError(Exception):
    """The other side sent something that is not a valid message."""


class NotPlainData(TypeError):
    """A value cannot be sent as plain data."""


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


# --------------------------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------------------------
def dumps(obj: Any) -> bytes:
    """Serialise a message without a memo (the caller guarantees it is plain data)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=5)
    pickler.fast = True  # no memo: shared objects are written out again, and the reader refuses memo refs
    pickler.dump(obj)
    return buffer.getvalue()


def mac(key: bytes, seq: int, payload: bytes) -> bytes:
    return hmac.new(key, seq.to_bytes(8, "big") + payload, hashlib.sha256).digest()


def frame(obj: Any, key: bytes, seq: int) -> bytes:
    """The bytes of frame number ``seq`` carrying ``obj``; NotPlainData if the reader would refuse it."""
    payload = dumps(obj)
    if MAC_BYTES + len(payload) > MAX_FRAME_BYTES:
        raise NotPlainData(f"message of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        scan(payload)
    except ProtocolError as exc:
        raise NotPlainData(str(exc)) from None
    return HEADER.pack(MAC_BYTES + len(payload)) + mac(key, seq, payload) + payload


def check_size(size: int) -> None:
    if not MAC_BYTES <= size <= MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes (allowed: {MAC_BYTES} to {MAX_FRAME_BYTES})")


def open_frame(body: bytes, key: bytes, seq: int) -> Any:
    """The message in a frame's body (MAC and payload), if it is frame number ``seq`` under ``key``."""
    tag, payload = body[:MAC_BYTES], body[MAC_BYTES:]
    if not hmac.compare_digest(tag, mac(key, seq, payload)):
        raise ProtocolError("frame failed authentication (forged, replayed or out of order)")
    return loads(payload)


# --------------------------------------------------------------------------------------------------------------
# Bounded decoding
# --------------------------------------------------------------------------------------------------------------
def _checked_int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise pickle.UnpicklingError(f"{what} must be an int")
    if value.bit_length() > _MAX_INT_BITS:
        raise pickle.UnpicklingError(f"{what} has more than {MAX_INT_DIGITS} digits")
    return value


def _checked_text(value: Any, what: str) -> str:
    if type(value) is not str or len(value) > _MAX_NUMBER_CHARS:
        raise pickle.UnpicklingError(f"{what} must be a str of at most {_MAX_NUMBER_CHARS} characters")
    return value


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise pickle.UnpicklingError("complex parts must be numbers")
    return complex(_checked_int(real, "complex part") if type(real) is int else real,
                   _checked_int(imag, "complex part") if type(imag) is int else imag)


def _fraction(numerator: Any, denominator: Any = 1) -> Fraction:
    if type(numerator) is str and denominator == 1:  # older Pythons pickle a Fraction as its text
        value = Fraction(_checked_text(numerator, "Fraction"))
    else:
        value = Fraction(_checked_int(numerator, "numerator"), _checked_int(denominator, "denominator"))
    _checked_int(value.numerator, "numerator")
    _checked_int(value.denominator, "denominator")
    return value


def _decimal(text: Any) -> Decimal:
    value = Decimal(_checked_text(text, "Decimal"))
    if value.is_snan():
        raise pickle.UnpicklingError("signalling NaN decimals are not plain data (comparing them raises)")
    if value.is_finite() and abs(value.adjusted()) > MAX_INT_DIGITS:
        raise pickle.UnpicklingError(f"Decimal exponent beyond {MAX_INT_DIGITS}")
    return value


_ALLOWED_GLOBALS = {("builtins", "complex"): _complex, ("fractions", "Fraction"): _fraction,
                    ("decimal", "Decimal"): _decimal}
_SCALAR_OPS = frozenset({"NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "LONG4",
                         "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES",
                         "BINBYTES", "BINBYTES8"})
_NO_STACK_OPS = frozenset({"PROTO", "FRAME", "MEMOIZE", "STOP"})


def scan(payload: bytes) -> None:
    """Refuse a payload that is not a bounded tree of plain data, without building it.

    Simulates the unpickler's stack with the nesting depth of each entry instead of the objects.
    """
    stack: list[int] = []
    marks: list[int] = []

    def pop(n: int) -> list[int]:
        if n > len(stack) - (marks[-1] if marks else 0):
            raise ProtocolError("malformed payload (stack underflow)")
        items = stack[len(stack) - n:] if n else []
        del stack[len(stack) - n:]
        return items

    def pop_mark() -> list[int]:
        if not marks:
            raise ProtocolError("malformed payload (no mark)")
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def nest(items: list[int]) -> int:
        depth = max(items, default=0) + 1
        if depth > MAX_DEPTH:
            raise ProtocolError(f"payload nested deeper than {MAX_DEPTH} levels")
        return depth

    def add_to_top(items: list[int]) -> None:
        if not stack:
            raise ProtocolError("malformed payload (no container)")
        stack[-1] = max(stack[-1], nest(items))

    try:
        for count, (op, arg, _pos) in enumerate(pickletools.genops(payload)):
            if count >= MAX_ITEMS:
                raise ProtocolError(f"payload has more than {MAX_ITEMS:,} items")
            name = op.name
            if name in _SCALAR_OPS:
                if type(arg) is int:
                    _checked_int(arg, "integer")
                stack.append(0)
            elif name in _NO_STACK_OPS:
                pass
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"):
                stack.append(1)
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "APPEND":
                add_to_top(pop(1))
            elif name == "SETITEM":
                add_to_top(pop(2))
            elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
                add_to_top(pop_mark())
            elif name in ("TUPLE", "FROZENSET"):
                stack.append(nest(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                stack.append(nest(pop(int(name[-1]))))
            elif name == "STACK_GLOBAL":
                pop(2)
                stack.append(0)
            elif name == "REDUCE":  # a checked constructor applied to its arguments: a scalar
                pop(2)
                stack.append(0)
            else:
                raise ProtocolError(f"payload uses the pickle opcode {name}, which plain data never needs")
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or garbled opcode stream
        raise ProtocolError(f"malformed payload: {type(exc).__name__}: {exc}") from None
    if len(stack) != 1 or marks:
        raise ProtocolError("malformed payload (not exactly one value)")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def loads(data: bytes) -> Any:
    """Deserialise a message, refusing anything but bounded plain data."""
    scan(data)
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a protocol violation, whatever its type
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# Converting values
# --------------------------------------------------------------------------------------------------------------
def to_plain(value: Any) -> Any:
    """Return ``value`` as plain data, or raise :class:`NotPlainData`.

    numpy scalars become Python numbers and numpy arrays nested lists (recognised by module name so that
    this works without importing numpy). Containers are copied; cycles, nesting deeper than ``VALUE_DEPTH``
    levels and numbers the reader would refuse are refused.
    """
    return _to_plain(value, 0, set())


def _to_plain(value: Any, depth: int, active: set[int]) -> Any:
    if depth > VALUE_DEPTH:
        raise NotPlainData("value is nested too deeply")
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        try:  # the reader refuses the whole message over one such number, so refuse the value here
            if kind is int:
                _checked_int(value, "integer")
            elif kind in (complex, Fraction, Decimal):
                _ALLOWED_GLOBALS[("builtins" if kind is complex else kind.__module__, kind.__name__)](
                    *value.__reduce__()[1])
        except pickle.UnpicklingError as exc:
            raise NotPlainData(str(exc)) from None
        return value
    if kind.__module__ == "numpy":
        if hasattr(value, "tolist") and hasattr(value, "item"):
            return _to_plain(value.tolist(), depth, active)
        raise NotPlainData(f"numpy value of type {kind.__name__} is not plain data")
    if kind in (list, tuple, set, frozenset, dict, bytearray):
        if id(value) in active:
            raise NotPlainData("value contains a reference cycle")
        active.add(id(value))
        try:
            if kind is dict:
                return {_to_plain(k, depth + 1, active): _to_plain(v, depth + 1, active) for k, v in value.items()}
            if kind is bytearray:
                return bytes(value)
            return kind(_to_plain(item, depth + 1, active) for item in value)
        finally:
            active.discard(id(value))
    raise NotPlainData(f"values of type {kind.__module__}.{kind.__qualname__} are not plain data")
