"""Weight shards on disk and in the object store: names, index, checksums, download.

Shared by the learner (which writes and publishes shards) and the actors (which download,
verify and load them). No torch at import time: actors depend only on `protocol`.

Layout of version `v` (DESIGN.md, "Weights"): objects `v{v}/model-0000k-of-0000n.safetensors`
plus `v{v}/model.safetensors.index.json` (HF's format: `{"metadata": {"total_size": ...},
"weight_map": {tensor: file}}`) in the object store `aha-weights`; the `WeightManifest` at KV
`aha-policy` / `latest` names them with their sha256 and size.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import mmap
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol.messages import Shard, WeightManifest

INDEX_NAME = "model.safetensors.index.json"
"""HF-style index file next to the shards (same default as `WeightManifest.index_name`)."""

_VERSION_PREFIX = re.compile(r"^v(\d+)/")


class ShardError(ValueError):
    """A shard file that does not match its manifest entry (missing, wrong size or sha256)."""


def shard_name(index: int, count: int) -> str:
    """HF's shard file name for shard `index` (0-based) of `count`."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def object_name(version: int, name: str) -> str:
    """Object-store name of file `name` of weight version `version`."""
    return f"v{version}/{name}"


def object_version(name: str) -> int | None:
    """The version an object-store name belongs to, None if it is not `v{n}/...`."""
    match = _VERSION_PREFIX.match(name)
    return int(match.group(1)) if match else None


