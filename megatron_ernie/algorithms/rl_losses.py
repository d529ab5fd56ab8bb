"""RL losses and advantage estimators: small pure functions over tensors.

Shapes: per-token tensors are [b, s] with a float `mask` [b, s] (1 on the response tokens that
are trained on); per-sequence tensors are [b]. Losses follow Megatron's per-token contract
(`calculate_per_token_loss=True`, as `losses.py`): they return (loss sum, count, reports), the
schedule divides the sum over micro-batches and DP ranks by the summed count, and every report is
a tensor [sum, count] whose batch mean is sum / count. The count is what the aggregation averages
over: tokens (`token-mean`) or sequences (`seq-mean-*`). The result is the same mean at every
DP / micro-batch split.

Defaults are the papers':
- GAE: γ 1.0, λ 0.95 (Schulman et al. 2016; RLHF practice sets γ = 1).
- PPO: clip 0.2, symmetric (Schulman et al. 2017). Dual-clip c = 3 (Ye et al. 2020) when asked.
- DAPO: clip-higher ε_low 0.2 / ε_high 0.28, token-level mean, and an overlong penalty over a
  buffer before the maximum length (Yu et al. 2025).
- KL estimators k1 / k2 / k3 (Schulman, "Approximating KL divergence"). The adaptive controller
  is Ziegler et al. 2019's.
- DPO β 0.1 (Rafailov et al. 2023), IPO (Azar et al. 2023), label smoothing (cDPO).
- Truncated importance sampling of the rollout/trainer mismatch, cap 2 (Yao et al. 2025).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_ernie.errors import ConfigError
from megatron_ernie.training.config import AGGREGATIONS, KLEstimator  # one list each: the config checks them too
from megatron_ernie.training.step import LOSS_KEY
KL_ESTIMATORS = tuple(k.value for k in KLEstimator)


def _pair(total: torch.Tensor, count) -> torch.Tensor:
    return torch.stack([total.detach().double().reshape(()), torch.as_tensor(count, dtype=torch.float64)])


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _pair((x * mask).sum(), mask.sum())


# --- aggregation ----------------------------------------------------------------------------
def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean"):
    """(sum, integer count: Megatron's schedule adds counts as ints) of a per-token loss under `mode`:
    token-mean           Σ_tokens l / #tokens                      (DAPO; count = tokens)
    seq-mean-token-sum   Σ_seqs (Σ_tokens l) / #seqs               (Dr. GRPO; count = sequences)
    seq-mean-token-mean  Σ_seqs (Σ_tokens l / len) / #seqs         (GRPO's original; count = sequences)
    Sequences without a masked token do not count."""
    if mode not in AGGREGATIONS:
        raise ConfigError(f"loss aggregation {mode!r}: expected one of {', '.join(AGGREGATIONS)}")
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * mask).sum(), (mask > 0).sum().to(torch.int)
    lengths = mask.sum(dim=-1)
    seq = (per_token * mask).sum(dim=-1)
    if mode == "seq-mean-token-mean":
        seq = seq / lengths.clamp(min=1)
    return seq.sum(), (lengths > 0).sum().to(torch.int)


# --- advantages -----------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation on ragged rows -> (advantages, returns), both [b, s], zero
    off the mask. Masked-out positions are skipped, not treated as steps: a row's last masked
    token bootstraps from 0 (the episode ends), and an unmasked gap carries the recursion over."""
    b, s = rewards.shape
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    carry = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(carry)
    for t in range(s - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * carry
        advantages[:, t] = step * m
        carry = torch.where(m > 0, step, carry)
        next_value = torch.where(m > 0, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8, group=None):
    """(x - mean) / std over the masked entries (of every rank in `group`: DP-layout invariant);
    shift_mean=False keeps the mean (OpenRLHF/TRL's option for rewards)."""
    mask = mask.to(x.dtype)
    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(sums, group=group)
    n = sums[2]
    mean = sums[0] / n.clamp(min=1)
    var = (sums[1] / n.clamp(min=1) - mean * mean).clamp(min=0)
    if n > 1:
        var = var * n / (n - 1)  # unbiased, as TRL's / OpenRLHF's masked whitening
    mean, std = mean.to(x.dtype), var.sqrt().to(x.dtype)
    out = (x - mean) / (std + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def group_advantages(rewards: torch.Tensor, groups, *, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, over the group's (unbiased) std when
    `normalize_std` (Dr. GRPO switches it off). A group of one, or of equal rewards, gives 0."""
    groups = torch.as_tensor(groups)
    _, index = torch.unique(groups, return_inverse=True)
    k = int(index.max()) + 1 if index.numel() else 0
    r = rewards.double()
    n = torch.zeros(k, dtype=torch.float64).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, index, r) / n
    centred = r - mean[index]
    if normalize_std:
        sq = torch.zeros(k, dtype=torch.float64).index_add_(0, index, centred * centred)
        std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(n))
        centred = centred / (std[index] + eps)
    return torch.where(n[index] > 1, centred, torch.zeros_like(centred)).to(rewards.dtype)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment per response: 0 up to max_length - buffer, then linear down
    to -factor at max_length, -factor beyond."""
    if buffer <= 0 or buffer > max_length:
        raise ConfigError(f"overlong buffer {buffer}: must be in 1..max_length ({max_length})")
    lengths = lengths.to(torch.float64)
    start = max_length - buffer
    ramp = (start - lengths) / buffer
    out = torch.where(lengths <= start, torch.zeros_like(lengths), torch.where(lengths <= max_length, ramp, -1.0))
    return out * factor


# --- KL ---------------------------------------------------------------------------------------
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π:
    k1 = log π - log π_ref (unbiased, high variance, may be negative), k2 = ½ (log-ratio)², k3 =
    exp(-d) - 1 + d with d = log π - log π_ref (unbiased, ≥ 0, low variance), abs = |d|."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d
    if kind == "abs":
        return d.abs()
    raise ConfigError(f"KL estimator {kind!r}: expected one of {', '.join(KL_ESTIMATORS)}")


class FixedKLController:
    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: β ← β · (1 + clip(KL / target - 1, ±0.2) · n_steps / horizon)."""

    def __init__(self, coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ConfigError(f"adaptive KL: target ({target}) and horizon ({horizon}) must be > 0")
        super().__init__(coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_penalised_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         coef: float, kind: str = "k1") -> torch.Tensor:
    """Token rewards [b, s]: -coef · KL per response token, plus the sequence's score [b] on its
    last response token (the PPO/RLHF reward shape)."""
    mask = mask.to(logp.dtype)
    rewards = -coef * kl_estimate(logp, ref_logp, kind) * mask
    last = _last_index(mask)
    has = mask.sum(dim=-1) > 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    rewards[rows, last[has]] += scores.to(rewards.dtype)[has]
    return rewards


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=-1).values.clamp(min=0)


# --- policy, value, entropy -------------------------------------------------------------------
def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """min(π_old / π_rollout, cap) per token, no gradient: corrects for the rollout engine sampling
    from a slightly different distribution than the trainer computes (TIS)."""
    if cap <= 0:
        raise ConfigError(f"TIS cap {cap}: must be > 0")
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float | None = None, dual_clip: float | None = None,
                aggregation: str = "token-mean", is_weights: torch.Tensor | None = None,
                loss_key: str = LOSS_KEY):
    """PPO's clipped surrogate per token, -min(r·A, clip(r, 1-ε_low, 1+ε_high)·A) with r = π/π_old;
    clip_high None = clip_low (symmetric); dual_clip c > 1 bounds the loss of negative advantages
    at -c·A (Ye et al.); is_weights multiply the per-token loss (TIS). Reports: clip fraction (the
    clipped term is the active one), dual-clip fraction, approximate KL(π_old || π) (k3),
    the ratio's mean."""
    clip_high = clip_low if clip_high is None else clip_high
    if dual_clip is not None and dual_clip <= 1.0:
        raise ConfigError(f"dual_clip {dual_clip}: must be > 1")
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clip_hit = (clipped > unclipped).to(logp.dtype)
    dual_hit = torch.zeros_like(loss)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_hit = ((advantages < 0) & (loss > bound)).to(logp.dtype)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    if is_weights is not None:
        loss = loss * is_weights
    total, count = aggregate(loss, mask, aggregation)
    reports = {
        loss_key: _pair(total, count),
        "clip_fraction": _masked_mean(clip_hit, mask),
        "dual_clip_fraction": _masked_mean(dual_hit, mask),
        "approx_kl": _masked_mean(torch.expm1(-log_ratio) + log_ratio, mask),
        "ratio": _masked_mean(ratio, mask),
    }
    return total, count, reports


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip: float | None = 0.2, aggregation: str = "token-mean", loss_key: str = LOSS_KEY):
    """½·max((V - R)², (V_old + clip(V - V_old, ±c) - R)²) per token (clip None: ½(V - R)²).
    Reports the clip fraction and the sums explained variance needs (`explained_variance`)."""
    mask = mask.to(values.dtype)
    loss = (values - returns) ** 2
    hit = torch.zeros_like(loss)
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        clipped_loss = (clipped - returns) ** 2
        hit = (clipped_loss > loss).to(values.dtype)
        loss = torch.maximum(loss, clipped_loss)
    total, count = aggregate(0.5 * loss, mask, aggregation)
    err = (returns - values).detach()
    reports = {
        loss_key: _pair(total, count),
        "value_clip_fraction": _masked_mean(hit, mask),
        "ev_returns": _masked_mean(returns, mask), "ev_returns_sq": _masked_mean(returns * returns, mask),
        "ev_error": _masked_mean(err, mask), "ev_error_sq": _masked_mean(err * err, mask),
    }
    return total, count, reports


def explained_variance(means: dict[str, float]) -> float:
    """1 - Var(R - V) / Var(R) from `value_loss`'s reported means (nan when Var(R) = 0)."""
    var_r = means["ev_returns_sq"] - means["ev_returns"] ** 2
    var_e = means["ev_error_sq"] - means["ev_error"] ** 2
    return 1.0 - var_e / var_r if var_r > 0 else math.nan


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) over the last dim (fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# --- preference (DPO / UPO) -------------------------------------------------------------------
def sequence_logprobs(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over each row's masked tokens: [b, s] -> [b]."""
    return (logp * mask.to(logp.dtype)).sum(dim=-1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
             beta: float = 0.1, kind: str = "sigmoid", label_smoothing: float = 0.0, loss_key: str = LOSS_KEY):
    """Per pair (sequence log-probs [n] each), with h = (π_c - π_r) - (ref_c - ref_r):
    sigmoid  -(1-ε)·log σ(β h) - ε·log σ(-β h)   (DPO; ε = label smoothing, cDPO)
    ipo      (h - 1/(2β))²                        (IPO)
    Reports: reward accuracy (β(π_c-ref_c) > β(π_r-ref_r)), mean margin, chosen / rejected rewards."""
    if beta <= 0:
        raise ConfigError(f"DPO beta {beta}: must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"DPO label_smoothing {label_smoothing}: must be in [0, 0.5)")
    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    if kind == "sigmoid":
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ConfigError(f"DPO kind {kind!r}: expected 'sigmoid' or 'ipo'")
    n = chosen.numel()
    total = per_pair.sum()
    r_c, r_r = beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()
    reports = {
        loss_key: _pair(total, n),
        "pair_accuracy": _pair((r_c > r_r).sum(), n),
        "reward_margin": _pair((r_c - r_r).sum(), n),
        "chosen_reward": _pair(r_c.sum(), n),
        "rejected_reward": _pair(r_r.sum(), n),
    }
    return total, torch.tensor(n, dtype=torch.int), reports
