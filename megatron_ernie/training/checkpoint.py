"""Training checkpoints: model, optimizer, LR schedule, step, data position and RNG state.

Layout under `<out_dir>/checkpoints/`:
    step_00000050/   a Megatron-Core dist_checkpointing directory (torch_dist, any layout loads it)
    step_00000100/
    latest           the name of the newest complete checkpoint, replaced atomically, last

A save writes into a hidden temporary directory, which rank 0 renames once every rank has
written; only then is `latest` replaced and old checkpoints beyond `keep_last` removed. A process
killed at any point therefore leaves the previous checkpoint as the one `resume()` finds.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_ernie.conversion.convert import ASSETS
from megatron_ernie.conversion.mcore_model import model_sharded_state_dict, save_sharded
from megatron_ernie.models.ernie.hf_adapter import unwrap_model
from megatron_ernie.runtime.atomic import TMP_MARK
from megatron_ernie.runtime.distributed import barrier, rank, world_size

LATEST = "latest"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Distributed-optimizer state format: "fully_reshardable" (gathered per DP group at save, loads at
# any layout) or "dp_reshardable" (each rank its own buffers: no gather, DP size may change only).
OPTIM_FORMATS = ("fully_reshardable", "dp_reshardable")


@dataclass
class TrainerState:
    step: int
    consumed_samples: int


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(data):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # one object per global rank: restored only when the world size matches
    return ShardedObject("rng_state", data, (world_size(),), (rank(),), replica_id=0)


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2, optim_format: str = "fully_reshardable"):
        if optim_format not in OPTIM_FORMATS:
            raise ValueError(f"optimizer checkpoint format {optim_format!r} not in {OPTIM_FORMATS}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.optim_metadata = {"distrib_optim_sharding_type": optim_format}

    # --- finding ---
    def complete(self) -> list[Path]:
        """Published checkpoints, oldest first (hidden temporaries are never listed)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, else the newest complete one."""
        pointer = self.root / LATEST
        if pointer.exists():
            path = self.root / pointer.read_text().strip()
            if (path / STATE_FILE).exists():
                return path
        done = self.complete()
        return done[-1] if done else None

    # --- saving ---
    def save(self, step: int, model, optimizer, scheduler, consumed_samples: int, hf_config: dict | None = None,
             run_config: str | None = None, tokenizer=None) -> Path:
        """Collective. Returns the published checkpoint directory.

        `hf_config` and `tokenizer` go to `hf/`: the next pipeline stage and `mcore_to_hf` find the
        model's shape and its tokenizer there."""
        target = self.root / f"step_{step:08d}"
        model_sd = model_sharded_state_dict(model)
        state = {
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=dict(self.optim_metadata)),
            "rng": _rng_object(_rng_state()),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "consumed_samples": consumed_samples,
        }

        def finish(tmp: Path) -> None:
            (tmp / ASSETS).mkdir(exist_ok=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / ASSETS))
            if hf_config is not None:
                (tmp / ASSETS / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            if run_config is not None:
                (tmp / "run_config.yaml").write_text(run_config)
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "consumed_samples": consumed_samples}) + "\n")

        save_sharded(state, target, overwrite=True, finish=finish, fault_point=f"checkpoint_written:{step}")
        if rank() == 0:  # `latest` moves only once the new checkpoint is complete under its name
            self._point_latest(target.name)
            self._prune()
        barrier()
        return target

    def _point_latest(self, name: str) -> None:
        tmp = self.root / f".{LATEST}{TMP_MARK}{os.getpid()}"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.root / LATEST)

    def _prune(self) -> None:
        done = self.complete()
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(f".step_*{TMP_MARK}*"):  # temporaries of killed saves
            shutil.rmtree(stale, ignore_errors=True)

    # --- loading ---
    def load(self, path: Path, model, optimizer, scheduler) -> TrainerState:
        """Collective: restore everything `save` wrote (RNG only when the world size matches)."""
        from megatron.core import dist_checkpointing

        model_sd = model_sharded_state_dict(model)
        request = {
            "model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=dict(self.optim_metadata)),
        }
        saved_world = _saved_world(path)
        if saved_world == world_size():
            request["rng"] = _rng_object(None)
        state = dist_checkpointing.load(request, str(path))
        module = unwrap_model(model)
        result = module.load_state_dict(state["model"], strict=False)
        bad = [k for k in result.missing_keys if not k.endswith("_extra_state")] + list(result.unexpected_keys)
        if bad:
            raise RuntimeError(f"{path}: model state mismatch: {bad[:10]}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "rng" in state:
            _set_rng_state(state["rng"])
        return TrainerState(step=int(state["step"]), consumed_samples=int(state["consumed_samples"]))


def _saved_world(path: Path) -> int | None:
    from megatron_ernie.conversion.mcore_format import McoreCheckpoint

    meta = McoreCheckpoint(path).metadata.state_dict_metadata
    ranks = [k for k in meta if k.startswith("rng_state/shard_")]
    if not ranks:
        return None
    return int(ranks[0].rsplit("_", 1)[1])  # key: rng_state/shard_<rank>_<world>
