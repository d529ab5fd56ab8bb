"""Distributed runtime: launch variables, parallel state, layout validation, CPU shims."""
from megatron_ernie.runtime.distributed import LaunchEnv, initialize, launch_env, seed_everything, shutdown
from megatron_ernie.runtime.layout import LayoutError, ParallelLayout

__all__ = ["LaunchEnv", "LayoutError", "ParallelLayout", "initialize", "launch_env", "seed_everything", "shutdown"]
