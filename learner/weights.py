"""Weight broadcast: full weights -> safetensors shards -> object store (+ HTTP) -> `latest`.

`write_shards` runs on every rank (ZeRO-3 gathers each parameter with a collective) and
writes on rank 0; `publish_weights` runs on rank 0 and makes the version visible to actors as
soon as they can fetch all of it: served over HTTP (`protocol.weight_server`, started with the
learner by `weight_server`), the manifest goes out at once and the object-store copy (the
actors' fallback) follows in the background (`StoreUploads`); without the HTTP server every
object is stored first. `export_model` writes an HF folder `from_pretrained` loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from nats.errors import Error as NatsError
from safetensors.torch import save_file

from learner.metrics import WEIGHT_STORE_UPLOAD_SECONDS
from protocol.codec import encode
from protocol.messages import Shard, WeightManifest
from protocol.names import KEY_LATEST, KV_POLICY, OBJECT_STORE_WEIGHTS
from protocol.weight_server import WeightServer, WeightServerConfig
from protocol.weights import (
    INDEX_NAME,
    describe_shard,
    object_name,
    object_version,
    plan_shards,
    shard_name,
    upload_file,
    write_index,
)

log = structlog.get_logger("learner.weights")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _stored_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters (tied ones once, as `save_pretrained` stores them) and persistent buffers."""
    keys = set(module.state_dict().keys())
    params = list(module.named_parameters())
    buffers = [(n, b) for n, b in module.named_buffers() if n in keys]
    return params + buffers


def _numel(t: torch.Tensor) -> int:
    return getattr(t, "ds_numel", t.numel())  # ZeRO-3 parameters are empty until gathered


