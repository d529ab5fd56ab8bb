"""The regression bar of the loop's generalisation (issue 11): SFT and reward-model runs give
bit-identical losses to those recorded with the code before it (tests/data/loss_regression.json,
float.hex per step), on one process and at TP=2, PP=2 and EP=2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import spawn

RECORDED = json.loads((Path(__file__).parent / "data" / "loss_regression.json").read_text())
RUNS = {
    "sft_tiny_moe": ["recipe=sft", "data.seq_length=64", "train.global_batch_size=4", "train.micro_batch_size=2",
                     "optim.lr=1e-3", "optim.warmup_steps=2", "train.steps=4", "checkpoint.interval=100"],
    "rm_tiny_moe": ["recipe=reward_model", "data.seq_length=64", "train.global_batch_size=8",
                    "train.micro_batch_size=2", "train.steps=4", "train.eval_interval=0", "checkpoint.interval=100"],
}
LAYOUTS = {"w1": [], "tp2_w2": ["parallel.tp=2"], "pp2_w2": ["parallel.pp=2"], "ep2_w2": ["parallel.ep=2"]}


def _train(rank: int, world: int, overrides: list[str], out: Path) -> None:
    from megatron_ernie.train import run
    from megatron_ernie.training.config import compose

    result = run(compose([*overrides, f"out_dir={out}"]), progress=False)
    if rank == world - 1:
        (out / "losses.json").write_text(json.dumps({str(k): v.hex() for k, v in result.losses.items()}))


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_losses_bit_identical_to_before_the_refactor(run, layout, tmp_path):
    key = f"{run}_{layout}"
    spawn(_train, 1 if layout == "w1" else 2, RUNS[run] + LAYOUTS[layout], tmp_path / "run")
    got = json.loads((tmp_path / "run" / "losses.json").read_text())
    assert got == RECORDED[key], {s: (float.fromhex(got[s]), float.fromhex(RECORDED[key][s])) for s in got}