def plan_shards(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most `max_bytes` of tensor data.

    `sizes` is `(name, bytes)` per tensor. A tensor larger than `max_bytes` gets a shard of
    its own (as HF's `max_shard_size` does), so every tensor has a home.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read into one reused buffer (`hashlib.file_digest`)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_own_file(path: str | Path) -> str:
    """`sha256_file` of a file this process wrote and nobody else changes, hashed where its
    bytes lie in the page cache (`mmap`): ~0.2 CPU s/GB less than reading them into a buffer
    here (1.0 against 1.2). Not for others' files: one truncated while mapped is a SIGBUS."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # an empty file cannot be mapped
            return hashlib.sha256().hexdigest()
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
            return hashlib.sha256(view).hexdigest()


def describe_shard(path: str | Path, tensors: Sequence[str], *, shared: bool = False) -> Shard:
    """The manifest entry of a shard file this process wrote; `shared=True` records its
    absolute path."""
    path = Path(path)
    return Shard(
        name=path.name,
        sha256=sha256_own_file(path),
        bytes=path.stat().st_size,
        tensors=list(tensors),
        path=str(path.resolve()) if shared else None,
    )


def verify_shard(path: str | Path, shard: Shard) -> None:
    """Check a downloaded (or shared-volume) shard against its manifest entry.

    Raises `ShardError` naming the file and what differs; returns None when it matches.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {shard.name}: {path} does not exist")
    size = path.stat().st_size
    if size != shard.bytes:
        raise ShardError(
            f"shard {shard.name}: {path} has {size} bytes, the manifest says {shard.bytes}"
        )
    digest = sha256_file(path)
    if digest != shard.sha256:
        raise ShardError(
            f"shard {shard.name}: sha256 mismatch for {path}: got {digest}, "
            f"the manifest says {shard.sha256} (corrupted or from another version)"
        )


def build_index(shards: Sequence[Shard], total_size: int) -> dict[str, Any]:
    """HF's `model.safetensors.index.json` content for `shards` (`total_size`: tensor bytes)."""
    weight_map = {tensor: shard.name for shard in shards for tensor in shard.tensors}
    return {"metadata": {"total_size": total_size}, "weight_map": weight_map}


def write_index(directory: str | Path, shards: Sequence[Shard], total_size: int) -> Path:
    path = Path(directory) / INDEX_NAME
    path.write_text(json.dumps(build_index(shards, total_size), indent=2, sort_keys=True) + "\n")
    return path


OBJECT_CHUNK_BYTES = 4 << 20
"""Chunk size of the weight objects the learner uploads. nats-py's default (128 KiB) costs a
server round trip and a Python message per 128 KiB: 8,192 of each per GB. 4 MiB chunks are
256 per GB and stay well under the bus's `max_payload` (8 MiB in our server configs); a server
with a smaller limit gets chunks of half its limit."""

RECEIVE_BUFFER_BYTES = 1 << 20
"""Socket read size of a connection that downloads weights (nats-py reads 32 KiB at a time:
one event-loop turn and one parser pass per 32 KiB)."""


def chunk_bytes(max_payload: int) -> int:
    """The object chunk size for a server whose largest message is `max_payload` bytes."""
    return min(OBJECT_CHUNK_BYTES, max(1 << 16, max_payload // 2))


def widen_reads() -> None:
    """Let nats-py read `RECEIVE_BUFFER_BYTES` per socket read in this process.

    nats-py reads its module constant on every read, so this applies to connections already
    open. Small messages are unaffected (a read returns what is there); large ones take 32x
    fewer event-loop turns.
    """
    import nats.aio.client

    nats.aio.client.DEFAULT_BUFFER_SIZE = max(
        nats.aio.client.DEFAULT_BUFFER_SIZE, RECEIVE_BUFFER_BYTES
    )


def _digest_of(info) -> str | None:
    """The hex sha256 the object store recorded for an object (`SHA-256=<base64url>`)."""
    raw = (info.digest or "").split("=", 1)
    if len(raw) != 2 or raw[0].upper() != "SHA-256":
        return None
    try:
        return base64.urlsafe_b64decode(raw[1] + "=" * (-len(raw[1]) % 4)).hex()
    except ValueError:
        return None


UPLOAD_WINDOW = 8
"""Chunks an upload keeps in flight before it waits for the oldest one's acknowledgement."""

ACK_TIMEOUT_S = 30.0
"""How long an upload waits for the server to acknowledge one chunk."""


async def upload_file(js, store, name: str, path: str | Path, sha256: str | None = None) -> None:
    """Put file `path` as object `name` of `store`, readable by nats-py's object store.

    The layout is nats-py's (chunks on `$O.<bucket>.C.<nuid>`, then the object's info on
    `$O.<bucket>.M.<name>` with the size, chunk count and `SHA-256=` digest), written here
    because nats-py's `put` waits for each chunk's acknowledgement before sending the next
    and hashes the file again. Chunks are `chunk_bytes` of the server's limit, up to
    `UPLOAD_WINDOW` of them in flight. `sha256` (hex, from the shard's manifest entry) is
    recorded as the digest when given, so the file is not hashed twice; if the file changed
    since, actors refuse it (their hash of what they receive will not match). On failure the
    chunks sent are purged and no info is written: the object is absent, never partial.
    """
    from nats.js import api
    from nats.js.errors import NotFoundError

    nc = js._nc
    bucket = store._name
    stream = f"OBJ_{bucket}"
    size = chunk_bytes(nc.max_payload or OBJECT_CHUNK_BYTES * 2)
    nuid = nc._nuid.next().decode()
    subject = f"$O.{bucket}.C.{nuid}"
    try:
        previous = await store.get_info(name)
    except NotFoundError:
        previous = None
    digest = hashlib.sha256() if sha256 is None else None
    in_flight: list = []
    try:
        total, chunks = await _send_chunks(js, subject, stream, path, size, digest, in_flight)
        hexdigest = sha256 if digest is None else digest.hexdigest()
        info = api.ObjectInfo(
            name=name,
            bucket=bucket,
            nuid=nuid,
            size=total,
            chunks=chunks,
            mtime=datetime.now(UTC).isoformat(),
            digest="SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(hexdigest)).decode(),
            options=api.ObjectMetaOptions(max_chunk_size=size),
        )
        meta = f"$O.{bucket}.M." + base64.urlsafe_b64encode(name.encode()).decode()
        await js.publish(
            meta, json.dumps(info.as_dict()).encode(), headers={api.Header.ROLLUP: "sub"}
        )
    except BaseException:
        for future in in_flight:
            future.cancel()
        await js.purge_stream(stream, subject=subject)
        raise
    if previous is not None and not previous.deleted and previous.nuid != nuid:
        await js.purge_stream(stream, subject=f"$O.{bucket}.C.{previous.nuid}")


async def _send_chunks(js, subject, stream, path, size, digest, in_flight: list) -> tuple[int, int]:
    """Publish file `path` in chunks of `size` bytes to `subject`, up to `UPLOAD_WINDOW`
    unacknowledged (held in `in_flight`, so a caller that fails can cancel them), hashing into
    `digest` when given; (bytes, chunks) once every chunk is acknowledged."""
    total = chunks = 0
    with open(path, "rb") as f:
        while data := await asyncio.to_thread(f.read, size):
            if digest is not None:
                digest.update(data)
            in_flight.append(await js.publish_async(subject, data, stream=stream))
            chunks += 1
            total += len(data)
            if len(in_flight) >= UPLOAD_WINDOW:
                await asyncio.wait_for(in_flight.pop(0), ACK_TIMEOUT_S)
    while in_flight:
        await asyncio.wait_for(in_flight[0], ACK_TIMEOUT_S)
        in_flight.pop(0)
    return total, chunks


async def check_object(store, name: str, shard: Shard):
    """The store's info for object `name`, if its recorded size and sha256 are `shard`'s;
    `ShardError` otherwise (missing, replaced or corrupt), before any byte is fetched."""
    from nats.js.errors import NotFoundError

    try:
        info = await store.get_info(name)
    except NotFoundError as e:
        raise ShardError(f"shard {shard.name}: object {name} is not in the store") from e
    recorded = _digest_of(info)
    if info.size != shard.bytes:
        raise ShardError(
            f"shard {shard.name}: object {name} has {info.size} bytes, the manifest says {shard.bytes}"
        )
    if recorded != shard.sha256:
        raise ShardError(
            f"shard {shard.name}: sha256 mismatch for object {name}: the store has {recorded}, "
            f"the manifest says {shard.sha256} (corrupted or from another version)"
        )
    return info


async def download_shard(js, store, name: str, shard: Shard, path: str | Path) -> Path:
    """Download object `name` to `path`, hashing while it arrives; raise `ShardError` unless
    its bytes are exactly `shard`'s (size and sha256). Nothing is left at `path` on error.

    The object's recorded size and sha256 are checked against the manifest before a byte is
    fetched (a replaced or corrupt object is refused at once); the bytes received are hashed
    as they arrive, in a worker thread together with the file write, so the event loop keeps
    reading the socket and the file is never read back. Chunks arrive in order on an ordered
    consumer (a gap restarts it from the last chunk seen, which nats-py handles).
    """
    from nats.errors import Error as NatsError

    path = Path(path)
    info = await check_object(store, name, shard)
    digest = hashlib.sha256()
    received = 0
    subject = f"$O.{store._name}.C.{info.nuid}"
    sub = await js.subscribe(
        subject, ordered_consumer=True, pending_bytes_limit=max(1 << 28, 4 * OBJECT_CHUNK_BYTES)
    )

    def take(f, data: bytes) -> None:
        digest.update(data)
        f.write(data)

    try:
        with open(path, "wb") as f:
            while received < info.size:
                msg = await sub.next_msg(timeout=CHUNK_TIMEOUT_S)
                if not msg.data:  # flow-control and heartbeat messages carry no data
                    continue
                received += len(msg.data)
                if received > info.size:
                    break
                await asyncio.to_thread(take, f, msg.data)
        got = digest.hexdigest()
        if received != shard.bytes or got != shard.sha256:
            raise ShardError(
                f"shard {shard.name}: sha256 mismatch for {name}: received {received} bytes "
                f"hashing to {got}, the manifest says {shard.bytes} bytes, {shard.sha256}"
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        with contextlib.suppress(NatsError):  # the connection may be gone: nothing to release
            await sub.unsubscribe()
    return path


CHUNK_TIMEOUT_S = 30.0
"""How long a download waits for the next chunk before giving the shard up."""


def local_shards(manifest: WeightManifest) -> list[Path] | None:
    """The shard paths on the shared volume if every one is there and verifies; None otherwise."""
    if not all(s.path for s in manifest.shards):
        return None
    try:
        for shard in manifest.shards:
            verify_shard(shard.path, shard)
    except ShardError:
        return None
    return [Path(s.path) for s in manifest.shards]
