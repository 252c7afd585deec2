"""Loading a published weight version through a real nats-server: store, shared volume, refusals."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actors.hf_engine import HfEngine
from actors.weights import WeightsRejected, download_shards, load_manifest
from learner.weights import publish_weights, write_shards
from pipeline.tiny_model import TinySpec, save_tiny_model
from protocol.config import BusConfig
from protocol.messages import Sampling
from protocol.names import OBJECT_STORE_WEIGHTS
from protocol.streams import connect, ensure_streams
from protocol.weights import object_name, verify_shard

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = "Q:123+456="


async def _publish(js, model, directory, version, *, shared=False):
    # ~40 KiB per shard: the tiny model's 650 KB become many shards, fetched in parallel.
    shards = write_shards(model, directory, "float32", shard_mb=0.04, shared=shared)
    assert len(shards) > 5
    return await publish_weights(
        js, directory, shards, version=version, step=version, dtype="float32", keep_versions=3
    )


def _weights(engine):
    return {n: p.detach().clone() for n, p in engine.model.state_dict().items()}


async def test_store_path_loads_the_new_version(js, tiny_model_dir, new_model, tmp_path):
    engine = HfEngine(tiny_model_dir)
    manifest = await _publish(js, new_model, tmp_path / "learner" / "v1", version=1)

    report = await load_manifest(engine, js, manifest, tmp_path / "actor")

    assert report["source"] == "store" and report["version"] == 1
    assert engine.version == 1
    for name, tensor in new_model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name
    assert not (tmp_path / "actor" / "v1").exists()  # downloads are removed once loaded
    group = await engine.generate(engine.tokenizer(PROMPT).input_ids, Sampling(max_tokens=8), 2)
    assert group.policy_version == 1


async def test_shared_volume_path_is_used_when_it_verifies(js, tiny_model_dir, new_model, tmp_path):
    engine = HfEngine(tiny_model_dir)
    manifest = await _publish(js, new_model, tmp_path / "shared" / "v2", version=2, shared=True)

    report = await load_manifest(engine, js, manifest, tmp_path / "actor")

    assert report["source"] == "shared" and engine.version == 2


async def test_corrupt_shared_file_falls_back_to_the_store(js, tiny_model_dir, new_model, tmp_path):
    engine = HfEngine(tiny_model_dir)
    manifest = await _publish(js, new_model, tmp_path / "shared" / "v3", version=3, shared=True)
    path = Path(manifest.shards[0].path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    report = await load_manifest(engine, js, manifest, tmp_path / "actor")

    assert report["source"] == "store" and engine.version == 3


async def test_corrupt_shard_in_the_store_is_rejected(js, tiny_model_dir, new_model, tmp_path):
    engine = HfEngine(tiny_model_dir)
    before = _weights(engine)
    manifest = await _publish(js, new_model, tmp_path / "learner" / "v4", version=4)
    # Same name and size, one byte flipped: only our sha256 check can tell.
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    name = object_name(4, manifest.shards[-1].name)
    data = bytearray((await store.get(name)).data)
    data[-1] ^= 0xFF
    await store.put(name, bytes(data))

    with pytest.raises(WeightsRejected, match="sha256 mismatch"):
        await load_manifest(engine, js, manifest, tmp_path / "actor")

    assert engine.version == 0
    after = _weights(engine)
    assert all(torch.equal(before[n], after[n]) for n in before)


async def test_missing_shard_is_rejected(js, tiny_model_dir, new_model, tmp_path):
    engine = HfEngine(tiny_model_dir)
    prompt = engine.tokenizer(PROMPT).input_ids
    sampling = Sampling(max_tokens=8, seed=0)
    served = await engine.generate(prompt, sampling, 2)
    manifest = await _publish(js, new_model, tmp_path / "learner" / "v5", version=5)
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    await store.delete(object_name(5, manifest.shards[2].name))

    with pytest.raises(WeightsRejected, match="not in the store"):
        await load_manifest(engine, js, manifest, tmp_path / "actor")

    still = await engine.generate(prompt, sampling, 2)
    assert engine.version == still.policy_version == 0
    for a, b in zip(served.samples, still.samples, strict=True):
        np.testing.assert_array_equal(a.logprobs, b.logprobs)


async def test_weights_of_another_model_are_rejected(js, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    engine = HfEngine(tiny_model_dir)
    wider = AutoModelForCausalLM.from_pretrained(
        save_tiny_model(tmp_path / "wider", TinySpec(hidden_size=128))
    )
    manifest = await _publish(js, wider, tmp_path / "learner" / "v6", version=6)

    with pytest.raises(WeightsRejected, match="shape"):
        await load_manifest(engine, js, manifest, tmp_path / "actor")

    assert engine.version == 0


async def test_bytes_that_differ_from_the_recorded_digest_are_refused_whole(
    js, tiny_model_dir, new_model, tmp_path
):
    """The store's metadata says the right size and sha256, the chunks it serves are other
    bytes (a corrupt chunk on the server's disk, a bad relay): the hash taken while receiving
    refuses the shard, no file of the version is left, and the engine keeps its version."""
    engine = HfEngine(tiny_model_dir)
    before = _weights(engine)
    manifest = await _publish(js, new_model, tmp_path / "learner" / "v7", version=7)
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    target = object_name(7, manifest.shards[1].name)
    good = await store.get_info(target)
    data = bytearray((await store.get(target)).data)
    data[len(data) // 2] ^= 0xFF
    bad = await store.put("scratch/corrupt", bytes(data))
    # Point the shard's metadata at the corrupt chunks, keeping its recorded digest.
    info = bad.as_dict()
    info.update(name=target, digest=good.digest)
    meta_subject = (
        f"$O.{OBJECT_STORE_WEIGHTS}.M." + base64.urlsafe_b64encode(target.encode()).decode()
    )
    await js.publish(meta_subject, json.dumps(info).encode(), headers={"Nats-Rollup": "sub"})

    with pytest.raises(WeightsRejected, match="sha256 mismatch .* received"):
        await load_manifest(engine, js, manifest, tmp_path / "actor")

    assert engine.version == 0
    after = _weights(engine)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not (tmp_path / "actor" / "v7").exists()


async def test_three_actors_fetch_one_version_at_once(
    nats_server, new_model, tmp_path, monkeypatch
):
    """Fan-out through the server: the learner uploads a version once; three actors, each on its
    own connection, download it at the same time through the actors' code path, every shard in
    several chunks, and each gets every byte verified."""
    import protocol.weights

    monkeypatch.setattr(protocol.weights, "OBJECT_CHUNK_BYTES", 8 << 10)  # 40 KiB shards: 5 chunks
    config = BusConfig(url=nats_server.url)
    learner_nc = await connect(config)
    learner_js = learner_nc.jetstream()
    await ensure_streams(learner_js, config)
    manifest = await _publish(learner_js, new_model, tmp_path / "learner" / "v8", version=8)
    store = await learner_js.object_store(OBJECT_STORE_WEIGHTS)
    assert (await store.get_info(object_name(8, manifest.shards[0].name))).chunks >= 4

    actors = [await connect(config) for _ in range(3)]
    try:
        results = await asyncio.gather(
            *(
                download_shards(nc.jetstream(), manifest, tmp_path / f"actor{i}")
                for i, nc in enumerate(actors)
            )
        )
    finally:
        for nc in actors:
            await nc.close()
        await learner_nc.close()

    for paths in results:
        assert [p.name for p in paths] == [s.name for s in manifest.shards]
        for path, shard in zip(paths, manifest.shards, strict=True):
            verify_shard(path, shard)  # re-read and re-hashed from disk, independently
    tensors = {n: t for p in results[2] for n, t in load_file(p).items()}
    for name, tensor in new_model.state_dict().items():
        if name in tensors:
            assert torch.equal(tensors[name], tensor), name
