"""RL losses and advantages against values worked by hand (the numbers in the comments)."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_ernie.algorithms import rl_losses as L
from megatron_ernie.errors import ConfigError
from megatron_ernie.training.step import LOSS_KEY

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


def mean(report) -> float:
    return float(report[0] / report[1])


# --- aggregation ----------------------------------------------------------------------------
PER_TOKEN = t([[1, 2, 3, 0], [4, 9, 9, 9], [7, 7, 7, 7]])
MASK = t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # ragged rows, the last without any token


@pytest.mark.parametrize("mode, total, count", [
    ("token-mean", 10.0, 4),           # (1+2+3+4) / 4 tokens
    ("seq-mean-token-sum", 10.0, 2),   # (6 + 4) / 2 sequences
    ("seq-mean-token-mean", 6.0, 2),   # (6/3 + 4/1) / 2 sequences
])
def test_aggregations(mode, total, count):
    s, n = L.aggregate(PER_TOKEN, MASK, mode)
    assert s.item() == pytest.approx(total) and n.item() == count and n.dtype == torch.int
    # split into micro-batches (or DP ranks): the summed sums over the summed counts are the same mean
    parts = [L.aggregate(PER_TOKEN[i:i + 1], MASK[i:i + 1], mode) for i in range(3)]
    assert sum(p[0] for p in parts).item() / sum(p[1] for p in parts).item() == pytest.approx(total / count)


def test_unknown_aggregation_is_named():
    with pytest.raises(ConfigError, match="loss aggregation 'mean': expected one of token-mean"):
        L.aggregate(PER_TOKEN, MASK, "mean")


# --- advantages -----------------------------------------------------------------------------
def test_gae_on_a_ragged_batch():
    rewards = t([[0, 0, 0, 1], [0, 2, 5, 0]])
    values = t([[9, 0.5, 0.6, 0.7], [0.2, 0.4, 7, 7]])
    mask = t([[0, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: δ3 = 1 - .7 = .3; δ2 = .9·.7 - .6 = .03, A2 = .03 + .45·.3 = .165;
    #        δ1 = .9·.6 - .5 = .04, A1 = .04 + .45·.165 = .11425; position 0 is the prompt
    # row 1: positions 2, 3 are padding (their 5 and 7 are ignored): δ1 = 2 - .4 = 1.6;
    #        δ0 = .9·.4 - .2 = .16, A0 = .16 + .45·1.6 = .88
    assert torch.allclose(adv, t([[0, 0.11425, 0.165, 0.3], [0.88, 1.6, 0, 0]]), atol=1e-12)
    assert torch.allclose(ret, t([[0, 0.61425, 0.765, 1.0], [1.08, 2.0, 0, 0]]), atol=1e-12)


def test_gae_carries_over_an_unmasked_gap():
    # mask [1, 0, 1], γ = λ = 1: A2 = 1 - .2 = .8; A0 = (0 + .2 - .5) + .8 = .5 (position 1 skipped)
    adv, _ = L.gae(t([[0, 9, 1]]), t([[0.5, 9, 0.2]]), t([[1, 0, 1]]), gamma=1.0, lam=1.0)
    assert torch.allclose(adv, t([[0.5, 0, 0.8]]), atol=1e-12)


def test_whiten_over_the_mask():
    x, mask = t([1, 2, 3, 40]), t([1, 1, 1, 0])
    # mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1
    assert torch.allclose(L.whiten(x, mask), t([-1, 0, 1, 0]), atol=1e-6)
    assert torch.allclose(L.whiten(x, mask, shift_mean=False), t([1, 2, 3, 0]), atol=1e-6)


def test_group_advantages():
    rewards = t([1, 0, 0, 1, 0.5, 2, 2, 3, 1])
    groups = [0, 0, 0, 0, 1, 2, 2, 3, 3]
    adv = L.group_advantages(rewards, groups, eps=0.0)
    # group 0: mean .5, unbiased std √(4·.25 / 3) = .57735 -> ±.866025; group 1 alone -> 0;
    # group 2 equal -> 0; group 3: mean 2, std √2 -> ±.707107
    s = 0.5 / math.sqrt(1 / 3)
    want = t([s, -s, -s, s, 0, 0, 0, 1 / math.sqrt(2), -1 / math.sqrt(2)])
    assert torch.allclose(adv[[0, 1, 2, 3, 4, 7, 8]], want[[0, 1, 2, 3, 4, 7, 8]], atol=1e-9)
    assert torch.equal(L.group_advantages(rewards, groups)[5:7], t([0, 0]))  # 0 / (0 + eps)
    plain = L.group_advantages(rewards, groups, normalize_std=False)
    assert torch.allclose(plain, t([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 1, -1]), atol=1e-12)


def test_overlong_penalty():
    lengths = torch.tensor([10, 15, 16, 18, 20, 25])
    # max 20, buffer 5: 0 up to 15, then (15 - L) / 5 down to -1 at 20, -1 beyond
    assert torch.allclose(L.overlong_penalty(lengths, 20, 5), t([0, 0, -0.2, -0.6, -1.0, -1.0]))
    assert torch.allclose(L.overlong_penalty(lengths, 20, 5, factor=0.5), t([0, 0, -0.1, -0.3, -0.5, -0.5]))
    with pytest.raises(ConfigError, match="overlong buffer 0"):
        L.overlong_penalty(lengths, 20, 0)


# --- KL ---------------------------------------------------------------------------------------
def test_kl_estimators():
    half, quarter = math.log(0.5), math.log(0.25)
    logp, ref = t([half, quarter]), t([quarter, half])  # d = +ln 2, -ln 2
    ln2 = math.log(2)
    assert torch.allclose(L.kl_estimate(logp, ref, "k1"), t([ln2, -ln2]))
    assert torch.allclose(L.kl_estimate(logp, ref, "k2"), t([ln2 ** 2 / 2, ln2 ** 2 / 2]))
    # k3 = e^{-d} - 1 + d: 0.5 - 1 + ln 2 = .193147; 2 - 1 - ln 2 = .306853
    assert torch.allclose(L.kl_estimate(logp, ref, "k3"), t([0.5 - 1 + ln2, 2 - 1 - ln2]))
    assert torch.allclose(L.kl_estimate(logp, ref, "abs"), t([ln2, ln2]))
    with pytest.raises(ConfigError, match="KL estimator 'k4'"):
        L.kl_estimate(logp, ref, "k4")


def test_adaptive_kl_controller():
    c = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(kl=9.0, n_steps=256)  # error clip(9/6 - 1) = +.2 -> 0.1 · (1 + .2·256/1e4)
    assert c.value == pytest.approx(0.1 * 1.00512)
    c.update(kl=3.0, n_steps=256)  # error clip(-.5) = -.2
    assert c.value == pytest.approx(0.1 * 1.00512 * 0.99488)
    again = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    again.load_state_dict(c.state_dict())
    assert again.value == c.value
    fixed = L.FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    with pytest.raises(ConfigError, match="adaptive KL: target"):
        L.AdaptiveKLController(0.1, target=0.0, horizon=1)


def test_kl_penalised_rewards_put_the_score_on_the_last_response_token():
    logp = t([[0.0, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.4]])
    ref = torch.zeros_like(logp)
    mask = t([[0, 1, 1, 0], [1, 1, 1, 1]])
    r = L.kl_penalised_rewards(t([1.0, 2.0]), logp, ref, mask, coef=0.1, kind="k1")
    assert torch.allclose(r, t([[0, -0.03, -0.02 + 1.0, 0], [-0.01, -0.01, -0.01, -0.04 + 2.0]]), atol=1e-12)


# --- policy -----------------------------------------------------------------------------------
def test_clipped_policy_loss_at_and_beyond_both_clips_with_dual_clip():
    # DAPO clip-higher (ε_low .2, ε_high .28) with dual clip c = 3; old log-probs 0, ratio = e^logp
    ratio = t([[1.5, 1.1, 0.5, 5.0, 0.5, 1.28]])
    adv = t([[1.0, 1.0, -1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones_like(ratio)
    s, n, rep = L.policy_loss(ratio.log(), torch.zeros_like(ratio), adv, mask, clip_low=0.2, clip_high=0.28,
                              dual_clip=3.0)
    # per token: beyond the high clip -1.28 (clipped); inside -1.1; beyond the low clip (A<0) +0.8
    # (clipped); A<0, r=5: max(5, 1.28) = 5, dual clip -> 3; A>0 below the low clip: -0.5 (the clip
    # would help: not taken); at the high clip -1.28. Sum -0.36 over 6 tokens
    assert s.item() == pytest.approx(-0.36) and n.item() == 6
    assert mean(rep[LOSS_KEY]) == pytest.approx(-0.06)
    assert rep["dual_clip_fraction"][0].item() == 1
    assert rep["clip_fraction"][0].item() in (2, 3)  # the token exactly at the clip may round either way
    no_dual = L.policy_loss(ratio.log(), torch.zeros_like(ratio), adv, mask, clip_low=0.2, clip_high=0.28)
    assert no_dual[0].item() == pytest.approx(-0.36 - 3 + 5)
    # symmetric PPO: ε_high = ε_low = .2 -> the first and last tokens clip at 1.2
    ppo = L.policy_loss(ratio.log(), torch.zeros_like(ratio), adv, mask)
    assert ppo[0].item() == pytest.approx(-1.2 - 1.1 + 0.8 + 5 - 0.5 - 1.2)
    with pytest.raises(ConfigError, match="dual_clip 1.0: must be > 1"):
        L.policy_loss(ratio.log(), torch.zeros_like(ratio), adv, mask, dual_clip=1.0)


def test_policy_loss_reports_and_aggregation():
    logp = t([[0.0, 0.1, 0.0], [-0.1, 0.0, 0.0]])
    adv = t([[2.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    s, n, rep = L.policy_loss(logp, torch.zeros_like(logp), adv, mask, aggregation="seq-mean-token-mean")
    e1, em1 = math.exp(0.1), math.exp(-0.1)
    # row 0: (-2 - 2e^{.1}) / 2; row 1: -e^{-.1}; over 2 sequences
    assert s.item() == pytest.approx((-2 - 2 * e1) / 2 - em1) and n.item() == 2
    assert mean(rep["ratio"]) == pytest.approx((1 + e1 + em1) / 3)
    # approx KL(π_old || π) = E[e^{-d} - 1 + d] over the 3 tokens
    assert mean(rep["approx_kl"]) == pytest.approx((math.exp(-0.1) - 1 + 0.1 + math.exp(0.1) - 1 - 0.1) / 3)


def test_truncated_is_weights_cap_and_multiply_the_loss():
    old, rollout = t([[math.log(3.0), math.log(0.5)]]), t([[0.0, 0.0]])
    w = L.truncated_is_weights(old, rollout, cap=2.0)
    assert torch.allclose(w, t([[2.0, 0.5]]))  # min(3, 2), 0.5
    logp = torch.zeros(1, 2, dtype=D)
    s, _, _ = L.policy_loss(logp, logp, t([[1.0, 1.0]]), torch.ones(1, 2, dtype=D), is_weights=w)
    assert s.item() == pytest.approx(-(2.0 + 0.5))
    with pytest.raises(ConfigError, match="TIS cap 0"):
        L.truncated_is_weights(old, rollout, cap=0)


def test_policy_loss_gradient_is_zero_where_clipped():
    logp = t([[math.log(1.5), math.log(1.1)]]).requires_grad_()
    s, _, _ = L.policy_loss(logp, torch.zeros(1, 2, dtype=D), t([[1.0, 1.0]]), torch.ones(1, 2, dtype=D))
    s.backward()
    assert logp.grad[0, 0].item() == 0.0  # beyond the clip: no gradient
    assert logp.grad[0, 1].item() == pytest.approx(-1.1)  # d(-A·e^logp)/dlogp = -A·r


# --- value, entropy ---------------------------------------------------------------------------
def test_value_loss_with_clipping_and_explained_variance():
    values, old, returns = t([[1.0, 0.0, 5.0]]), t([[0.5, 0.0, 5.0]]), t([[2.0, 0.1, 0.0]])
    mask = t([[1, 1, 0]])
    s, n, rep = L.value_loss(values, old, returns, mask, clip=0.2)
    # token 0: max((1-2)², (0.5+0.2-2)²) = 1.69 -> .845 (clipped); token 1: ½·.01 = .005
    assert s.item() == pytest.approx(0.85) and n.item() == 2
    assert mean(rep["value_clip_fraction"]) == pytest.approx(0.5)
    plain = L.value_loss(values, old, returns, mask, clip=None)
    assert plain[0].item() == pytest.approx(0.5 + 0.005)
    means = {k: mean(v) for k, v in rep.items()}
    # R = [2, .1], R - V = [1, .1]: Var(R) = .9025, Var(R - V) = .2025 -> EV = 1 - .2025/.9025
    assert L.explained_variance(means) == pytest.approx(1 - 0.2025 / 0.9025)


def test_entropy_from_logits():
    h = L.entropy_from_logits(torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]))
    assert torch.allclose(h, torch.tensor([math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]))


def test_vocab_parallel_entropy_on_one_rank_is_the_plain_entropy():
    from megatron_ernie.training.forward import token_entropy

    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.allclose(token_entropy(logits), L.entropy_from_logits(logits), atol=1e-5)


# --- preference -----------------------------------------------------------------------------
def test_dpo_ipo_and_label_smoothing():
    chosen, rejected, ref_c, ref_r = t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0])
    # h = (-1 + 3) - 0 = 2; β = .1: -log σ(.2) = log(1 + e^{-.2}) = .598139
    s, n, rep = L.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    assert s.item() == pytest.approx(math.log1p(math.exp(-0.2))) and n.item() == 1
    assert mean(rep["chosen_reward"]) == pytest.approx(0.1) and mean(rep["rejected_reward"]) == pytest.approx(-0.1)
    assert mean(rep["reward_margin"]) == pytest.approx(0.2) and mean(rep["pair_accuracy"]) == 1.0
    smooth = L.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1, label_smoothing=0.1)[0]
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2)))
    ipo = L.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1, kind="ipo")[0]
    assert ipo.item() == pytest.approx((2 - 5) ** 2)  # (h - 1/(2β))²
    with pytest.raises(ConfigError, match="DPO kind 'hinge'"):
        L.dpo_loss(chosen, rejected, ref_c, ref_r, kind="hinge")
    with pytest.raises(ConfigError, match="label_smoothing 0.5"):
        L.dpo_loss(chosen, rejected, ref_c, ref_r, label_smoothing=0.5)


def test_sequence_logprobs_sum_the_response():
    assert torch.allclose(L.sequence_logprobs(t([[-1, -2, -3]]), t([[0, 1, 1]])), t([-5]))


def test_policy_loss_reports_the_entropy_of_the_logits(world1):
    """The vocab-parallel cross entropy rewrites fp32 logits in place: the entropy must be read first."""
    from types import SimpleNamespace

    from megatron_ernie.algorithms import policy_step

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7) * 4.0  # peaked: entropy well below log 7
    expected = L.entropy_from_logits(logits)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    labels = torch.randint(0, 7, (2, 5))
    zeros = torch.zeros(2, 5)
    batch = {"labels": labels, "loss_mask": mask, "old_logprobs": zeros, "rollout_logprobs": zeros,
             "advantages": torch.ones(2, 5)}
    policy = SimpleNamespace(tis_cap=None, clip_low=0.2, clip_high=0.28, dual_clip=None, aggregation="token-mean",
                             kl_coef=0.0)
    _, _, reports = policy_step.loss(batch, policy, None, logits.clone())
    got = reports["entropy"][0] / reports["entropy"][1]
    assert float(got) == pytest.approx(float((expected * mask).sum() / mask.sum()), rel=1e-5)
    assert float(got) < math.log(7) - 0.5
