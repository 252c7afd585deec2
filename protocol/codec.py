"""The one codec: pydantic message <-> msgpack bytes.

Arrays (token ids, log-probs) travel as msgpack extension type 1 holding `{dtype, shape,
bytes}` packed as a tiny header — dtype code (u8), ndim (u8), ndim x dim (u32) — followed by
the little-endian data. 32k tokens cost 128 KiB and decode with one zero-copy
`np.frombuffer`, never as a list of Python numbers.
"""

from __future__ import annotations

import struct
from typing import TypeVar

import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

from protocol.messages import MESSAGES, SCHEMA

ARRAY_EXT = 1
_DTYPES = {"int32": "<i4", "float32": "<f4", "int64": "<i8", "float64": "<f8", "uint8": "u1"}
_CODES = {name: code for code, name in enumerate(_DTYPES, start=1)}
_NAMES = {code: name for name, code in _CODES.items()}
_CODE_OF = {np.dtype(le): _CODES[name] for name, le in _DTYPES.items()}
_LE_OF = {code: np.dtype(_DTYPES[name]) for code, name in _NAMES.items()}
_HEADER_1D = struct.Struct("<BBI")  # the common case: dtype code, ndim = 1, length

M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """Bytes that are not a valid message of the expected type; the text says what is wrong."""

    def __init__(self, expected: str, reason: str):
        self.expected = expected
        self.reason = reason
        super().__init__(f"not a valid {expected}: {reason}")


class EncodeError(ValueError):
    """A message holding something msgpack cannot carry (an int beyond 64 bits, an object)."""


def _pack_array(obj: np.ndarray) -> msgpack.ExtType:
    code = _CODE_OF.get(obj.dtype)  # little-endian int32/float32/...: no conversion
    if code is None or obj.ndim != 1 or not obj.flags.c_contiguous:
        return _pack_default(obj)
    # One copy: the header and the array's own buffer straight into the ext payload.
    return msgpack.ExtType(ARRAY_EXT, _HEADER_1D.pack(code, 1, obj.shape[0]) + obj.data)


def _pack_default(obj):
    if isinstance(obj, np.ndarray):
        code = _CODE_OF.get(obj.dtype)  # little-endian int32/float32/...: no conversion
        if code is None:
            name = obj.dtype.name
            if name not in _DTYPES:
                raise TypeError(f"cannot send arrays of dtype {name}")
            code, obj = _CODES[name], obj.astype(_DTYPES[name])
        if obj.ndim == 1:
            header = _HEADER_1D.pack(code, 1, obj.shape[0])
        else:
            header = struct.pack(f"<BB{obj.ndim}I", code, obj.ndim, *obj.shape)
        return msgpack.ExtType(ARRAY_EXT, header + obj.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


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


def _keys(cls: type[BaseModel]) -> dict[str, str]:
    keys = _KEYS.get(cls)
    if keys is None:
        keys = _KEYS[cls] = {name: f.alias or name for name, f in cls.model_fields.items()}
    return keys


_KEYS: dict[type[BaseModel], dict[str, str]] = {}


_LEAVES = frozenset({str, int, float, bool, type(None), bytes})
"""Types msgpack packs as they are: `_plain` returns them without a call."""


def _plain(value):
    """`model_dump(by_alias=True)` for our messages, without pydantic's per-field serializer
    calls (3x faster on a Rollout); arrays become their ext type here, in one copy."""
    kind = type(value)
    if kind in _LEAVES:
        return value
    if isinstance(value, BaseModel):
        keys = _keys(kind)
        return {keys[k]: v if type(v) in _LEAVES else _plain(v) for k, v in value.__dict__.items()}
    if kind is np.ndarray:
        return _pack_array(value)
    if isinstance(value, (list, tuple)):
        return [v if type(v) in _LEAVES else _plain(v) for v in value]
    if isinstance(value, dict):
        return {k: v if type(v) in _LEAVES else _plain(v) for k, v in value.items()}
    return value


def encode(message: BaseModel) -> bytes:
    """Serialize a message (or any pydantic model of plain fields and arrays) to msgpack."""
    try:
        return msgpack.packb(_plain(message), default=_pack_default, use_bin_type=True)
    except (TypeError, OverflowError) as e:
        raise EncodeError(f"cannot encode {type(message).__name__}: {e}") from e


def decode(data: bytes, cls: type[M]) -> M:
    """Parse bytes as a `cls`; raise `DecodeError` naming the problem if they are not one."""
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
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        raise DecodeError(name, _describe(e)) from e


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
