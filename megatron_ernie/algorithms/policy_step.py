"""The policy's forward step and loss, shared by GRPO and PPO (Megatron's loss-function contract).

Per micro-batch, from the policy's vocab-parallel logits:
- the policy's entropy on the response tokens, reported (vocab-parallel, `training.forward.token_entropy`);
- the clipped surrogate on the response tokens (`rl_losses.policy_loss`), weighted by the
  truncated importance ratio of trainer and rollout (`rl.policy.tis_cap`);
- optionally k3 KL to the frozen reference as a loss (`rl.policy.kl_coef`);
- optionally online UPO (PPO): a DPO-style loss against the reference on the (best, worst) pairs
  of prompt groups. A pair's two rows sit in the same micro-batch (the algorithm lays groups out
  so), rows `upo_chosen[i]` / `upo_rejected[i]`.

Mixing means: Megatron divides the summed loss by the summed count (the surrogate's tokens or
sequences over the whole update). To add c·(mean over the update's pairs) the UPO sum is scaled
by `upo_scale` = count / pairs of the whole update, which the algorithm computes.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_ernie.algorithms import rl_losses
from megatron_ernie.training.step import LOSS_KEY

POLICY_REPORTS = (LOSS_KEY, "clip_fraction", "dual_clip_fraction", "approx_kl", "ratio", "entropy")
UPO_REPORTS = ("upo_loss", "upo_pair_accuracy", "upo_reward_margin")


def forward_step(data_iterator, model, *, policy, upo=None):
    from megatron_ernie.rl.replay import replay_routing

    batch = next(data_iterator)
    with replay_routing(model, batch.get("routed_experts")):
        logits = model(batch["tokens"], batch["position_ids"], None)  # this rank's vocab slice
    return logits, partial(loss, batch, policy, upo)


def loss(batch: dict, policy, upo, logits: torch.Tensor):
    from megatron.core import parallel_state as ps

    from megatron_ernie.training.forward import token_entropy, token_logprobs

    logp = token_logprobs(logits, batch["labels"])
    mask = batch["loss_mask"]
    entropy = token_entropy(logits, ps.get_tensor_model_parallel_group())
    weights = None
    if policy.tis_cap is not None:
        weights = rl_losses.truncated_is_weights(batch["old_logprobs"], batch["rollout_logprobs"], policy.tis_cap)
    total, count, reports = rl_losses.policy_loss(
        logp, batch["old_logprobs"], batch["advantages"], mask, clip_low=policy.clip_low,
        clip_high=policy.clip_high, dual_clip=policy.dual_clip, aggregation=policy.aggregation, is_weights=weights)
    if policy.kl_coef > 0:
        kl = rl_losses.kl_estimate(logp, batch["ref_logprobs"], policy.kl_estimator.value)
        total = total + policy.kl_coef * rl_losses.aggregate(kl, mask, policy.aggregation)[0]
        reports["kl_ref"] = _mean(kl.detach(), mask)
    if weights is not None:
        reports["tis_weight"] = _mean(weights, mask)
    reports["entropy"] = _mean(entropy, mask)
    if upo is not None:
        total = total + _upo(batch, upo, logp, mask, reports)
    reports[LOSS_KEY] = torch.stack([total.detach().double(), reports[LOSS_KEY][1]])
    return total, count, reports


def _upo(batch, upo, logp, mask, reports) -> torch.Tensor:
    """c · upo_scale · Σ_pairs DPO loss of this micro-batch's pairs (0 without pairs)."""
    chosen, rejected = batch["upo_chosen"], batch["upo_rejected"]
    seq = rl_losses.sequence_logprobs(logp, mask)
    ref = rl_losses.sequence_logprobs(batch["ref_logprobs"], mask)
    s, n, rep = rl_losses.dpo_loss(seq[chosen], seq[rejected], ref[chosen], ref[rejected], beta=upo.upo_beta,
                                   kind=upo.upo_kind.value, label_smoothing=upo.upo_label_smoothing,
                                   loss_key="upo_loss")
    reports.update({"upo_loss": rep["upo_loss"], "upo_pair_accuracy": rep["pair_accuracy"],
                    "upo_reward_margin": rep["reward_margin"]})
    return upo.upo_coef * batch["upo_scale"].to(s.dtype) * s


def _mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([(x * mask).sum().double(), mask.sum().double()])


def report_keys(policy, upo=None) -> tuple[str, ...]:
    return (POLICY_REPORTS + (("kl_ref",) if policy.kl_coef > 0 else ()) + (("tis_weight",) if policy.tis_cap else ())
            + (UPO_REPORTS if upo is not None else ()))
