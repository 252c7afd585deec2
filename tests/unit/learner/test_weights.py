"""Weight shards: exact reload, size limit, checksums."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from learner.weights import export_model, link_files, remove_upload_leftovers, write_shards
from protocol.weights import (
    INDEX_NAME,
    ShardError,
    plan_shards,
    sha256_file,
    sha256_own_file,
    verify_shard,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def test_plan_shards_by_hand():
    # limit 8 bytes: a(4) + b(4) = 8 fits; c(10) is over the limit alone -> its own shard; d(1)
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1)]
    assert plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards(sizes, 100) == [["a", "b", "c", "d"]]


def test_both_file_hashes_give_the_published_sha256(tmp_path):
    # FIPS 180-2's examples: "" and "abc"; and 3 MiB of one byte, which crosses buffer sizes
    empty, abc, big = tmp_path / "empty", tmp_path / "abc", tmp_path / "big"
    empty.write_bytes(b"")
    abc.write_bytes(b"abc")
    big.write_bytes(b"\x61" * (3 << 20))
    for digest in (sha256_file, sha256_own_file):
        assert digest(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        assert digest(abc) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_own_file(big) == sha256_file(big) == hashlib.sha256(b"a" * (3 << 20)).hexdigest()


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def test_export_reloads_with_from_pretrained_exactly(tiny_qwen2, tmp_path):
    # 20 KiB shards: the 48x64 fp32 embedding (12 KiB) and 64x128 MLP weights (32 KiB, alone)
    export_model(tiny_qwen2, tmp_path, "float32", shard_mb=20 / 1024)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert _max_diff(tiny_qwen2, reloaded) == 0.0
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 3 and files[0].startswith("model-00001-of-")
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(files)


def test_start_removes_the_upload_folders_a_killed_learner_left_and_nothing_else(
    tiny_qwen2, tmp_path
):
    """Two upload folders as a learner killed mid-upload leaves them (made by `link_files`
    itself) beside the versions of the shared volume: removed; the versions, the file system's
    other folders and files, even ones that look alike, stay."""
    weights = tmp_path / "weights"
    shards = {v: write_shards(tiny_qwen2, weights / f"v{v}", "float32", 1.0) for v in (3, 4)}
    killed = [link_files(weights / f"v{v}", shards[v]) for v in (3, 4)]
    assert all(
        f.name.startswith(f".v{v}-upload-") and any(f.iterdir())
        for v, f in zip((3, 4), killed, strict=True)
    )
    unrelated = ["notes", ".v3-served", "v3-upload-x", ".cache-upload-x"]
    for name in unrelated:
        (weights / name).mkdir()
        (weights / name / "keep").write_text("mine")
    (weights / ".v5-upload-file").write_text("a file, not an upload folder")

    assert remove_upload_leftovers(weights) == 2

    kept = [*unrelated, ".v5-upload-file", "v3", "v4"]
    assert sorted(p.name for p in weights.iterdir()) == sorted(kept)
    assert all((weights / name / "keep").read_text() == "mine" for name in unrelated)
    assert {p.name for p in (weights / "v3").iterdir()} == {s.name for s in shards[3]} | {
        INDEX_NAME
    }
    assert remove_upload_leftovers(weights) == 0
    assert remove_upload_leftovers(None) == remove_upload_leftovers(tmp_path / "absent") == 0


def test_shards_respect_size_limit_and_reload_in_serving_dtype(tiny_qwen2, tmp_path):
    limit = 20 * 1024
    shards = write_shards(tiny_qwen2, tmp_path, "bfloat16", shard_mb=limit / 2**20)
    for shard in shards:
        with safe_open(str(tmp_path / shard.name), framework="pt") as f:
            sizes = [f.get_tensor(n).nbytes for n in f.keys()]
            assert sorted(f.keys()) == sorted(shard.tensors)
        assert sum(sizes) <= limit or len(sizes) == 1, shard.name
        verify_shard(tmp_path / shard.name, shard)
    # a fresh model loaded from the shards equals the original cast to bf16, exactly
    fresh = type(tiny_qwen2)(tiny_qwen2.config).to(torch.bfloat16)
    state = {n: t for s in shards for n, t in load_file(tmp_path / s.name).items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    assert _max_diff(tiny_qwen2.to(torch.bfloat16), fresh) == 0.0


def test_corrupted_shard_fails_its_sha256(tiny_qwen2, tmp_path):
    shard = write_shards(tiny_qwen2, tmp_path, "float32", shard_mb=1.0)[0]
    path = tmp_path / shard.name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip the last byte of the last tensor: same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256 mismatch"):
        verify_shard(path, shard)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(ShardError, match=f"{len(data) - 1} bytes, the manifest says {len(data)}"):
        verify_shard(path, shard)
    with pytest.raises(ShardError, match="does not exist"):
        verify_shard(tmp_path / "nope.safetensors", shard)


def test_zero3_shards_equal_the_gathered_parameters(tmp_path):
    from learner.engine import load_policy, setup_engine, train_step

    from .test_engine import full_params, make_batch, make_config

    config = make_config(3, beta=0.0)
    pe = setup_engine(config)
    train_step(pe, make_batch(load_policy(config.model, config.seed)))
    shards = write_shards(pe.module, tmp_path, "float32", shard_mb=20 / 1024)
    state = {n: t for s in shards for n, t in load_file(tmp_path / s.name).items()}
    expected = full_params(pe)
    assert state.keys() == expected.keys()
    for name, p in expected.items():
        assert torch.equal(state[name], p), name
