"""The train/rollout mismatch, measured every RL step: how far the trainer's recomputed log-probs of
the sampled tokens are from the engine's, and how often MoE routing disagreed.

With d = log π_train − log π_rollout per response token (the rollout sampled the token):
- mean |d|                       (slime's deterministic path asserts < 1e-6)
- k3 KL(π_rollout ‖ π_train) ≈ mean(e^d − 1 − d)   (unbiased, non-negative per token)
- max ratio = max e^d            (what truncated importance sampling clips)
- share of tokens whose selected experts differ from the rollout's in at least one MoE layer.

`mismatch_sums` returns DP-reducible sums; `reduce_mismatch` all-reduces them and gives the means.
"""
from __future__ import annotations

import torch

KEYS = ("rollout/logp_abs_diff", "rollout/k3_kl", "rollout/max_ratio", "rollout/expert_mismatch")


def expert_sets_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., layers, k] selections -> [...] bool: some layer selected a different set of experts
    (the order within a top-k set does not matter)."""
    return (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1).any(dim=-1)


def mismatch_sums(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                  trainer_experts: torch.Tensor | None = None,
                  rollout_experts: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [6]: Σ|d|, Σk3, max e^d, tokens, Σ experts differ, tokens with routing compared."""
    m = mask.bool()
    d = (trainer_logp.double() - rollout_logp.double())[m]
    out = torch.zeros(6, dtype=torch.float64)
    if d.numel():
        out[0] = d.abs().sum()
        out[1] = (torch.expm1(d) - d).sum()
        out[2] = torch.exp(d).max()
        out[3] = d.numel()
    if trainer_experts is not None and rollout_experts is not None:
        differ = expert_sets_differ(trainer_experts, rollout_experts)[m]
        out[4] = differ.sum()
        out[5] = differ.numel()
    return out


def add_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Combine two `mismatch_sums` (sums add, the max ratio is a max)."""
    out = a + b
    out[2] = torch.maximum(a[2], b[2])
    return out


def reduce_mismatch(sums: torch.Tensor, group=None) -> dict[str, float]:
    """Sum over `group` (max for the ratio) and turn into the logged means."""
    sums = sums.clone()
    if torch.distributed.is_initialized():
        peak = sums[2:3].clone()
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(sums, group=group)
        sums[2] = peak[0]
    tokens, routed = float(sums[3]), float(sums[5])
    out = {KEYS[0]: float(sums[0]) / tokens if tokens else 0.0,
           KEYS[1]: float(sums[1]) / tokens if tokens else 0.0,
           KEYS[2]: float(sums[2])}
    if routed:
        out[KEYS[3]] = float(sums[4]) / routed
    return out
