"""Fetch a published weight version and load it into an engine, or refuse it whole.

A `WeightManifest` (KV `aha-policy` / `latest`) names a version's shards with their sha256.
An actor gets the files from the shared volume when the manifest carries paths that are
there and verify, else from the object store (every shard at once, each hashed while it
arrives and written once), verifies every sha256, and only then asks the engine
to load them. Any missing or corrupt shard, or weights that do not fit the model, raise
`WeightsRejected` before the engine is touched: it keeps serving the version it had.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from actors.engine import Engine
from protocol.messages import WeightManifest
from protocol.names import OBJECT_STORE_WEIGHTS
from protocol.weights import (
    ShardError,
    check_objects,
    download_shard,
    local_shards,
    object_name,
    widen_reads,
)


class WeightsRejected(RuntimeError):
    """A weight version that will not be served; the engine keeps its current version."""

    def __init__(self, version: int, reason: str):
        super().__init__(f"weights v{version} rejected: {reason}")
        self.version = version
        self.reason = reason


async def download_shards(js, manifest: WeightManifest, directory: str | Path) -> list[Path]:
    """Download every shard of `manifest` from the object store into `directory`, each verified
    while it arrives (`protocol.weights.download_shard`). Raises `ShardError` for a missing or
    corrupt shard, whose file is then removed: a version is taken whole or not at all.

    One shard at a time: the server pushes an object's chunks as fast as flow control lets it,
    and several objects pushed at once to one connection overflow the server's per-client
    buffer (`max_pending`), which then drops the connection as a slow consumer. One stream
    already keeps the socket full; the hashing and writing run beside it in a thread.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    widen_reads()
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    # Every object's size and sha256 are checked against the manifest before any download,
    # so a replaced or missing shard is refused before a byte of the others is fetched.
    await check_objects(store, manifest)
    paths = []
    for shard in manifest.shards:
        name = object_name(manifest.version, shard.name)
        paths.append(await download_shard(js, store, name, shard, directory / shard.name))
    return paths


async def fetch_shards(
    js, manifest: WeightManifest, directory: str | Path
) -> tuple[list[Path], str]:
    """The verified shard files of `manifest` and where they came from (`shared` or `store`)."""
    shared = await asyncio.to_thread(local_shards, manifest)
    if shared is not None:
        return shared, "shared"
    return await download_shards(js, manifest, directory), "store"


async def load_manifest(
    engine: Engine, js, manifest: WeightManifest, directory: str | Path
) -> dict[str, float | str | int]:
    """Fetch, verify and load `manifest` into `engine`; returns what it cost.

    Downloads go to `directory/v{version}/`, removed once loaded (the engines copy the
    weights in). Raises `WeightsRejected` if anything is wrong; the engine is then unchanged.
    """
    started = time.perf_counter()
    target = Path(directory) / f"v{manifest.version}"
    try:
        paths, source = await fetch_shards(js, manifest, target)
        fetched = time.perf_counter()
        await engine.load_weights(paths, manifest.version)
    except (ShardError, ValueError, FileNotFoundError) as e:
        raise WeightsRejected(manifest.version, str(e)) from e
    finally:
        shutil.rmtree(target, ignore_errors=True)
    done = time.perf_counter()
    return {
        "version": manifest.version,
        "source": source,
        "bytes": manifest.total_bytes,
        "fetch_seconds": fetched - started,
        "load_seconds": done - fetched,
    }