def _gathered(
    tensors: list[tuple[str, torch.Tensor]], out: torch.Tensor | None
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Each tensor in full, one parameter gathered at a time (ZeRO-3), cast into consecutive
    parts of the flat CPU tensor `out` (its dtype is the serving dtype); None where `out` is
    None (a rank that writes nothing)."""
    offset = 0
    for name, t in tensors:
        if hasattr(t, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                full = _cast_into(t, out, offset)
        else:
            full = _cast_into(t, out, offset)
        offset += _numel(t)
        yield name, full


def _cast_into(t: torch.Tensor, out: torch.Tensor | None, offset: int) -> torch.Tensor | None:
    if out is None:
        return None
    return out[offset : offset + t.numel()].view(t.shape).copy_(t.detach())


def write_shards(
    module: torch.nn.Module,
    directory: str | Path,
    dtype: str,
    shard_mb: float,
    *,
    rank: int = 0,
    shared: bool = False,
) -> list[Shard]:
    """Write `module`'s full weights in `dtype` as safetensors shards plus an HF index.

    Shards hold at most `shard_mb` MiB of tensor data (a larger single tensor gets its own
    shard). Every rank must call this (ZeRO-3 gathers are collective); rank 0 writes and
    returns the manifest entries (with absolute paths when `shared`), other ranks return [].
    """
    torch_dtype = DTYPES[dtype]
    tensors = _stored_tensors(module)
    by_name = dict(tensors)
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    sizes = [(name, _numel(t) * itemsize) for name, t in tensors]
    plan = plan_shards(sizes, max(1, int(shard_mb * 2**20)))
    directory = Path(directory)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    # One buffer for every shard: casting into memory already touched cost 0.35 CPU s/GB
    # here, into fresh memory 0.85 (a page fault per 4 KiB).
    largest = max(sum(_numel(by_name[n]) for n in names) for names in plan) if plan else 0
    out = torch.empty(largest, dtype=torch_dtype) if rank == 0 else None
    # Each shard is hashed in a thread while the next is gathered, cast and written.
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        described = []
        for i, names in enumerate(plan):
            full = dict(_gathered([(n, by_name[n]) for n in names], out))
            if rank != 0:
                continue
            path = directory / shard_name(i, len(plan))
            tensors = {n: t.contiguous() for n, t in full.items()}
            save_file(tensors, str(path), metadata={"format": "pt"})
            described.append(hasher.submit(describe_shard, path, names, shared=shared))
        shards = [future.result() for future in described]
    if rank == 0:
        write_index(directory, shards, sum(nbytes for _, nbytes in sizes))
    return shards


_SERVERS: dict[WeightServerConfig, WeightServer] = {}


def weight_server(config: WeightServerConfig) -> WeightServer | None:
    """This process's HTTP server of weight versions, started on first use; None when off."""
    if not config.enabled:
        return None
    if config not in _SERVERS:
        _SERVERS[config] = WeightServer(config).start()
    return _SERVERS[config]


async def publish_weights(
    js,
    directory: str | Path,
    shards: list[Shard],
    *,
    version: int,
    step: int,
    dtype: str,
    keep_versions: int,
    server: WeightServer | None = None,
    uploads: StoreUploads | None = None,
    policy: str = "",
    model: str | None = None,
) -> WeightManifest:
    """Point `policy/latest` at version `version` as soon as actors can fetch all of it.

    Without a `server`, every shard and the index go to the object store under `v{version}/`
    first and the manifest is written after the last object is stored; then all but the
    newest `keep_versions` versions are deleted from the store. With one, the version is
    served over HTTP (`serve`) and the manifest, naming the server (`sources`) and saying
    that the store copy follows (`stored=False`), is written at once: the upload (and the
    pruning) comes after it, in the background through `uploads` (`StoreUploads`), or, when
    `uploads` is None, before this returns. The manifest also names the learner's `policy`
    and the folder it started from (`model`).
    """
    directory = Path(directory)
    started = time.perf_counter()
    if server is None:
        await upload_version(js, directory, shards, version)
    else:
        directory = serve(server, directory, shards, version, keep_versions)
    manifest = WeightManifest(
        version=version,
        step=step,
        shards=shards,
        dtype=dtype,
        sources=[] if server is None else [server.url],
        stored=server is None,
        policy=policy,
        model=model,
    )
    kv = await js.key_value(KV_POLICY)
    await kv.put(KEY_LATEST, encode(manifest))
    seconds = time.perf_counter() - started
    if server is None:
        store = await js.object_store(OBJECT_STORE_WEIGHTS)
        log_published(manifest, seconds, pruned_versions=await prune_versions(store, keep_versions))
    elif uploads is not None:
        log_published(manifest, seconds)
        uploads.submit(version, directory, shards)
    else:
        log_published(manifest, seconds)
        await StoreUploads(js, keep_versions).submit(version, directory, shards).drain(None)
    return manifest


def log_published(manifest: WeightManifest, seconds: float, **more) -> None:
    """The line of a version made visible, `seconds` after its publish began."""
    log.info(
        "weights published",
        version=manifest.version,
        step=manifest.step,
        shards=len(manifest.shards),
        bytes=manifest.total_bytes,
        seconds=round(seconds, 3),
        mb_per_s=round(manifest.total_bytes / 2**20 / max(seconds, 1e-9), 1),
        stored=manifest.stored,
        http=manifest.sources[0] if manifest.sources else None,
        **more,
    )


async def upload_version(js, directory: Path, shards: list[Shard], version: int) -> float:
    """Put `directory`'s shards and index into the object store as `version`; the seconds."""
    started = time.perf_counter()
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    # All objects at once, each with its chunks pipelined, hashed once (in `describe_shard`).
    await asyncio.gather(
        upload_file(js, store, object_name(version, INDEX_NAME), directory / INDEX_NAME),
        *(
            upload_file(js, store, object_name(version, s.name), directory / s.name, s.sha256)
            for s in shards
        ),
    )
    seconds = time.perf_counter() - started
    WEIGHT_STORE_UPLOAD_SECONDS.set(seconds)
    return seconds


def serve(
    server: WeightServer, directory: Path, shards: list[Shard], version: int, keep_versions: int
) -> Path:
    """Hand `directory`'s shards to `server` as `version` (a folder of its own is moved aside;
    a shared volume's stays where it is), keep its newest `keep_versions`; the folder served.
    Called again for the same folder (a publish retried), it serves the folder moved before."""
    shared = all(s.path for s in shards)
    folder = directory if shared else Path(f"{directory}-served")
    if not shared and not folder.exists():
        directory.rename(folder)
    server.offer(version, folder, shards, owned=not shared)
    server.forget(keep_versions)
    return folder


STORE_RETRY_S = 30.0
"""A background upload that keeps failing (server away) is retried with back-off up to this
delay, unless a newer version is waiting (newest wins)."""


@dataclass
class _Upload:
    version: int
    folder: Path
    """Hard links to the version's files: this upload's own, deleted when it ends."""
    shards: list[Shard]


class StoreUploads:
    """The object-store copies of versions already served over HTTP, uploaded after their
    manifests in the background while the learner trains.

    One upload at a time, newest wins: a version submitted while another uploads waits, and
    one that a newer version overtakes before its upload began is skipped (logged). Each
    upload reads hard links to the version's files in a folder of its own, taken at `submit`,
    so the server forgetting the version (or `prune_dirs` on a shared volume) cannot delete
    them while they are read. After each upload the store keeps its newest `keep_versions`
    versions. `uploaded` and `skipped` list the versions so far.
    """

    def __init__(self, js, keep_versions: int):
        self.js = js
        self.keep_versions = keep_versions
        self.uploaded: list[int] = []
        self.skipped: list[int] = []
        self._pending: _Upload | None = None
        self._task: asyncio.Task | None = None
        self._go = asyncio.Event()
        self._go.set()

    def submit(self, version: int, directory: Path, shards: list[Shard]) -> StoreUploads:
        """Upload `directory`'s files as `version` once the running upload (if any) ends."""
        try:
            job = _Upload(version, link_files(Path(directory), shards), shards)
        except OSError as e:  # the manifest is out: the learner goes on, actors use HTTP
            log.error("store upload impossible", version=version, error=repr(e))
            return self
        if self._pending is not None:
            log.info("store upload skipped", version=self._pending.version, overtaken_by=version)
            self.skipped.append(self._pending.version)
            shutil.rmtree(self._pending.folder, ignore_errors=True)
        self._pending = job
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="weights-store-upload")
        return self

    def pause(self) -> None:
        """Hold the next upload before its first byte (until `resume`): tests use it."""
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    async def drain(self, timeout: float | None) -> bool:
        """Wait up to `timeout` s (None: as long as it takes) for the running upload and the
        one waiting; past it they are cancelled (an object cut short is purged: absent, never
        partial). Whether every upload ended."""
        if self._task is None or self._task.done():
            return True
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            log.warning("store upload cut short at shutdown", waited_s=timeout)
        return bool(done)

    async def _run(self) -> None:
        try:
            while self._pending is not None:
                job, self._pending = self._pending, None
                try:
                    await self._go.wait()
                    await self._upload(job)
                except Exception as e:  # noqa: BLE001 (a background task: nobody else sees it)
                    log.error("store upload failed", version=job.version, error=repr(e))
                finally:
                    shutil.rmtree(job.folder, ignore_errors=True)
        finally:
            if self._pending is not None:  # cancelled: the waiting version is dropped too
                shutil.rmtree(self._pending.folder, ignore_errors=True)
                self._pending = None

    async def _upload(self, job: _Upload) -> None:
        """Store `job`'s version (retrying while the server is away and nothing newer waits),
        prune the store, log one line."""
        delay = 0.5
        while True:
            try:
                seconds = await upload_version(self.js, job.folder, job.shards, job.version)
                break
            except (TimeoutError, NatsError) as e:
                if self._pending is not None or delay > STORE_RETRY_S:
                    raise
                log.warning("store upload failed: retrying", error=repr(e), delay=delay)
                await asyncio.sleep(delay)
                delay *= 2
        store = await self.js.object_store(OBJECT_STORE_WEIGHTS)
        pruned = await prune_versions(store, self.keep_versions)
        self.uploaded.append(job.version)
        nbytes = sum(s.bytes for s in job.shards)
        log.info(
            "weights stored",
            version=job.version,
            bytes=nbytes,
            seconds=round(seconds, 3),
            mb_per_s=round(nbytes / 2**20 / max(seconds, 1e-9), 1),
            pruned_versions=pruned,
        )


