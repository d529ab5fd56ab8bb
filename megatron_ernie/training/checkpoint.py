"""Training checkpoints: a dict of states — each trainable role's model, optimizer and LR
schedule, the experience source's state (data position, rollout RNG, reward normalisation), the
step and per-rank RNG.

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
import shutil
from pathlib import Path

import numpy as np
import torch

from megatron_ernie.conversion.locate import ASSETS, LATEST, STATE_FILE, complete_checkpoints, latest_checkpoint, step_name
from megatron_ernie.conversion.mcore_model import model_sharded_state_dict, save_sharded
from megatron_ernie.models.ernie.hf_adapter import unwrap_model
from megatron_ernie.errors import CheckpointError
from megatron_ernie.runtime.atomic import TMP_MARK
from megatron_ernie.runtime.distributed import barrier, rank, world_size
from megatron_ernie.training.algorithm import MAIN

# Distributed-optimizer state format: "fully_reshardable" (gathered per DP group at save, loads at
# any layout) or "dp_reshardable" (each rank its own buffers: no gather, DP size may change only).
OPTIM_FORMATS = ("fully_reshardable", "dp_reshardable")
CARRIED_ASSETS = ("generation_config.json",)  # copied into hf/ from the model the run started from


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
            raise CheckpointError(f"optimizer checkpoint format {optim_format!r} not in {OPTIM_FORMATS}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.optim_metadata = {"distrib_optim_sharding_type": optim_format}

    # --- finding (conversion/locate.py: the one definition of a checkpoint directory) ---
    def complete(self) -> list[Path]:
        """Published checkpoints, oldest first (hidden temporaries are never listed)."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, else the newest complete one."""
        return latest_checkpoint(self.root)

    # --- saving ---
    def save(self, step: int, models: dict, states: dict, hf_config: dict | None = None,
             run_config: str | None = None, tokenizer=None, assets_from: Path | None = None) -> Path:
        """Collective. `models`: {role: RoleModel} (trainable roles are saved: model, optimizer,
        LR schedule); `states`: {name: object with state_dict()/load_state_dict()} (plain state
        identical on every rank: the experience source, reward normalisation...). Returns the
        published checkpoint directory.

        `hf_config` and `tokenizer` go to `hf/`: the next pipeline stage and `mcore_to_hf` find the
        model's shape and its tokenizer there. `assets_from` (the HF files of the model the run
        started from) gives `hf/` what neither describes: `generation_config.json` (ERNIE's EOS
        ids, sampling defaults), so that an export generates like its source."""
        target = self.root / step_name(step)
        state = {"rng": _rng_object(_rng_state()), "step": step,
                 "states": {name: obj.state_dict() for name, obj in states.items()}}
        for name, part in models.items():
            if part.trainable:
                state.update(self._role_state(name, part, is_loading=False))

        def finish(tmp: Path) -> None:
            (tmp / ASSETS).mkdir(exist_ok=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / ASSETS))
            if hf_config is not None:
                (tmp / ASSETS / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            for name in CARRIED_ASSETS:
                if assets_from is not None and (Path(assets_from) / name).is_file():
                    shutil.copy2(Path(assets_from) / name, tmp / ASSETS / name)
            if run_config is not None:
                (tmp / "run_config.yaml").write_text(run_config)
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "roles": sorted(models)}) + "\n")

        save_sharded(state, target, overwrite=True, finish=finish, fault_point=f"checkpoint_written:{step}")
        if rank() == 0:  # `latest` moves only once the new checkpoint is complete under its name
            self._point_latest(target.name)
            self._prune()
        barrier()
        return target

    def _role_state(self, name: str, part, is_loading: bool) -> dict:
        """A role's sharded model / optimizer / scheduler entries. The main role keeps the plain
        keys ("model", ...: what `model.init_from` and the converters read); other roles' keys and
        tensors are prefixed with their name, so that two models never share a tensor key."""
        from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

        model_sd = model_sharded_state_dict(part.chunks[0])
        key = "" if name == MAIN else f"{name}/"
        if key:
            add_prefix_for_sharding(model_sd, key)
        meta = dict(self.optim_metadata)
        return {key + "model": model_sd,
                key + "optimizer": part.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=meta),
                key + "scheduler": part.scheduler.state_dict()}

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
    def load(self, path: Path, models: dict, states: dict) -> int:
        """Collective: restore everything `save` wrote into `models` and `states` (RNG only when
        the world size matches). Returns the step."""
        from megatron.core import dist_checkpointing

        request = {}
        trainable = {name: part for name, part in models.items() if part.trainable}
        for name, part in trainable.items():
            request.update(self._role_state(name, part, is_loading=True))
        if _saved_world(path) == world_size():
            request["rng"] = _rng_object(None)
        for name in trainable:  # the schedulers' plain state comes from the file, not the request
            request.pop(("" if name == MAIN else f"{name}/") + "scheduler")
        state = dist_checkpointing.load(request, str(path))
        for name, part in trainable.items():
            key = "" if name == MAIN else f"{name}/"
            result = unwrap_model(part.chunks[0]).load_state_dict(state[key + "model"], strict=False)
            bad = [k for k in result.missing_keys if not k.endswith("_extra_state")] + list(result.unexpected_keys)
            if bad:
                raise CheckpointError(f"{path}: role {name!r}: model state mismatch: {bad[:10]}")
            part.optimizer.load_state_dict(state[key + "optimizer"])
            part.scheduler.load_state_dict(state[key + "scheduler"])
        saved = state.get("states", {})
        missing = sorted(set(states) - set(saved))
        if missing:
            raise CheckpointError(f"{path}: no saved state for {missing} (saved: {sorted(saved)})")
        for name, obj in states.items():
            obj.load_state_dict(saved[name])
        if "rng" in state:
            _set_rng_state(state["rng"])
        return int(state["step"])


def _saved_world(path: Path) -> int | None:
    from megatron_ernie.conversion.mcore_format import McoreCheckpoint

    meta = McoreCheckpoint(path).metadata.state_dict_metadata
    ranks = [k for k in meta if k.startswith("rng_state/shard_")]
    if not ranks:
        return None
    return int(ranks[0].rsplit("_", 1)[1])  # key: rng_state/shard_<rank>_<world>
