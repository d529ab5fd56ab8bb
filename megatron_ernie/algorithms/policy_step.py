"""What GRPO and PPO share: the policy's forward step and loss (Megatron's loss-function
contract), and how a rollout batch becomes updates (mini-batches of micro-batches).

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
from megatron_ernie.errors import ConfigError
from megatron_ernie.training.step import LOSS_KEY

POLICY_REPORTS = (LOSS_KEY, "clip_fraction", "dual_clip_fraction", "approx_kl", "ratio", "entropy")
UPO_REPORTS = ("upo_loss", "upo_pair_accuracy", "upo_reward_margin")


def forward_step(data_iterator, model, *, policy, upo=None):
    from megatron_ernie.rl.replay import replay_routing

    batch = next(data_iterator)
    with replay_routing(model, batch.get("routed_experts")):
        logits = model(batch["tokens"], batch["position_ids"], None)  # this rank's vocab slice
    if "pair_rows" in batch:  # offline pairs (recipe=upo_offline, or mixed into PPO's update)
        return logits, partial(pair_loss, batch, upo, report_keys(policy, upo) if policy is not None else ())
    return logits, partial(loss, batch, policy, upo)


def loss(batch: dict, policy, upo, logits: torch.Tensor):
    from megatron.core import parallel_state as ps

    from megatron_ernie.training.forward import token_entropy, token_logprobs

    # entropy first: Megatron's vocab-parallel cross entropy rewrites fp32 logits in place (into softmax)
    entropy = token_entropy(logits, ps.get_tensor_model_parallel_group())
    logp = token_logprobs(logits, batch["labels"])
    mask = batch["loss_mask"]
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


def pair_loss(batch: dict, upo, zero_reports: tuple[str, ...], logits: torch.Tensor):
    """A micro-batch of offline pairs (rows 2k chosen, 2k+1 rejected): c · upo_scale · Σ DPO.

    Standalone (`recipe=upo_offline`: upo_scale 1, c 1) the count is the pairs: the update's loss
    is the mean over its pairs. Mixed into PPO (`pair_rows` 0) the count is 0 and upo_scale the
    update's surrogate count over all its pairs, online and offline: the UPO term is then c times
    the mean over every pair, as for online pairs alone. `zero_reports`: the policy reports such a
    micro-batch has none of (sum 0, count 0), so that every micro-batch reports the same keys."""
    from megatron_ernie.training.forward import token_logprobs

    logp = token_logprobs(logits, batch["labels"])
    seq = rl_losses.sequence_logprobs(logp, batch["loss_mask"])
    ref = rl_losses.sequence_logprobs(batch["ref_logprobs"], batch["loss_mask"])
    s, n, rep = rl_losses.dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=upo.upo_beta,
                                   kind=upo.upo_kind.value, label_smoothing=upo.upo_label_smoothing,
                                   loss_key="upo_loss")
    total = upo.upo_coef * batch["upo_scale"].to(s.dtype) * s
    count = n if bool(batch["pair_rows"]) else torch.zeros((), dtype=torch.int)
    zero = torch.zeros(2, dtype=torch.float64)
    reports = {k: zero for k in zero_reports}
    reports.update({"upo_loss": rep["upo_loss"], "upo_pair_accuracy": rep["pair_accuracy"],
                    "upo_reward_margin": rep["reward_margin"], "upo_chosen_reward": rep["chosen_reward"],
                    "upo_rejected_reward": rep["rejected_reward"]})
    reports[LOSS_KEY] = torch.stack([total.detach().double(), count.double()])
    return total, count, reports


def _mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([(x * mask).sum().double(), mask.sum().double()])


def report_keys(policy, upo=None) -> tuple[str, ...]:
    return (POLICY_REPORTS + (("kl_ref",) if policy.kl_coef > 0 else ()) + (("tis_weight",) if policy.tis_cap else ())
            + (UPO_REPORTS if upo is not None else ()))


# --- a rollout batch as updates ------------------------------------------------------------------
def check_micro_batch(run, mini_batches: int) -> None:
    """train.micro_batch_size must divide the completions a rank trains on per update."""
    r, mbs = run.cfg.rl.rollout, run.cfg.train.micro_batch_size
    rows = r.prompts_per_step // max(run.dp_size * mini_batches, 1) * r.samples_per_prompt
    if rows % mbs:
        raise ConfigError(f"train.micro_batch_size={mbs} does not divide the {rows} completions of a rank's "
                          f"mini-batch (rl.rollout.prompts_per_step / (DP × rl.policy.mini_batches) × "
                          f"rl.rollout.samples_per_prompt)")


def mini_batches(batch: list, count: int, micro_batch_size: int) -> list[list[list]]:
    """The rank's batch as `count` mini-batches of micro-batches (the rollout source shares the
    global batch so that the rank's k-th part belongs to global mini-batch k)."""
    size = len(batch) // count
    parts = [batch[k * size:(k + 1) * size] for k in range(count)]
    return [[part[j:j + micro_batch_size] for j in range(0, len(part), micro_batch_size)] for part in parts]


def training_batch(run, experiences, extras) -> dict:
    """A training micro-batch: the collated rows with the per-token `extras`; the rollout's
    routing only when it is replayed."""
    from megatron_ernie.rl.rollout import collate

    batch = collate(experiences, run.cfg.data.seq_length, extras)
    if run.cfg.rl.router_replay.value != "rollout":
        batch.pop("routed_experts", None)
    return batch


def dp_sums(values: list[float], run) -> list[float]:
    """Sums over the data-parallel ranks (each holds its own groups)."""
    t = torch.tensor(values, dtype=torch.float64)
    if run.dp_size > 1:
        from megatron.core import parallel_state as ps

        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    return t.tolist()


def dp_mean(total: float, count: float, run) -> float:
    s, n = dp_sums([float(total), float(count)], run)
    return s / n if n else 0.0

