"""One entry point that brings up torch.distributed + Megatron parallel state.

Reads the launcher's variables (torchrun: RANK/WORLD_SIZE/LOCAL_RANK, Slurm: SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID), picks nccl on GPU and gloo on CPU, validates the layout before any
allocation and, on CPU only, installs the compatibility shims (runtime/cpu_compat.py).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import NamedTuple

import torch

from megatron_ernie.runtime import cpu_compat
from megatron_ernie.runtime.layout import ParallelLayout


class LaunchEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_env(environ=None) -> LaunchEnv:
    """Rank/world from torchrun, else from Slurm, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    return LaunchEnv(
        rank=rank,
        world_size=world,
        local_rank=local,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", 29500)),
    )


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for a one-process group started in-process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(layout: ParallelLayout, model_args=None, seed: int = 1234, environ=None,
               timeout_s: int = 600) -> LaunchEnv:
    """Initialise the process group and Megatron's parallel state for `layout`.

    `model_args` (ErnieArgs) lets the layout be validated against the model before anything
    is allocated. Idempotent for the process group; re-initialises model-parallel state.
    """
    from megatron.core import parallel_state as ps

    env = launch_env(environ)
    if model_args is not None:
        layout.validate(model_args, env.world_size)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_compat.apply()
    if not torch.distributed.is_initialized():
        if on_gpu:
            torch.cuda.set_device(env.local_rank)
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    _destroy_model_parallel()
    before = _process_groups()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    _MEGATRON_GROUPS[:] = [g for g in _process_groups() if g not in before]
    seed_everything(seed)
    if not on_gpu:
        cpu_compat.enter_device_mode()
    return env


_MEGATRON_GROUPS: list = []  # the process groups our last initialize_model_parallel created


def _process_groups() -> list:
    # torch has no public listing of process groups; read its registry (read only)
    from torch.distributed import distributed_c10d as c10d

    return list(c10d._world.pg_map)


def _destroy_model_parallel() -> None:
    """Megatron's destroy_model_parallel() forgets its groups but destroys only the explicit gloo
    ones; every re-initialisation (tests, several stages in one process) would leak the rest,
    with their sockets (~70 descriptors per initialisation on CPU)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    alive = set(_process_groups())
    for group in _MEGATRON_GROUPS:
        if group in alive and group is not torch.distributed.group.WORLD:
            torch.distributed.destroy_process_group(group)
    _MEGATRON_GROUPS.clear()


def seed_everything(seed: int) -> None:
    """Seed the default generator and megatron's named RNG streams."""
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_compat.install_cpu_rng_tracker(seed)


def shutdown(destroy_process_group: bool = True) -> None:
    cpu_compat.exit_device_mode()
    _destroy_model_parallel()
    if destroy_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
