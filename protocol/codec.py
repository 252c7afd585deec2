"""The one codec: pydantic message <-> msgpack bytes.

Token ids and log-probs (1-D little-endian `int32`/`float32` arrays) travel as msgpack `bin`
holding their bytes, straight from the array's own buffer; the message field's type
(`TokenIds`, `LogProbs`) says the dtype and turns them back into an array with one zero-copy
`np.frombuffer`. 32k tokens cost 128 KiB, never a list of Python numbers. Any other array
(another dtype, more dimensions) travels as msgpack extension type 1 holding `{dtype, shape,
bytes}` packed as a tiny header — dtype code (u8), ndim (u8), ndim x dim (u32) — followed by
the little-endian data; decoders read both forms.

Encoding lets msgpack's C packer walk the message: models, arrays and numpy scalars are the
only objects handed back to Python (`_default`), so strings, numbers, lists and dicts cost no
Python call.
"""

from __future__ import annotations

import struct
import threading
from typing import TypeVar

import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

from protocol.messages import MESSAGES, SCHEMA

ARRAY_EXT = 1
_DTYPES = {"int32": "<i4", "float32": "<f4", "int64": "<i8", "float64": "<f8", "uint8": "u1"}
_CODES = {name: code for code, name in enumerate(_DTYPES, start=1)}
_NAMES = {code: name for name, code in _CODES.items()}
_LE_OF = {code: np.dtype(_DTYPES[name]) for code, name in _NAMES.items()}
_HEADER_1D = struct.Struct("<BBI")  # the common case: dtype code, ndim = 1, length
_BIN_DTYPES = frozenset({np.dtype("<i4"), np.dtype("<f4")})
"""Arrays of these dtypes travel as plain `bin` (the field's type knows the dtype)."""

M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """Bytes that are not a valid message of the expected type; the text says what is wrong."""

    def __init__(self, expected: str, reason: str):
        self.expected = expected
        self.reason = reason
        super().__init__(f"not a valid {expected}: {reason}")


class EncodeError(ValueError):
    """A message holding something msgpack cannot carry (an int beyond 64 bits, an object)."""


def _pack_array(obj: np.ndarray):
    if obj.ndim == 1 and obj.dtype in _BIN_DTYPES and obj.flags.c_contiguous:
        return obj.data  # the array's own buffer: msgpack copies it once, into the message
    name = obj.dtype.name
    if name not in _DTYPES:
        raise TypeError(f"cannot send arrays of dtype {name}")
    obj = np.ascontiguousarray(obj, dtype=_DTYPES[name])  # little-endian, in order
    if obj.ndim == 1 and obj.dtype in _BIN_DTYPES:
        return obj.data
    header = struct.pack(f"<BB{obj.ndim}I", _CODES[name], obj.ndim, *obj.shape)
    return msgpack.ExtType(ARRAY_EXT, header + obj.tobytes())


def _default(obj):
    """What msgpack cannot pack itself: a model becomes its field map (by alias), an array its
    bytes, a numpy scalar its Python number."""
    renamed = _RENAMED.get(type(obj), _UNKNOWN)  # before isinstance: BaseModel's is slow
    if renamed is _UNKNOWN:
        if isinstance(obj, np.ndarray):
            return _pack_array(obj)
        if not isinstance(obj, BaseModel):
            if isinstance(obj, np.generic):
                return obj.item()
            raise TypeError(f"cannot encode {type(obj).__name__}")
        renamed = _RENAMED[type(obj)] = _renamed(type(obj))
    if not renamed:
        return obj.__dict__  # the instance's own dict: no copy
    fields = obj.__dict__.copy()
    for name, alias in renamed:
        fields[alias] = fields.pop(name)
    return fields


def _renamed(cls: type[BaseModel]) -> tuple[tuple[str, str], ...]:
    return tuple((n, f.alias) for n, f in cls.model_fields.items() if f.alias and f.alias != n)


_RENAMED: dict[type, tuple[tuple[str, str], ...]] = {}
"""Each model class met so far -> its (field, alias) pairs, usually none."""
_UNKNOWN = object()
_PACKERS = threading.local()


def _unpack_ext(code: int, data: bytes):
    if code != ARRAY_EXT:
        raise ValueError(f"unknown msgpack extension type {code}")
    dtype_code, ndim = data[0], data[1]
    if ndim == 1 and dtype_code in _LE_OF:  # the common case: token ids, log-probs
        dtype = _LE_OF[dtype_code]
        length = _HEADER_1D.unpack_from(data)[2]
        array = np.frombuffer(data, dtype=dtype, offset=_HEADER_1D.size)
        if array.size != length:
            raise ValueError(f"array header says {length} elements, the data holds {array.size}")
        return array
    if dtype_code not in _LE_OF:
        raise ValueError(f"unknown array dtype code {dtype_code}")
    shape = struct.unpack_from(f"<{ndim}I", data, 2)
    array = np.frombuffer(data, dtype=_LE_OF[dtype_code], offset=2 + 4 * ndim)
    if ndim == 1 and array.shape != shape:
        raise ValueError(f"array header says {shape[0]} elements, the data holds {array.size}")
    return array if ndim == 1 else array.reshape(shape)


def encode(message: BaseModel) -> bytes:
    """Serialize a message (or any pydantic model of plain fields and arrays) to msgpack."""
    packer = getattr(_PACKERS, "packer", None)
    if packer is None:  # one per thread, its buffer reused from message to message
        packer = _PACKERS.packer = msgpack.Packer(
            default=_default, use_bin_type=True, datetime=False
        )
    try:
        return packer.pack(message)  # a failed pack leaves the buffer empty
    except (TypeError, OverflowError, ValueError) as e:
        raise EncodeError(f"cannot encode {type(message).__name__}: {e}") from e


def decode(data: bytes, cls: type[M]) -> M:
    """Parse bytes as a `cls`; raise `DecodeError` naming the problem if they are not one."""
    obj = unpack(data, cls)
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        raise DecodeError(cls.__name__, _describe(e)) from e


def unpack(data: bytes, cls: type[BaseModel]) -> dict:
    """The msgpack map in bytes meant as a `cls`, not yet validated (`decode`'s first half),
    with arrays in the extension form as arrays; `DecodeError` if it is not one."""
    name = cls.__name__
    try:
        obj = msgpack.unpackb(data, ext_hook=_unpack_ext, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise DecodeError(name, f"not msgpack ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DecodeError(name, f"expected a msgpack map, got {type(obj).__name__}")
    schema = obj.get("schema", SCHEMA)
    if schema != SCHEMA and name in MESSAGES:
        raise DecodeError(name, f"schema {schema!r} is not supported (this build reads {SCHEMA})")
    return obj


def decode_named(data: bytes, message: str) -> BaseModel:
    """`decode` by class name, as `Stage.message` gives it."""
    return decode(data, MESSAGES[message])


def _describe(error: ValidationError, limit: int = 8) -> str:
    parts = []
    for item in error.errors()[:limit]:
        where = ".".join(str(p) for p in item["loc"]) or "<message>"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def peek_task_id(data: bytes) -> str | None:
    """The task id inside bytes that may not be a valid message (a `Task`, `Rollout` or
    `ScoredRollout` refused for a bad field still names its task); None if there is none."""
    try:
        obj = msgpack.unpackb(data, ext_hook=lambda code, raw: None, raw=False)
    except Exception:  # msgpack raises several unrelated types for bad input
        return None
    for path in (("task_id",), ("task", "task_id"), ("rollout", "task", "task_id")):
        node = obj
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, str):
            return node
    return None
