"""The sbatch launcher: what it runs (with srun/scontrol stand-ins) and that its layout fits the 300B."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from megatron_ernie.models.ernie import preset
from megatron_ernie.runtime import ParallelLayout
from megatron_ernie.training.config import compose

ROOT = Path(__file__).resolve().parents[1]


def _fake_slurm(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n')
    # srun: record its arguments, then run the per-node command for node 1 with python stubbed
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {log}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def test_sft_300b_launcher_builds_the_torchrun_command(tmp_path):
    log = tmp_path / "srun.args"
    _fake_slurm(tmp_path / "bin", log)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_NNODES="12", SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(ROOT))
    out = subprocess.run(["bash", str(ROOT / "launchers" / "sft_300b.sh"), "data.path=/data/my sft.jsonl",
                          "train.steps=10"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "master gpu-a17:29500" in out.stdout
    args = log.read_text()
    assert "--kill-on-bad-exit=1" in args
    cmd = args.splitlines()[-1]
    assert "--nnodes=12 --nproc-per-node=8 --node-rank=${SLURM_NODEID}" in " ".join(cmd.split())
    assert "--master-addr=gpu-a17" in cmd and "-m megatron_ernie.train" in cmd
    # user overrides come last (they win) and keep their spaces
    assert cmd.rstrip().endswith(r"data.path=/data/my\ sft.jsonl train.steps=10")
    assert "parallel.tp=8" in cmd and "model=ernie45_300b_a47b" in cmd


@pytest.mark.parametrize("script, stage", [("sft_300b.sh", "sft"), ("reward_model_300b.sh", "reward_model")])
def test_300b_launcher_recipes_compose_and_their_layout_fits_the_model(script, stage):
    text = (ROOT / "launchers" / script).read_text()
    call = text[text.index("ernie_launch ") + len("ernie_launch "):text.index('"$@"')]
    cfg = compose(call.replace("\\\n", " ").split())  # every override valid for the schema
    assert cfg.stage.value == stage and cfg.model.preset == "ernie45_300b_a47b"
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep) == (8, 6, 8)
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    layout = ParallelLayout(tp=8, pp=6, ep=8, etp=cfg.parallel.etp, sequence_parallel=True, distributed_optimizer=True)
    layout.validate(preset(cfg.model.preset), world_size=nodes * gpus)
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * layout.data_parallel_size(nodes * gpus)) == 0
