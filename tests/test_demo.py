"""The README's first command: the post-training chain (SFT -> offline UPO -> PPO stages 1-3) as a
smoke run, the SFT stage learning on its own, and the demo on 2 ranks."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.helpers import free_port


def _run(cmd, tmp_path):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_demo_learns_and_writes_metrics_curves_and_checkpoints(tmp_path):
    stdout = _run([sys.executable, "-m", "megatron_ernie.demo", "--sft-only", "--steps", "60", "--out", "run"], tmp_path)
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) over 60 steps", stdout).groups())
    assert last < first - 2.0, stdout
    run = tmp_path / "run" / "00_sft"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "moe_load_max_over_mean/layer1"} <= set(rows[0])
    assert (run / "curves.png").stat().st_size > 10_000
    assert any((run / "tensorboard").iterdir())
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000060"
    assert "checkpoint run/00_sft/checkpoints/step_00000060; curves run/00_sft/curves.png" in stdout


def test_demo_under_torchrun_with_expert_parallelism(tmp_path):
    stdout = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                   "-m", "megatron_ernie.demo", "--sft-only", "--ep", "2", "--steps", "3", "--out", "run"], tmp_path)
    assert re.search(r"loss [\d.]+ -> [\d.]+ over 3 steps", stdout)


def test_chain_runs_every_stage_from_the_previous_one(tmp_path):
    """Two steps per stage: each stage starts from the previous checkpoint (PPO after PPO: the
    critic too), RL stages evaluate before and after on their held-out split, and the end prints
    the accuracies and the PPO step-time breakdown."""
    stdout = _run([sys.executable, "-m", "megatron_ernie.demo", "--steps", "2", "--out", "run",
                   "rl.rollout.prompts_per_step=4", "rl.eval.max_new_tokens=8", "rl.rollout.max_new_tokens=16"],
                  tmp_path)
    stages = ["00_sft", "01_upo_offline", "02_ppo_logic", "03_ppo_maths_code", "04_ppo_general"]
    for name in stages:
        assert (tmp_path / "run" / name / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    config = (tmp_path / "run" / "03_ppo_maths_code" / "run_config.yaml").read_text()
    assert "run/02_ppo_logic/checkpoints/step_00000002" in config.replace(str(tmp_path) + "/", "")
    assert re.search(r"critic_init: \S*02_ppo_logic/checkpoints/step_00000002", config)
    rows = [json.loads(x) for x in (tmp_path / "run" / "03_ppo_maths_code" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2] and {"eval/math/accuracy", "eval/code/accuracy"} <= set(evals[0])
    assert {"rollout/math/accuracy", "rollout/code/reward_raw", "upo/pairs", "entropy"} <= set(rows[1])
    assert re.search(r"02_ppo_logic: held-out accuracy [\d.]+ -> [\d.]+ \(steps 0 -> 2; logic", stdout)
    for part in ("rollout", "reward", "ref/old log-probs + values", "train", "refit"):
        assert re.search(rf"  {re.escape(part)} +[\d.]+ s +[\d.]+ %", stdout), stdout
