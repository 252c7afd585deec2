"""Weight broadcast through a real NATS server: without HTTP objects first, then the manifest;
with HTTP the manifest first and the store copy after it, in the background; pruning."""

import asyncio

import pytest
import torch
from nats.js.errors import NotFoundError
from safetensors.torch import load_file

from actors.weights import download_shards
from learner.weights import StoreUploads, prune_dirs, publish_weights, write_shards
from protocol.codec import decode
from protocol.config import BusConfig
from protocol.messages import WeightManifest
from protocol.names import KEY_LATEST, KV_POLICY, OBJECT_STORE_WEIGHTS
from protocol.server import NatsServer
from protocol.streams import connect, ensure_streams
from protocol.weight_server import WeightServer, WeightServerConfig
from protocol.weights import (
    INDEX_NAME,
    check_object,
    local_shards,
    object_name,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.unit.learner.conftest import TINY_QWEN2

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**TINY_QWEN2))


@pytest.fixture
async def js(tmp_path):
    with NatsServer(tmp_path / "nats") as server:
        nc = await connect(BusConfig(url=server.url))
        js = nc.jetstream()
        await ensure_streams(js, BusConfig(url=server.url))
        yield js
        await nc.close()


async def test_manifest_appears_only_after_its_objects(js, tmp_path):
    """Without an HTTP server (weight_server off) the order is DESIGN.md's: store, then latest."""
    model = tiny_model()
    shards = write_shards(model, tmp_path / "v1", "float32", shard_mb=20 / 1024)
    assert len(shards) > 3
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    kv = await js.key_value(KV_POLICY)
    watcher = await kv.watch(KEY_LATEST)

    async def first_manifest_sighting():
        # The moment the manifest is visible, every object it names must already be stored.
        while True:
            entry = await watcher.updates(timeout=30)
            if entry is not None and entry.value:
                manifest = decode(entry.value, WeightManifest)
                infos = [await store.get_info(object_name(1, s.name)) for s in manifest.shards]
                await store.get_info(object_name(1, INDEX_NAME))
                return manifest, infos

    sighting = asyncio.create_task(first_manifest_sighting())
    published = await publish_weights(
        js, tmp_path / "v1", shards, version=1, step=10, dtype="float32", keep_versions=2
    )
    manifest, infos = await sighting
    await watcher.stop()
    assert manifest.version == 1 and manifest.step == 10 and manifest.stored
    assert [i.size for i in infos] == [s.bytes for s in published.shards]

    # An actor's view: download, verify the sha256s, load: the weights equal the learner's.
    paths = await download_shards(js, manifest, tmp_path / "actor")
    state = {n: t for p in paths for n, t in load_file(p).items()}
    for name, p in model.named_parameters():
        assert torch.equal(state[name], p.detach()), name


async def test_keep_versions_prunes_older_objects_and_dirs(js, tmp_path):
    model = tiny_model()
    weights_dir = tmp_path / "shared"
    for version in (1, 2, 3):
        shards = write_shards(model, weights_dir / f"v{version}", "bfloat16", 1.0, shared=True)
        manifest = await publish_weights(
            js,
            weights_dir / f"v{version}",
            shards,
            version=version,
            step=version,
            dtype="bfloat16",
            keep_versions=2,
        )
        assert prune_dirs(weights_dir, keep_versions=2) == ([1] if version == 3 else [])
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    names = {i.name for i in await store.list(ignore_deletes=True)}
    assert {n.split("/")[0] for n in names} == {"v2", "v3"}
    with pytest.raises(NotFoundError):
        await store.get_info(object_name(1, shards[0].name))
    assert sorted(p.name for p in weights_dir.iterdir()) == ["v2", "v3"]

    kv = await js.key_value(KV_POLICY)
    latest = decode((await kv.get(KEY_LATEST)).value, WeightManifest)
    assert latest.version == 3 and latest == manifest
    # shared volume: the manifest carries paths the actor can read directly, verified
    assert local_shards(latest) == [weights_dir / "v3" / s.name for s in latest.shards]