UPLOAD_MARK = "-upload-"
UPLOAD_FOLDER = re.compile(rf"\.v\d+{UPLOAD_MARK}\w+")
"""The hidden folder `link_files` makes beside a shared volume's `v{n}/` (tempfile's suffix)."""


def link_files(directory: Path, shards: list[Shard]) -> Path:
    """Hard links to `directory`'s shards and index in a new hidden folder beside it (the same
    file system: no bytes copied; copies where the file system has no hard links)."""
    folder = Path(tempfile.mkdtemp(prefix=f".{directory.name}{UPLOAD_MARK}", dir=directory.parent))
    for name in (INDEX_NAME, *(s.name for s in shards)):
        try:
            os.link(directory / name, folder / name)
        except OSError:
            shutil.copyfile(directory / name, folder / name)
    return folder


async def stored_versions(store) -> dict[int, list[str]]:
    """The store's objects by the version they belong to."""
    from nats.js.errors import NotFoundError

    try:
        infos = await store.list(ignore_deletes=True)
    except NotFoundError:  # an empty store
        return {}
    by_version: dict[int, list[str]] = {}
    for info in infos:
        v = object_version(info.name)
        if v is not None:
            by_version.setdefault(v, []).append(info.name)
    return by_version


async def prune_versions(store, keep_versions: int) -> list[int]:
    """Delete the objects of every version but the newest `keep_versions`; returns the versions deleted."""
    by_version = await stored_versions(store)
    old = sorted(by_version)[:-keep_versions]
    for v in old:
        for name in by_version[v]:
            await store.delete(name)
    return old


