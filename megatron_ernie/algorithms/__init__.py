"""Algorithms: one object per post-training stage (training/algorithm.py's contract) and the
losses they use. `build(stage)` gives the one a run's `stage:` names."""
from __future__ import annotations


def build(stage: str):
    from megatron_ernie.algorithms.grpo import GRPO
    from megatron_ernie.algorithms.ppo import PPO
    from megatron_ernie.algorithms.reward_model import RewardModel
    from megatron_ernie.algorithms.sft import SFT
    from megatron_ernie.algorithms.upo_offline import UPOOffline

    algorithms = {"sft": SFT, "reward_model": RewardModel, "grpo": GRPO, "ppo": PPO, "upo_offline": UPOOffline}
    if stage not in algorithms:
        from megatron_ernie.errors import ConfigError

        raise ConfigError(f"stage={stage!r}: no such algorithm; known: {sorted(algorithms)}")
    return algorithms[stage]()