async def test_uploaded_objects_read_back_through_nats_py_in_many_chunks(js, tmp_path, monkeypatch):
    """`upload_file` writes nats-py's object layout: nats-py's own `get` reads every byte back
    and its digest check passes; the chunks were pipelined; putting the same name again leaves
    only the new chunks in the stream (the old ones are purged)."""
    import hashlib

    import protocol.weights
    from protocol.weights import upload_file

    monkeypatch.setattr(protocol.weights, "OBJECT_CHUNK_BYTES", 4 << 10)
    monkeypatch.setattr(protocol.weights, "UPLOAD_WINDOW", 3)
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    path = tmp_path / "blob"
    data = bytes(range(256)) * 150 + b"tail"  # 38,404 bytes: 10 chunks, the last one short
    path.write_bytes(data)

    await upload_file(js, store, "v9/blob", path)  # hashed here
    info = await store.get_info("v9/blob")
    assert (info.size, info.chunks) == (len(data), 10)
    assert (await store.get("v9/blob")).data == data  # nats-py verifies the digest we recorded

    again = data[::-1]
    path.write_bytes(again)
    await upload_file(js, store, "v9/blob", path, hashlib.sha256(again).hexdigest())  # given
    assert (await store.get("v9/blob")).data == again
    stream = await js.stream_info(f"OBJ_{OBJECT_STORE_WEIGHTS}")
    assert stream.state.messages == 10 + 1  # the new chunks and the object's info


@pytest.fixture
def http_server():
    server = WeightServer(WeightServerConfig(host="127.0.0.1")).start()
    yield server
    server.close()


async def _stored_versions(store) -> set[str]:
    try:
        return {i.name.split("/")[0] for i in await store.list(ignore_deletes=True)}
    except NotFoundError:  # an empty store
        return set()


async def publish_served(
    js, directory, version: int, server, uploads, dtype: str = "bfloat16", shard_mb: float = 1.0
):
    """`tiny_model()` written to `directory` and published as `version`, served by `server`,
    its store copy through `uploads`."""
    return await publish_weights(
        js,
        directory,
        write_shards(tiny_model(), directory, dtype, shard_mb),
        version=version,
        step=version,
        dtype=dtype,
        keep_versions=2,
        server=server,
        uploads=uploads,
    )


async def test_with_http_latest_is_visible_before_the_store_has_the_objects(
    js, tmp_path, http_server
):
    """Served over HTTP, the manifest goes out first (`stored` false) while the store copy is
    held back; once the background upload runs, the store holds every shard and the index,
    each with the manifest's size and sha256, and the served files stay served."""
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    uploads = StoreUploads(js, keep_versions=2)
    uploads.pause()
    published = await publish_served(
        js, tmp_path / "v1", 1, http_server, uploads, dtype="float32", shard_mb=20 / 1024
    )
    latest = decode((await (await js.key_value(KV_POLICY)).get(KEY_LATEST)).value, WeightManifest)
    assert latest == published and not latest.stored and latest.sources == [http_server.url]
    assert await _stored_versions(store) == set()  # latest is out, the store has nothing yet

    uploads.resume()
    assert await uploads.drain(60)
    assert uploads.uploaded == [1] and uploads.skipped == []
    for shard in latest.shards:
        await check_object(store, object_name(1, shard.name), shard)  # size and sha256
    await store.get_info(object_name(1, INDEX_NAME))
    assert not list(tmp_path.glob(".*upload*"))  # the upload's hard links are gone
    assert (tmp_path / "v1-served" / latest.shards[0].name).is_file()  # still served over HTTP


async def test_uploads_coalesce_newest_wins(js, tmp_path, http_server):
    """Three versions published back to back while the first one's upload is held: the first
    is uploaded, the second is overtaken by the third before its upload began and skipped,
    the third uploaded; the store keeps the newest two stored (v1, v3), never had v2."""
    uploads = StoreUploads(js, keep_versions=2)
    uploads.pause()
    for version in (1, 2, 3):
        await publish_served(js, tmp_path / f"v{version}", version, http_server, uploads)
        await asyncio.sleep(0)  # the upload task takes v1 (and holds it) at its first turn
    uploads.resume()
    assert await uploads.drain(60)
    assert uploads.uploaded == [1, 3] and uploads.skipped == [2]
    store = await js.object_store(OBJECT_STORE_WEIGHTS)
    assert await _stored_versions(store) == {"v1", "v3"}
    assert not list(tmp_path.glob(".*upload*"))


async def test_a_held_upload_is_cut_at_the_shutdown_bound(js, tmp_path, http_server):
    """`drain` waits at most its bound: a held upload is then cancelled, nothing of the
    version is in the store, and its hard links are removed."""
    uploads = StoreUploads(js, keep_versions=2)
    uploads.pause()
    await publish_served(js, tmp_path / "v1", 1, http_server, uploads)
    assert not await uploads.drain(0.2)
    assert uploads.uploaded == []
    assert await _stored_versions(await js.object_store(OBJECT_STORE_WEIGHTS)) == set()
    assert not list(tmp_path.glob(".*upload*"))
