"""Wire format between :class:`~trl_agent_distill.agent.sandbox.PythonSandbox` and its worker process.

Messages are length-prefixed pickles of *plain data* only (None, bool, int, float, complex, str, bytes,
Fraction, Decimal and lists / tuples / dicts / sets of those). Both sides decode with an unpickler that
refuses every global except the three constructors plain data needs, so a compromised worker cannot make
the parent run code by sending a crafted pickle (the classic ``__reduce__`` attack).

This module is imported both as part of the package (parent side) and as a top-level module by the
worker script, so it must only use the standard library.
"""

from __future__ import annotations

import io
import pickle
import struct
from decimal import Decimal
from fractions import Fraction
from typing import Any

HEADER = struct.Struct("!I")
# Hard cap on one message. Printed output and values are truncated by the worker long before this; the cap
# only protects the parent from a worker that lies about the length of what it is sending.
MAX_FRAME_BYTES = 64 * 1024 * 1024

_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, Fraction, Decimal)
_ALLOWED_GLOBALS = {
    ("builtins", "complex"): complex,
    ("fractions", "Fraction"): Fraction,
    ("decimal", "Decimal"): Decimal,
}
_MAX_DEPTH = 100


class ProtocolError(Exception):
    """The other side sent something that is not a valid message."""


class NotPlainData(TypeError):
    """A value cannot be sent as plain data."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def dumps(obj: Any) -> bytes:
    """Serialise a message (the caller guarantees it is plain data)."""
    return pickle.dumps(obj, protocol=5)


def loads(data: bytes) -> Any:
    """Deserialise a message, refusing anything but plain data."""
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # any decoding failure is a protocol violation, whatever its type
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None


def frame(obj: Any) -> bytes:
    data = dumps(obj)
    if len(data) > MAX_FRAME_BYTES:
        raise NotPlainData(f"message of {len(data)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return HEADER.pack(len(data)) + data


def to_plain(value: Any) -> Any:
    """Return ``value`` as plain data, or raise :class:`NotPlainData`.

    numpy scalars become Python numbers and numpy arrays nested lists (recognised by module name so that
    this works without importing numpy). Containers are copied; cycles and nesting deeper than 100 levels
    are refused.
    """
    return _to_plain(value, 0, set())


def _to_plain(value: Any, depth: int, active: set[int]) -> Any:
    if depth > _MAX_DEPTH:
        raise NotPlainData("value is nested too deeply")
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return value
    if kind.__module__ == "numpy":
        if hasattr(value, "tolist") and hasattr(value, "item"):
            return _to_plain(value.tolist(), depth + 1, active)
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
