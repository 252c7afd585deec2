"""Weights over HTTP with relays, through a real nats-server: fan-out, refusals, fallback."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from actors.hf_engine import HfEngine
from actors.weights import WeightsRejected, download_shards, load_manifest
from learner.weights import StoreUploads, publish_weights, write_shards
from protocol.messages import Shard
from protocol.names import OBJECT_STORE_WEIGHTS
from protocol.weight_server import WeightServer, WeightServerConfig, fetch_shard
from protocol.weights import ShardError, object_name, verify_shard

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LOCAL = dict(host="127.0.0.1", advertise=None, stall_s=5.0)


def server(fanout: int = 2) -> WeightServer:
    return WeightServer(WeightServerConfig(fanout=fanout, **LOCAL)).start()


async def publish(js, model, directory: Path, version: int, learner: WeightServer, uploads=None):
    """Publish `model` as `version`, served by `learner`; the store copy in the background
    through `uploads`, else before this returns."""
    shards = write_shards(model, directory, "float32", shard_mb=0.1)  # ~100 KiB: 7 shards
    assert len(shards) > 4
    return await publish_weights(
        js,
        directory,
        shards,
        version=version,
        step=version,
        dtype="float32",
        keep_versions=2,
        server=learner,
        uploads=uploads,
    )


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


async def loads_once_uploaded(loading, uploads, engine, new_model, *, after_s: float) -> None:
    """`loading` (HTTP failed) still waits for the paused store copy after `after_s`, and
    loads `new_model` from the store once `uploads` resumes."""
    await asyncio.sleep(after_s)
    assert not loading.done() and engine.version == 0  # waiting, not refusing
    uploads.resume()
    report = await asyncio.wait_for(loading, 60)
    assert report["source"] == "http+store" and engine.version == 1
    for name, tensor in new_model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name
    assert await uploads.drain(60)


def one_shard(data: bytes) -> Shard:
    """The manifest entry of a shard file holding `data`."""
    return Shard(
        name="s.safetensors",
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        tensors=["w"],
    )


def tell_when_waited_on(entry) -> threading.Event:
    """An event set once a relay's handler waits for `entry`'s bytes."""
    waiting = threading.Event()
    wait_beyond = entry.wait_beyond

    def wait_and_tell(sent: int, timeout: float) -> int:
        waiting.set()
        return wait_beyond(sent, timeout)

    entry.wait_beyond = wait_and_tell
    return waiting


async def test_three_actors_relay_so_the_learner_sends_one_copy(js, new_model, tmp_path):
    """Fan-out 1: the learner sends the version to the first actor only and redirects the
    others, who are chained behind it (learner -> a -> b -> c): the learner's outbound bytes are
    one version whatever the actor count, and every actor ends with every shard verified."""
    learner = server(fanout=1)
    relays = [server(fanout=1) for _ in range(3)]
    try:
        manifest = await publish(js, new_model, tmp_path / "learner" / "v1", 1, learner)
        assert manifest.sources == [learner.url]
        assert not (tmp_path / "learner" / "v1").exists()  # the server took the files over
        results = await asyncio.gather(
            *(
                download_shards(js, manifest, tmp_path / f"actor{i}", relay=relay)
                for i, relay in enumerate(relays)
            )
        )
        for paths in results:
            for path, shard in zip(paths, manifest.shards, strict=True):
                verify_shard(path, shard)  # re-read and re-hashed from disk
        total = manifest.total_bytes
        assert learner.sent_bytes == total
        assert sorted(r.sent_bytes for r in relays) == [0, total, total]
    finally:
        for s in (learner, *relays):
            s.close()


async def test_actor_loads_over_http_and_keeps_relaying_two_versions(
    js, tiny_model_dir, new_model, tmp_path
):
    learner, relay = server(), server()
    engine = HfEngine(tiny_model_dir)
    try:
        for version in (1, 2, 3):
            manifest = await publish(
                js, new_model, tmp_path / "learner" / f"v{version}", version, learner
            )
            report = await load_manifest(engine, js, manifest, tmp_path / "actor", relay=relay)
            assert report["source"] == "http" and engine.version == version
        for name, tensor in new_model.state_dict().items():
            assert torch.equal(engine.model.state_dict()[name], tensor), name
        # The actor passes on the version it serves and the one before; older ones are gone.
        assert sorted(p.name for p in (tmp_path / "actor").iterdir()) == ["v2", "v3"]
        shard = manifest.shards[0]
        path = f"/{learner.token}/v3/{shard.name}"
        with urllib.request.urlopen(relay.base + path) as response:
            assert response.read() == (tmp_path / "actor" / "v3" / shard.name).read_bytes()
    finally:
        learner.close()
        relay.close()


async def test_a_corrupt_file_over_http_comes_from_the_store(
    js, tiny_model_dir, new_model, tmp_path
):
    learner = server()
    engine = HfEngine(tiny_model_dir)
    try:
        manifest = await publish(js, new_model, tmp_path / "learner" / "v1", 1, learner)
        flip_last_byte(tmp_path / "learner" / "v1-served" / manifest.shards[1].name)

        report = await load_manifest(engine, js, manifest, tmp_path / "actor")

        assert report["source"] == "http+store" and engine.version == 1
        for name, tensor in new_model.state_dict().items():
            assert torch.equal(engine.model.state_dict()[name], tensor), name
    finally:
        learner.close()


async def test_corrupt_everywhere_is_refused_and_the_old_version_served(
    js, tiny_model_dir, new_model, tmp_path
):
    learner = server()
    engine = HfEngine(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in engine.model.state_dict().items()}
    try:
        manifest = await publish(js, new_model, tmp_path / "learner" / "v1", 1, learner)
        shard = manifest.shards[-1]
        flip_last_byte(tmp_path / "learner" / "v1-served" / shard.name)
        store = await js.object_store(OBJECT_STORE_WEIGHTS)
        data = bytearray((await store.get(object_name(1, shard.name))).data)
        data[-1] ^= 0xFF
        await store.put(object_name(1, shard.name), bytes(data))

        with pytest.raises(WeightsRejected, match="sha256 mismatch"):
            await load_manifest(engine, js, manifest, tmp_path / "actor")

        assert engine.version == 0
        after = engine.model.state_dict()
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert not (tmp_path / "actor" / "v1").exists()
    finally:
        learner.close()


async def test_a_learner_that_is_gone_leaves_the_store(js, tiny_model_dir, new_model, tmp_path):
    learner = server()
    manifest = await publish(js, new_model, tmp_path / "learner" / "v1", 1, learner)
    learner.close()
    engine = HfEngine(tiny_model_dir)

    report = await load_manifest(engine, js, manifest, tmp_path / "actor")

    assert report["source"] == "http+store" and engine.version == 1


async def test_an_actor_whose_http_fails_waits_for_the_store_upload(
    js, tiny_model_dir, new_model, tmp_path
):
    """The manifest is out before the store copy (held here); the learner's server is gone:
    the actor waits for the upload, and once it is stored takes the version from the store."""
    learner = server()
    uploads = StoreUploads(js, keep_versions=2)
    uploads.pause()
    manifest = await publish(js, new_model, tmp_path / "learner" / "v1", 1, learner, uploads)
    learner.close()
    engine = HfEngine(tiny_model_dir)
    http = WeightServerConfig(store_wait_s=60.0, **LOCAL)

    loading = asyncio.create_task(load_manifest(engine, js, manifest, tmp_path / "a", http=http))
    await loads_once_uploaded(loading, uploads, engine, new_model, after_s=1.5)


@pytest.mark.parametrize("why", ["never uploaded", "overtaken"])
async def test_a_version_the_store_never_gets_is_refused_after_the_wait(
    js, tiny_model_dir, new_model, tmp_path, why
):
    """HTTP fails and the store copy never comes (held past the actor's bound), or a newer
    version replaces it under `latest` first (its upload is then skipped): the version is
    refused whole, saying the store never had it, and the old version is still served."""
    learner = server()
    uploads = StoreUploads(js, keep_versions=2)
    uploads.pause()
    manifest = await publish(js, new_model, tmp_path / "learner" / "v1", 1, learner, uploads)
    if why == "overtaken":
        await publish(js, new_model, tmp_path / "learner" / "v2", 2, learner, uploads)
    learner.close()
    engine = HfEngine(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in engine.model.state_dict().items()}
    http = WeightServerConfig(store_wait_s=1.0 if why == "never uploaded" else 60.0, **LOCAL)

    started = asyncio.get_running_loop().time()
    with pytest.raises(WeightsRejected, match="the store never had"):
        await load_manifest(engine, js, manifest, tmp_path / "a", http=http)

    assert asyncio.get_running_loop().time() - started < 30
    assert engine.version == 0
    after = engine.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not (tmp_path / "a" / "v1").exists()
    assert not await uploads.drain(0.1)  # still held: cut here


@pytest.mark.parametrize("upload", ["arrives", "never"])
async def test_an_earlier_runs_object_of_the_same_name_is_not_the_upload(
    js, tiny_model_dir, new_model, tmp_path, upload
):
    """The store still holds v1 from an earlier learner run (same names, other bytes). A
    learner starting at version 0 removes it (`remove_stale_versions`, as `learner.loop.run`
    does); its own v1 is then announced before its store copy and HTTP fails: the actor waits
    for the upload instead of taking (and refusing) the old objects, loads the new v1 once it
    is stored, and without it is refused after the wait, saying the store never had it."""
    from transformers import AutoModelForCausalLM

    from learner.weights import remove_stale_versions

    earlier = server()
    old_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old = await publish(js, old_model, tmp_path / "earlier" / "v1", 1, earlier)  # stored
    earlier.close()
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    assert (await store.get_info(object_name(1, old.shards[0].name))).size == old.shards[0].bytes
    assert await remove_stale_versions(js, None, 0) == [1]
    learner = server()
    uploads = StoreUploads(js, keep_versions=2)
    uploads.pause()
    manifest = await publish(js, new_model, tmp_path / "learner" / "v1", 1, learner, uploads)
    learner.close()
    assert [s.name for s in old.shards] == [s.name for s in manifest.shards]
    assert [s.sha256 for s in old.shards] != [s.sha256 for s in manifest.shards]
    engine = HfEngine(tiny_model_dir)
    http = WeightServerConfig(store_wait_s=60.0 if upload == "arrives" else 1.0, **LOCAL)

    started = asyncio.get_running_loop().time()
    loading = asyncio.create_task(load_manifest(engine, js, manifest, tmp_path / "a", http=http))
    if upload == "never":
        with pytest.raises(WeightsRejected, match="never had object.*did not arrive within 1 s"):
            await asyncio.wait_for(loading, 30)
        assert asyncio.get_running_loop().time() - started >= 1.0  # it waited
        assert engine.version == 0 and not (tmp_path / "a" / "v1").exists()
        assert not await uploads.drain(0.1)
        return
    await loads_once_uploaded(loading, uploads, engine, new_model, after_s=1.0)


async def test_only_the_tokens_files_are_served(js, new_model, tmp_path):
    learner = server()
    try:
        manifest = await publish(js, new_model, tmp_path / "learner" / "v1", 1, learner)
        name = manifest.shards[0].name
        for path in (
            f"/{'0' * 32}/v1/{name}",  # another token
            f"/{learner.token}/v2/{name}",  # a version not served
            f"/{learner.token}/v1/..%2f..%2fetc%2fpasswd",
            f"/{learner.token}/v1/../v1/{name}",
        ):
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(learner.base + path)
        # Bytes that are not the shard's (another file here) are refused, nothing is left.
        with pytest.raises(ShardError, match="bytes offered|sha256 mismatch"):
            fetch_shard(
                f"{learner.url}/v1/{name}",
                manifest.shards[1],  # the wrong shard: size differs or the sha256 does
                tmp_path / "x",
            )
        assert not (tmp_path / "x").exists()
    finally:
        learner.close()


async def test_an_actor_joining_mid_run_loads_latest_over_http_and_relays_it(
    bus, tiny_model_dir, new_model, tmp_path
):
    """An actor started after two versions were published loads `latest` (v2) over HTTP,
    then passes it on: a second actor, redirected to it by a learner with fan-out 1, gets
    every byte from the first actor and none from the learner."""
    from actors.config import ActorConfig
    from actors.service import Actor, latest_manifest
    from protocol.names import KV_POLICY

    learner = server(fanout=1)
    actors = []
    try:
        for version in (1, 2):
            await publish(bus.js, new_model, tmp_path / "learner" / f"v{version}", version, learner)
        sent_before = learner.sent_bytes
        kv = await bus.js.key_value(KV_POLICY)
        for i in range(2):
            config = ActorConfig(
                model=str(tiny_model_dir),
                backend="hf",
                download_dir=str(tmp_path / f"actor{i}"),
                weight_server=LOCAL,
            )
            actors.append(Actor(config, HfEngine(tiny_model_dir), None, bus))
            assert await actors[i].serve(await latest_manifest(kv))
            assert actors[i].engine.version == 2
        manifest = await latest_manifest(kv)
        assert learner.sent_bytes - sent_before == manifest.total_bytes  # the first actor's copy
        assert actors[0].relay.sent_bytes == manifest.total_bytes  # the second actor's
        for name, tensor in new_model.state_dict().items():
            assert torch.equal(actors[1].engine.model.state_dict()[name], tensor), name
    finally:
        for actor in actors:
            actor.close()
        learner.close()


def test_a_shard_of_many_chunks_arrives_whole_and_a_flipped_byte_is_refused(tmp_path, monkeypatch):
    """A shard of 17 chunks and a bit (64 KiB reads): the chunks alternate between two buffers
    while the one before is hashed, so every byte must land in order, through a relay too; a
    byte flipped in a middle chunk fails the sha256 and leaves nothing behind."""
    from protocol import weight_server

    monkeypatch.setattr(weight_server, "READ_BYTES", 64 << 10)
    data = bytes(range(256)) * (17 * 256) + b"tail!"  # 17 x 64 KiB + 5 bytes
    folder = tmp_path / "learner"
    folder.mkdir()
    (folder / "s.safetensors").write_bytes(data)
    shard = one_shard(data)
    learner, relay = server(fanout=1), server(fanout=1)
    try:
        learner.offer(1, folder, [shard], owned=False)
        entries = relay.receiving(learner.token, 1, tmp_path / "a", [shard])
        (tmp_path / "a").mkdir()
        url = f"{learner.url}/v1/s.safetensors"
        fetch_shard(
            url, shard, tmp_path / "a" / shard.name, relay=relay.base, entry=entries[shard.name]
        )
        assert (tmp_path / "a" / shard.name).read_bytes() == data
        # A second requester is redirected by the learner to the relay, which sends it all.
        (tmp_path / "b").mkdir()
        fetch_shard(url, shard, tmp_path / "b" / shard.name, relay="http://127.0.0.1:9")
        assert (tmp_path / "b" / shard.name).read_bytes() == data
        assert learner.sent_bytes == relay.sent_bytes == len(data)

        flipped = bytearray(data)
        flipped[8 * (64 << 10) + 3] ^= 0x01  # in the ninth chunk
        (folder / "s.safetensors").write_bytes(bytes(flipped))
        with pytest.raises(ShardError, match="sha256 mismatch"):
            fetch_shard(url, shard, tmp_path / "c", relay=relay.base)
        assert not (tmp_path / "c").exists()
    finally:
        learner.close()
        relay.close()


@pytest.mark.parametrize("then", ["bytes arrive", "its fetch fails"])
def test_a_relay_asked_before_its_own_fetch_began_waits_for_the_first_bytes(tmp_path, then):
    """A relay is asked for a shard before its own fetch of it has an answer (no file yet, no
    byte: in a chain learner -> a -> b the second shard's requests reach a at once). It waits
    for the first bytes and passes them on, rather than answering the full length with no body
    (which the requester took for a failed source: "cut off after 0 bytes"); if its own fetch
    fails instead, the requester is cut off and falls back as before, nothing left behind."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    data = bytes(range(256)) * 1024 + b"tail!"
    shard = one_shard(data)
    token = "ab" * 16
    relay = server(fanout=1)
    folder = tmp_path / "a"
    folder.mkdir()
    try:
        entry = relay.receiving(token, 1, folder, [shard])[shard.name]
        waiting = tell_when_waited_on(entry)
        with ThreadPoolExecutor(1) as pool:
            url = f"{relay.base}/{token}/v1/{shard.name}"
            fetch = pool.submit(fetch_shard, url, shard, tmp_path / "b")
            fetch.add_done_callback(lambda _: waiting.set())
            assert waiting.wait(10)
            assert not fetch.done(), fetch.exception()  # before the fix: cut off after 0 bytes
            if then == "its fetch fails":
                entry.fail()
                with pytest.raises(ShardError, match="cut off after 0 bytes"):
                    fetch.result(10)
                assert not (tmp_path / "b").exists() and relay.sent_bytes == 0
                return
            # What the relay's own fetch does (`_receive`): create, write, advance.
            fd = os.open(folder / shard.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for start in range(0, len(data), 100_000):
                    os.write(fd, data[start : start + 100_000])
                    entry.advance(min(start + 100_000, len(data)))
            finally:
                os.close(fd)
            fetch.result(10)
        assert (tmp_path / "b").read_bytes() == data
        assert relay.sent_bytes == len(data)
    finally:
        relay.close()


def test_a_version_registered_again_cuts_off_the_requesters_of_the_first(tmp_path):
    """An actor that registers a version it already relays (a second fetch of it) replaces
    the first registration: a requester waiting there for bytes is cut off at once and falls
    back, rather than after the stall limit, and the first folder is gone."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    shard = one_shard(b"w" * 4096)
    token = "cd" * 16
    relay = server(fanout=1)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    try:
        entry = relay.receiving(token, 1, first, [shard])[shard.name]
        waiting = tell_when_waited_on(entry)
        with ThreadPoolExecutor(1) as pool:
            url = f"{relay.base}/{token}/v1/{shard.name}"
            fetch = pool.submit(fetch_shard, url, shard, tmp_path / "b")
            assert waiting.wait(10)
            began = time.monotonic()
            relay.receiving(token, 1, second, [shard])
            with pytest.raises(ShardError, match="cut off after 0 bytes"):
                fetch.result(10)
            assert time.monotonic() - began < LOCAL["stall_s"] / 2
        assert not first.exists() and second.exists()
        assert relay.entry(token, 1, shard.name) is not entry
    finally:
        relay.close()
