"""A live (possibly sharded) Megatron model ⇄ a dist_checkpointing directory.

Saving is collective (every rank writes its own chunks) and atomic: ranks write into a hidden
temporary directory that rank 0 renames once all have finished. Loading works at any layout:
each rank asks for the slices it holds. Weights-only checkpoints written by `hf_to_mcore` carry
no per-module `_extra_state` objects (TE's FP8 metadata, empty on the local spec); those are
left at their defaults.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_ernie.conversion.convert import INFO
from megatron_ernie.conversion.locate import ASSETS
from megatron_ernie.conversion.mcore_format import McoreCheckpoint, sync_save_strategy
from megatron_ernie.conversion.safetensors_io import CheckpointError
from megatron_ernie.models.ernie.hf_adapter import unwrap_model
from megatron_ernie.runtime.atomic import check_target, publish, temp_sibling
from megatron_ernie.runtime.distributed import barrier, rank


# One key per layer for every model (Megatron-Core stacks the layers of a homogeneous, e.g.
# dense, model on a leading axis unless told otherwise; MoE models are always per layer).
SHARDED_METADATA = {"non_homogeneous_layers": True}


def model_sharded_state_dict(model) -> dict:
    """This rank's sharded state dict in the layout our checkpoints use."""
    return unwrap_model(model).sharded_state_dict(metadata=dict(SHARDED_METADATA))


def _sharded_keys(value) -> list[str]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return [value.key] if isinstance(value, (ShardedTensor, ShardedTensorFactory)) else []


def load_model_checkpoint(model, ckpt_dir: str | Path, keep_init: tuple[str, ...] = (), role: str | None = None) -> None:
    """Fill this rank's part of `model` from a Megatron checkpoint written at any layout.

    `keep_init`: parameter names left as initialised when the checkpoint lacks them (a reward
    head on a language model's checkpoint); anything else missing is an error. `role`: a training
    checkpoint's other role (e.g. PPO's "critic", stored under "critic/") when it holds one; else
    the checkpoint's main model."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    ck = McoreCheckpoint(ckpt_dir)
    objects = {k for k, v in ck.metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    module = unwrap_model(model)
    request, skipped = {}, []
    sharded = model_sharded_state_dict(module)
    if role and any(k.startswith(f"{role}/") for k in ck.tensors):
        add_prefix_for_sharding(sharded, f"{role}/")
    for name, value in sharded.items():
        if isinstance(value, ShardedObject) and value.unique_key not in objects:
            skipped.append(name)  # extra state the writer did not store (weights-only checkpoint)
            continue
        if name in keep_init and not any(k in ck.tensors for k in _sharded_keys(value)):
            skipped.append(name)
            continue
        request[name] = value
    missing = sorted({k for v in request.values() for k in _sharded_keys(v) if k not in ck.tensors})
    if missing:
        raise CheckpointError(f"{ckpt_dir}: tensors this model needs are not in the checkpoint: {missing[:10]}")
    loaded = dist_checkpointing.load(request, str(ckpt_dir))
    loaded = {k: v for k, v in loaded.items() if k in request}  # load() also merges common.pt
    result = module.load_state_dict(loaded, strict=False)
    absent = [k for k in result.missing_keys if not k.endswith("_extra_state") and k not in skipped]
    if absent or result.unexpected_keys:
        raise CheckpointError(f"{ckpt_dir}: state mismatch after load: missing {absent[:10]}, unexpected {result.unexpected_keys[:10]}")


def save_sharded(state: dict, target: Path, overwrite: bool = False, finish=None, fault_point: str | None = None) -> Path:
    """Collective: every rank writes `state` (Megatron sharded state dict) into one hidden
    temporary sibling of `target`; then rank 0 runs `finish(tmp)` (extra files) and renames it
    to `target`. A process killed before the rename leaves `target` as it was."""
    from megatron.core import dist_checkpointing

    from megatron_ernie.runtime.faults import maybe_fail

    target = Path(target)
    names = [None]
    if rank() == 0:
        check_target(target, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(target)
        tmp.mkdir()
        names = [str(tmp)]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(names, src=0)
    tmp = Path(names[0])
    dist_checkpointing.save(state, str(tmp), sharded_strategy=sync_save_strategy())
    barrier()
    if fault_point:
        maybe_fail(fault_point)  # crash tests: every shard written, nothing published
    if rank() == 0:
        if finish is not None:
            finish(tmp)
        publish(tmp, target, overwrite)
    barrier()
    return target


def save_model_checkpoint(model, out_dir: str | Path, overwrite: bool = False, extra_common: dict | None = None) -> Path:
    """Collective: write `model` (all ranks' shards) to `out_dir`, atomically.

    The directory also gets `hf/config.json` so that `mcore_to_hf` needs no other input.
    """
    from megatron_ernie.models.ernie.args import to_hf_config

    args = getattr(unwrap_model(model), "ernie_args", None)

    def finish(tmp: Path) -> None:
        if args is not None:
            (tmp / ASSETS).mkdir(exist_ok=True)
            (tmp / ASSETS / "config.json").write_text(json.dumps(to_hf_config(args), indent=2) + "\n")
        info = {"format": "megatron-core dist_checkpointing (torch_dist)", "model": getattr(args, "name", None)}
        info.update(extra_common or {})
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")

    return save_sharded(model_sharded_state_dict(model), Path(out_dir), overwrite, finish)
