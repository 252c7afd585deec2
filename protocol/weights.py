"""Weight shards on disk and in the object store: names, index, checksums, download.

Shared by the learner (which writes and publishes shards) and the actors (which download,
verify and load them). No torch at import time: actors depend only on `protocol`.

Layout of version `v` (DESIGN.md, "Weights"): objects `v{v}/model-0000k-of-0000n.safetensors`
plus `v{v}/model.safetensors.index.json` (HF's format: `{"metadata": {"total_size": ...},
"weight_map": {tensor: file}}`) in the object store `aha-weights`; the `WeightManifest` at KV
`aha-policy` / `latest` names them with their sha256 and size.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from protocol.messages import Shard, WeightManifest
from protocol.names import OBJECT_STORE_WEIGHTS

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


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def describe_shard(path: str | Path, tensors: Sequence[str], *, shared: bool = False) -> Shard:
    """The manifest entry of a written shard file; `shared=True` records its absolute path."""
    path = Path(path)
    return Shard(
        name=path.name,
        sha256=sha256_file(path),
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
        raise ShardError(f"shard {shard.name}: {path} has {size} bytes, the manifest says {shard.bytes}")
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


def read_index(path: str | Path) -> dict[str, str]:
    """Tensor name -> shard file name, from an HF index file (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    return json.loads(path.read_text())["weight_map"]


def iter_tensors(paths: Sequence[str | Path], device: str = "cpu") -> Iterator[tuple[str, Any]]:
    """`(name, torch.Tensor)` for every tensor in the given shard files, one at a time.

    The form vLLM's `load_weights` and `model.load_state_dict(strict=False)` take; torch is
    imported by safetensors only when this runs.
    """
    from safetensors import safe_open

    for path in paths:
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


async def download_weights(js, manifest: WeightManifest, directory: str | Path) -> list[Path]:
    """Fetch and verify every shard (and the index) of `manifest` into `directory`.

    Streams each object to its file (`get(..., writeinto=)`: an in-memory `get` is quadratic
    in nats-py). Raises `ShardError` if a shard does not match the manifest. Returns the
    shard paths in manifest order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    paths = []
    for name in [s.name for s in manifest.shards] + [manifest.index_name]:
        with open(directory / name, "wb") as f:
            await store.get(object_name(manifest.version, name), writeinto=f)
    for shard in manifest.shards:
        verify_shard(directory / shard.name, shard)
        paths.append(directory / shard.name)
    return paths


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
