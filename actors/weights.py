"""Fetch a published weight version and load it into an engine, or refuse it whole.

A `WeightManifest` (KV `aha-policy` / `latest`) names a version's shards with their sha256.
An actor gets the files from the shared volume when the manifest carries paths that are
there and verify, else over HTTP from the manifest's `sources` (the learner, or a peer it
redirects to; `protocol.weight_server`), with the object store for any shard HTTP did not
deliver intact (a version served over HTTP is announced before its store copy is uploaded:
the actor then waits for that copy, `wait_for_objects`); every shard is hashed while it
arrives and written once. Only when every sha256 matches does it ask the engine to load them.
Any missing or corrupt shard, or weights that do not fit the model, raise `WeightsRejected`
before the engine is touched: it keeps serving the version it had.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import structlog

from actors.engine import Engine
from protocol.codec import DecodeError, decode
from protocol.messages import Shard, WeightManifest
from protocol.names import KEY_LATEST, KV_POLICY, OBJECT_STORE_WEIGHTS
from protocol.weight_server import WeightServer, WeightServerConfig, fetch_shard, is_file_name
from protocol.weights import (
    ShardError,
    check_object,
    download_shard,
    local_shards,
    object_name,
    widen_reads,
)

log = structlog.get_logger("actors.weights")


class WeightsRejected(RuntimeError):
    """A weight version that will not be served; the engine keeps its current version."""

    def __init__(self, version: int, reason: str):
        super().__init__(f"weights v{version} rejected: {reason}")
        self.version = version
        self.reason = reason


async def download_shards(
    js,
    manifest: WeightManifest,
    directory: str | Path,
    *,
    relay: WeightServer | None = None,
    http: WeightServerConfig | None = None,
) -> list[Path]:
    """Every shard of `manifest` into `directory`, each verified as it arrives: over HTTP from
    the manifest's `sources` (passing the bytes on through `relay` as they land), else, shard
    by shard, from the object store. Raises `ShardError` for a shard no source delivers intact,
    whose file is then removed: a version is taken whole or not at all.
    """
    paths, _ = await _download(js, manifest, Path(directory), relay, http or WeightServerConfig())
    return paths


async def _download(
    js, manifest: WeightManifest, directory: Path, relay, http: WeightServerConfig
) -> tuple[list[Path], str]:
    """`download_shards`, and where the bytes came from: `http`, `store` or `http+store`."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard in manifest.shards:
        if not is_file_name(shard.name):
            raise ShardError(f"shard {shard.name[:200]!r}: not a plain file name")
    missing = list(manifest.shards)
    source = "store"
    if manifest.sources and http.enabled:
        missing = await fetch_over_http(manifest, directory, relay, http)
        source = "http+store" if missing else "http"
    if missing:
        await fetch_from_store(js, manifest, directory, missing, wait_s=http.store_wait_s)
    return [directory / s.name for s in manifest.shards], source


async def fetch_over_http(
    manifest: WeightManifest, directory: Path, relay: WeightServer | None, http: WeightServerConfig
) -> list[Shard]:
    """Fetch the shards from the first source, `http.parallel` at once; the shards it did not
    deliver intact (logged), for the object store to supply. After the first failure no new
    shard is asked of it (a source that is gone would cost a timeout per shard)."""
    source = manifest.sources[0]
    token = source.rsplit("/", 1)[-1]
    entries = relay.receiving(token, manifest.version, directory, manifest.shards) if relay else {}
    gate = asyncio.Semaphore(http.parallel)
    failed: list[Shard] = []
    # Threads of this download's own: in the shared default pool, fetches waiting on a relay
    # could hold every thread while the fetch that relay waits for sits in the queue.
    threads = ThreadPoolExecutor(http.parallel, thread_name_prefix="fetch")
    loop = asyncio.get_running_loop()

    async def one(shard: Shard) -> None:
        entry = entries.get(shard.name)
        async with gate:
            if failed:  # the source failed once: the shards not started come from the store
                if entry is not None:
                    entry.fail()
                failed.append(shard)
                return
            fetch = partial(
                fetch_shard,
                f"{source}/v{manifest.version}/{shard.name}",
                shard,
                directory / shard.name,
                relay=relay.base if relay else None,
                entry=entry,
                stall_s=http.stall_s,
            )
            try:
                await loop.run_in_executor(threads, fetch)
            except ShardError as e:
                log.warning("shard over HTTP failed: from the object store", error=str(e))
                if entry is not None:
                    entry.fail()
                failed.append(shard)

    try:
        await asyncio.gather(*(one(s) for s in manifest.shards))
    finally:
        threads.shutdown(wait=False)
    return failed