async def remove_stale_versions(js, weights_dir: str | Path | None, version: int) -> list[int]:
    """Delete the versions from `version` on, in the object store and on the shared volume:
    a learner starting at `version` publishes it at once and the later ones as it trains, so
    what is there under those numbers was left by a run that got further than the checkpoint
    this one resumes from (or by an earlier learner, before one starting at 0). Left there, an
    actor waiting for this run's store copy of a version would take the old objects for it
    and refuse them, and pruning the oldest versions would delete this run's instead. Returns
    the versions deleted."""
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    by_version = await stored_versions(store)
    stale = {v for v in by_version if v >= version}
    for v in sorted(stale):
        for name in by_version[v]:
            await store.delete(name)
    if weights_dir is not None and Path(weights_dir).is_dir():
        for v, folder in version_folders(weights_dir).items():
            if v >= version:
                shutil.rmtree(folder)
                stale.add(v)
    if stale:
        log.info("stale weight versions removed", versions=sorted(stale), from_version=version)
    return sorted(stale)


def prune_dirs(weights_dir: str | Path, keep_versions: int) -> list[int]:
    """On a shared volume, remove all `v{n}/` folders but the newest `keep_versions`."""
    folders = version_folders(weights_dir)
    old = sorted(folders)[:-keep_versions]
    for v in old:
        shutil.rmtree(folders[v], ignore_errors=True)
    return old


def version_folders(weights_dir: str | Path) -> dict[int, Path]:
    """The shared volume's `v{n}/` folders by version."""
    return {
        v: p
        for p in Path(weights_dir).glob("v*")
        if p.is_dir() and (v := object_version(p.name + "/")) is not None
    }


def remove_upload_leftovers(weights_dir: str | Path | None) -> int:
    """Remove the upload folders (`link_files`) a learner killed mid-upload left in the shared
    volume's `weights_dir`, `.v{n}-upload-*` and nothing else; how many. Called at start, before
    this learner uploads anything. (Without a shared volume they are in the system's temporary
    folder, which other processes share: left alone.)"""
    if not weights_dir or not Path(weights_dir).is_dir():
        return 0
    leftovers = [
        p
        for p in Path(weights_dir).iterdir()
        if UPLOAD_FOLDER.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    ]
    for folder in leftovers:
        shutil.rmtree(folder)
    if leftovers:
        log.info("upload leftovers removed", folders=len(leftovers), weights_dir=str(weights_dir))
    return len(leftovers)


def version_dir(weights_dir: str | None, version: int) -> tuple[Path, bool]:
    """Where version `version` is written: `{weights_dir}/v{version}` on a shared volume, else a
    fresh temporary folder (the caller deletes it after publishing). Returns `(dir, shared)`."""
    if weights_dir:
        return Path(weights_dir) / f"v{version}", True
    return Path(tempfile.mkdtemp(prefix=f"aha-weights-v{version}-")), False


def export_model(
    module: torch.nn.Module,
    directory: str | Path,
    dtype: str,
    shard_mb: float,
    *,
    rank: int = 0,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """A complete HF folder: shards + index + config.json (+ the tokenizer files of `tokenizer_from`).

    Every rank calls it (ZeRO-3); rank 0 writes.
    """
    directory = Path(directory)
    write_shards(module, directory, dtype, shard_mb, rank=rank)
    if rank != 0:
        return directory
    config = getattr(module, "config", None)
    if config is not None:
        config = config.__class__.from_dict(config.to_dict())
        config.dtype = dtype
        config.save_pretrained(directory)
        generation = getattr(module, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(directory)
    if tokenizer_from:
        source = Path(tokenizer_from)
        skip = {"config.json", "generation_config.json", INDEX_NAME}
        for path in source.iterdir():
            is_weights = path.suffix in {".safetensors", ".bin", ".pt"} or path.name in skip
            if path.is_file() and not is_weights:
                shutil.copy2(path, directory / path.name)
    return directory
