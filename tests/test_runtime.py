"""`initialize` brings up gloo + Megatron parallel state from Slurm's variables alone."""
from __future__ import annotations

import os

import torch

from tests.helpers import TEST_MOE, free_port


def _slurm_rank(rank: int, world: int, port: int, out_dir) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(k, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron.core import parallel_state as ps

    from megatron_ernie.runtime import ParallelLayout, initialize, shutdown

    env = initialize(ParallelLayout(ep=2), TEST_MOE)
    total = torch.tensor([float(env.rank + 1)])
    torch.distributed.all_reduce(total)
    torch.save({"rank": env.rank, "world": env.world_size, "sum": total.item(),
                "ep_rank": ps.get_expert_model_parallel_rank(),
                "backend": torch.distributed.get_backend()}, out_dir / f"{rank}.pt")
    shutdown()


def test_initialize_from_slurm_variables(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_slurm_rank, args=(2, free_port(), tmp_path), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert [g["rank"] for g in got] == [0, 1]
    assert all(g["world"] == 2 and g["sum"] == 3.0 and g["backend"] == "gloo" for g in got)
    assert sorted(g["ep_rank"] for g in got) == [0, 1]


def test_one_process_object_gather_starts_no_threads(world1):
    """CPU shim 9: a one-member all_gather_object must not run on gloo's worker threads (their
    OpenMP pools made every later CPU op ~2x slower)."""
    import os

    import torch

    def threads() -> int:
        return len(os.listdir(f"/proc/{os.getpid()}/task"))

    big = {"metadata": list(range(200_000))}
    before = threads()
    out = [None]
    torch.distributed.all_gather_object(out, big)
    assert out[0] is big
    assert threads() == before


def test_reinitialising_releases_the_previous_groups(world1):
    """Megatron forgets its groups on destroy_model_parallel(); ours destroys them, so a process
    that initialises several times (tests, several stages) does not leak their sockets."""
    from megatron_ernie.runtime import ParallelLayout, initialize

    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}  # group exists already
    initialize(ParallelLayout(), environ=env)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        initialize(ParallelLayout(), environ=env)
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
