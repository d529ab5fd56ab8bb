"""The README's first command: SFT of the tiny MoE on the bundled chat data, on 1 and on 2 ranks."""
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
    stdout = _run([sys.executable, "-m", "megatron_ernie.demo", "--steps", "60", "--out", "run"], tmp_path)
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
                   "-m", "megatron_ernie.demo", "--ep", "2", "--steps", "3", "--out", "run"], tmp_path)
    assert re.search(r"loss [\d.]+ -> [\d.]+ over 3 steps", stdout)
