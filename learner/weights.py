"""Weight broadcast: full weights -> safetensors shards -> object store (+ HTTP) -> `latest`.

`write_shards` runs on every rank (ZeRO-3 gathers each parameter with a collective) and
writes on rank 0; `publish_weights` runs on rank 0, stores every object, serves the version
over HTTP (`protocol.weight_server`, started with the learner by `weight_server`) and only then
makes it visible to actors. `export_model` writes an HF folder `from_pretrained` loads.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog
import torch
from safetensors.torch import save_file

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
    policy: str = "",
    model: str | None = None,
) -> WeightManifest:
    """Upload version `version`, serve it, and only then point `policy/latest` at it; prune.

    Every shard and the index go to the object store under `v{version}/`. With a `server`,
    the version is served over HTTP too (`serve`) and the manifest names it (`sources`), as
    well as the learner's `policy` and the folder it started from (`model`). The manifest is
    written to the KV bucket after the last object is stored, so an actor that sees it can
    fetch every shard from either. Afterwards all but the newest `keep_versions` versions
    are deleted from the store.
    """
    directory = Path(directory)
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
    sources = [] if server is None else [serve(server, directory, shards, version, keep_versions)]
    manifest = WeightManifest(
        version=version,
        step=step,
        shards=shards,
        dtype=dtype,
        sources=sources,
        policy=policy,
        model=model,
    )
    kv = await js.key_value(KV_POLICY)
    await kv.put(KEY_LATEST, encode(manifest))
    deleted = await prune_versions(store, keep_versions)
    seconds = time.perf_counter() - started
    log.info(
        "weights published",
        version=version,
        step=step,
        shards=len(shards),
        bytes=manifest.total_bytes,
        seconds=round(seconds, 3),
        mb_per_s=round(manifest.total_bytes / 2**20 / max(seconds, 1e-9), 1),
        pruned_versions=deleted,
        http=sources[0] if sources else None,
    )
    return manifest


def serve(
    server: WeightServer, directory: Path, shards: list[Shard], version: int, keep_versions: int
) -> str:
    """Hand `directory`'s shards to `server` as `version` (a folder of its own is moved aside;
    a shared volume's stays where it is), keep its newest `keep_versions`; the source URL."""
    shared = all(s.path for s in shards)
    folder = directory if shared else directory.rename(f"{directory}-served")
    server.offer(version, folder, shards, owned=not shared)
    server.forget(keep_versions)
    return server.url


async def prune_versions(store, keep_versions: int) -> list[int]:
    """Delete the objects of every version but the newest `keep_versions`; returns the versions deleted."""
    from nats.js.errors import NotFoundError

    try:
        infos = await store.list(ignore_deletes=True)
    except NotFoundError:  # an empty store
        return []
    by_version: dict[int, list[str]] = {}
    for info in infos:
        v = object_version(info.name)
        if v is not None:
            by_version.setdefault(v, []).append(info.name)
    old = sorted(by_version)[:-keep_versions]
    for v in old:
        for name in by_version[v]:
            await store.delete(name)
    return old


def prune_dirs(weights_dir: str | Path, keep_versions: int) -> list[int]:
    """On a shared volume, remove all `v{n}/` folders but the newest `keep_versions`."""
    root = Path(weights_dir)
    versions = sorted(
        v for p in root.glob("v*") if p.is_dir() and (v := object_version(p.name + "/")) is not None
    )
    old = versions[:-keep_versions]
    for v in old:
        shutil.rmtree(root / f"v{v}", ignore_errors=True)
    return old


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
