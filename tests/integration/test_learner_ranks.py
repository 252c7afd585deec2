"""Two ranks under torchrun (ZeRO-2, gloo) stay identical and take the one-rank update.

First each run is handed a batch whose row 2 has a NaN advantage: with 2 ranks that row is
in rank 1's micro-batch only, yet both ranks must refuse the update at the same point (no
hang in a collective), name the row, and apply nothing.

The test runs this file as the torchrun worker (see `worker()` at the bottom).
"""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(nproc: int, out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        str(out),
    ]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_zero2_stay_identical_and_match_one_rank(tmp_path):
    _torchrun(2, tmp_path / "two")
    _torchrun(1, tmp_path / "one")
    rank0 = torch.load(tmp_path / "two" / "rank0.pt")
    rank1 = torch.load(tmp_path / "two" / "rank1.pt")
    alone = torch.load(tmp_path / "one" / "rank0.pt")
    assert (
        rank0["refused"]
        == rank1["refused"]
        == alone["refused"]
        == {"nonfinite": "loss", "rows": [2]}
    )
    assert rank0["metrics"] == rank1["metrics"]
    for name, p in rank0["params"].items():
        assert torch.equal(p, rank1["params"][name]), name
        # same update as one process doing every micro-batch (gradient sums in another order)
        torch.testing.assert_close(p, alone["params"][name], atol=1e-6, rtol=1e-5, msg=name)
    assert rank0["metrics"][-1]["loss"] == pytest.approx(alone["metrics"][-1]["loss"], rel=1e-5)


def worker(out: Path) -> None:
    from learner.engine import setup_engine, train_step
    from tests.unit.learner.test_engine import full_params, make_batch, make_config

    config = make_config(2)
    pe = setup_engine(config)
    from learner.engine import load_policy

    batch = make_batch(load_policy(config.model, config.seed))  # 6 rows, micro 2: 3 micro-batches
    poisoned = dataclasses.replace(
        batch, adv=batch.adv.clone().index_fill_(0, torch.tensor([2]), math.nan)
    )
    refused = train_step(pe, poisoned)  # row 2 is in micro-batch 1: rank 1's with 2 ranks
    metrics = [train_step(pe, batch) for _ in range(2)]
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"params": full_params(pe), "metrics": metrics, "refused": refused},
        out / f"rank{pe.rank}.pt",
    )


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