async def fetch_from_store(
    js, manifest: WeightManifest, directory: Path, shards: list[Shard], *, wait_s: float = 0.0
):
    """Download `shards` from the object store, one at a time: the server pushes an object's
    chunks as fast as flow control lets it, and several objects pushed at once to one
    connection overflow the server's per-client buffer (`max_pending`), which then drops the
    connection as a slow consumer. One stream already keeps the socket full; the hashing and
    writing run beside it in a thread. A manifest whose store copy follows it (`stored`
    false) first gets up to `wait_s` seconds for that copy (`wait_for_objects`)."""
    widen_reads()
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    if not manifest.stored:
        await wait_for_objects(js, store, manifest, shards, wait_s)
    # Every object's size and sha256 are checked against the manifest before any download,
    # so a replaced or missing shard is refused before a byte of the others is fetched.
    for shard in shards:
        await check_object(store, object_name(manifest.version, shard.name), shard)
    for shard in shards:
        name = object_name(manifest.version, shard.name)
        await download_shard(js, store, name, shard, directory / shard.name)


STORE_POLL_S = 0.5
"""How often an actor waiting for a version's store copy looks for it (and at `latest`)."""


async def wait_for_objects(js, store, manifest: WeightManifest, shards: list[Shard], wait_s):
    """Wait until the store has an object for every one of `shards`, polling their info, for
    at most `wait_s` seconds and while `latest` still names this version (the learner skips
    the upload of a version a newer one overtook); `ShardError` otherwise. Only presence is
    awaited: what is there is then checked as always (`check_object`), and refused at once if
    it is not the manifest's. (A learner starting removes the versions it publishes anew,
    `learner.weights.remove_stale_versions`: an object of this version's name is this run's.)"""
    deadline = time.monotonic() + wait_s
    kv = await js.key_value(KV_POLICY)
    for shard in shards:
        name = object_name(manifest.version, shard.name)
        while not await has_object(store, name):
            if time.monotonic() >= deadline:
                raise ShardError(
                    f"shard {shard.name}: the store never had object {name}: its upload after "
                    f"the manifest did not arrive within {wait_s:g} s"
                )
            if not await names_version(kv, manifest):
                raise ShardError(
                    f"shard {shard.name}: the store never had object {name}: a newer version "
                    "replaced this one under latest before its upload"
                )
            await asyncio.sleep(min(STORE_POLL_S, max(deadline - time.monotonic(), 0.0)))


async def has_object(store, name: str) -> bool:
    from nats.js.errors import NotFoundError

    try:
        info = await store.get_info(name)
    except NotFoundError:
        return False
    return not info.deleted


async def names_version(kv, manifest: WeightManifest) -> bool:
    """Whether `latest` is still `manifest`'s policy and version."""
    latest = await latest_manifest(kv)
    return latest is not None and (latest.policy, latest.version) == (
        manifest.policy,
        manifest.version,
    )


async def latest_manifest(kv) -> WeightManifest | None:
    """The manifest under `latest`, None if there is none or it does not decode (logged)."""
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(KEY_LATEST)
    except KeyNotFoundError:
        return None
    try:
        return decode(entry.value, WeightManifest)
    except DecodeError as e:
        log.error("bad manifest under latest: ignored", revision=entry.revision, error=str(e))
        return None


async def fetch_shards(
    js,
    manifest: WeightManifest,
    directory: str | Path,
    *,
    relay: WeightServer | None = None,
    http: WeightServerConfig | None = None,
) -> tuple[list[Path], str]:
    """The verified shard files of `manifest` and where they came from: `shared` (the shared
    volume), `http`, `store`, or `http+store` (the object store supplied what HTTP did not)."""
    shared = await asyncio.to_thread(local_shards, manifest)
    if shared is not None:
        return shared, "shared"
    return await _download(js, manifest, Path(directory), relay, http or WeightServerConfig())


RELAY_VERSIONS = 2
"""Versions an actor keeps passing on: the one it serves and the one before, for a peer that
started on it a moment ago."""


async def load_manifest(
    engine: Engine,
    js,
    manifest: WeightManifest,
    directory: str | Path,
    *,
    relay: WeightServer | None = None,
    http: WeightServerConfig | None = None,
) -> dict[str, float | str | int]:
    """Fetch, verify and load `manifest` into `engine`; returns what it cost.

    Downloads go to `directory/v{version}/`, removed once loaded (the engines copy the
    weights in) unless `relay` passes them on, which keeps the newest `RELAY_VERSIONS`.
    Raises `WeightsRejected` if anything is wrong; the engine is then unchanged.
    """
    started = time.perf_counter()
    target = Path(directory) / f"v{manifest.version}"
    kept = False
    try:
        paths, source = await fetch_shards(js, manifest, target, relay=relay, http=http)
        fetched = time.perf_counter()
        await engine.load_weights(paths, manifest.version)
        kept = relay is not None and source.startswith("http")
    except (ShardError, ValueError, FileNotFoundError) as e:
        raise WeightsRejected(manifest.version, str(e)) from e
    finally:
        if relay is not None and kept:
            relay.forget(RELAY_VERSIONS)
        elif relay is not None:
            relay.drop(manifest.version)
        if not kept:
            shutil.rmtree(target, ignore_errors=True)
    done = time.perf_counter()
    return {
        "version": manifest.version,
        "source": source,
        "bytes": manifest.total_bytes,
        "fetch_seconds": fetched - started,
        "load_seconds": done - fetched,
    }
