# --- wire.py: plain data between the checker and the candidate -------------------------------
# Frames are a 4-byte big-endian length and a JSON body. A value is encoded by its *exact*
# type (never a subclass: an int whose __eq__ is always True is not an int here), so what the
# checker decodes is fresh plain data of its own, whatever the candidate's process did.
import json
import os
import struct

MAX_FRAME = 16 << 20
MAX_DEPTH = 64


class WireError(Exception):
    """A frame or value that is not plain data (or too big, or too deep)."""


def encode(value, depth=0):
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None:
        return ["n"]
    if kind is bool:
        return ["b", value]
    if kind is int:
        return ["i", hex(value)]
    if kind is float:
        return ["f", value.hex()]
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["s", value]
    if kind is bytes:
        return ["y", value.hex()]
    if kind in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[kind]
        return [tag, [encode(v, depth + 1) for v in value]]
    if kind is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    raise WireError(f"a {kind.__name__} is not plain data")


def decode(item, depth=0):
    if depth > MAX_DEPTH or type(item) is not list or not item or type(item[0]) is not str:
        raise WireError("malformed value")
    tag, args = item[0], item[1:]
    try:
        if tag == "n" and not args:
            return None
        if tag == "b" and type(args[0]) is bool:
            return args[0]
        if tag == "i" and type(args[0]) is str:
            return int(args[0], 16)
        if tag == "f" and type(args[0]) is str:
            return float.fromhex(args[0])
        if tag == "c":
            return complex(float.fromhex(args[0]), float.fromhex(args[1]))
        if tag == "s" and type(args[0]) is str:
            return args[0]
        if tag == "y" and type(args[0]) is str:
            return bytes.fromhex(args[0])
        if tag in ("l", "t", "S", "F") and type(args[0]) is list:
            items = [decode(v, depth + 1) for v in args[0]]
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
        if tag == "d" and type(args[0]) is list:
            out = {}
            for pair in args[0]:
                if type(pair) is not list or len(pair) != 2:
                    raise WireError("malformed dict")
                out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
            return out
    except WireError:
        raise
    except Exception as e:  # bad hex, unhashable key, missing field
        raise WireError(f"malformed {tag!r} value: {e}") from None
    raise WireError(f"malformed {tag!r} value")


def write_frame(fd, message):
    body = json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode()
    data = struct.pack(">I", len(body)) + body
    while data:
        data = data[os.write(fd, data) :]


def read_frame(fd):
    """The next message, or None at end of stream."""
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    (size,) = struct.unpack(">I", head)
    if size > MAX_FRAME:
        raise WireError(f"a frame of {size} bytes (at most {MAX_FRAME})")
    body = _read_exactly(fd, size)
    if body is None:
        raise WireError("stream ended inside a frame")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise WireError(f"not JSON: {e}") from None


def _read_exactly(fd, n):
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got:
                raise WireError("stream ended inside a frame")
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
