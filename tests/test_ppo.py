"""PPO with online UPO on the one loop: actor, critic and frozen reference; the KL penalty and its
adaptive controller; GAE; UPO pairs in their micro-batches; critic warm-up; the first step equal at
every layout; exact resume (the KL controller's state included)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import recorded, rl_inputs, run_and_record, spawn  # helpers registers the test_vowels reward

BASE = ["recipe=ppo", "data.seq_length=48", "train.micro_batch_size=2", "optim.lr=3e-3", "train.steps=2",
        "checkpoint.interval=1", "rl.rollout.prompts_per_step=2", "rl.rollout.samples_per_prompt=4",
        "rl.rollout.max_new_tokens=12", "rl.policy.mini_batches=1", "rl.ppo.kl_target=0.01",
        "rl.ppo.kl_horizon=100"]


def _train(rank, world, overrides, out: Path, fault: str | None = None):
    run_and_record(rank, world, [*BASE, *overrides], out, fault=fault)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    return root, rl_inputs(root)


def _rows(out: Path) -> list[dict]:
    return recorded(out)["rows"]


@pytest.fixture(scope="module")
def three_steps(setup):
    root, common = setup
    out = root / "three"
    spawn(_train, 1, [*common, "train.steps=3"], out)
    return recorded(out), out


def test_ppo_with_upo_reports_every_part(three_steps):
    rows = three_steps[0]["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert math.isfinite(r["critic/loss"]) and r["critic/grad_norm"] > 0
        assert -1e6 < r["critic/explained_variance"] <= 1.0 or math.isnan(r["critic/explained_variance"])
        assert r["upo/pairs"] == 2  # vowel shares differ within each group of 4: one pair per group
        assert math.isfinite(r["upo_loss"]) and 0.0 <= r["upo_pair_accuracy"] <= 1.0
        assert r["rollout/logp_abs_diff"] < 1e-5
    assert rows[0]["ppo/kl"] == 0.0  # the policy starts as the reference
    assert rows[-1]["ppo/kl"] != 0.0
    # the adaptive controller moves β: KL 0 < target at step 1 lowers it by the 20 % clip × n/horizon
    assert rows[0]["ppo/kl_coef"] == pytest.approx(0.05)
    assert rows[1]["ppo/kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 100))
    # the UPO loss at step 1 (policy = reference): -log σ(0) = log 2 for every pair
    assert rows[0]["upo_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_critic_warmup_trains_only_the_critic(setup, tmp_path):
    root, common = setup
    out = tmp_path / "run"
    spawn(_train, 1, [*common, "rl.ppo.critic_warmup_steps=1"], out)
    first, second = _rows(out)
    assert "clip_fraction" not in first and "critic/loss" in first
    assert "clip_fraction" in second and "critic/loss" in second
    assert second["rollout/logp_abs_diff"] < 1e-5 and second["ppo/kl"] == 0.0  # the policy did not move


def test_upo_needs_even_micro_batches(setup, tmp_path):
    root, common = setup
    with pytest.raises(Exception, match=r"online UPO .* train.micro_batch_size \(1\) and "
                                         r"rl.rollout.samples_per_prompt \(4\) must be even"):
        spawn(_train, 1, [*common, "train.micro_batch_size=1"], tmp_path / "run")


# --- layouts, resume ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(setup):
    root, common = setup
    out = root / "single"
    spawn(_train, 1, [*common, "train.steps=1"], out)
    return _rows(out)[0]


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.ep=2", "parallel.pp=2", "dp"])
def test_first_step_equal_at_every_layout(setup, single, tmp_path, layout):
    root, common = setup
    out = tmp_path / "run"
    spawn(_train, 2, [*common, "train.steps=1", *([] if layout == "dp" else [layout])], out)
    got = _rows(out)[0]
    assert got["rollout/reward_mean"] == pytest.approx(single["rollout/reward_mean"], rel=1e-6)
    for key in ("critic/loss", "upo_loss"):
        assert got[key] == pytest.approx(single[key], rel=1e-6), key
    # At step 1 the surrogate is -mean(whitened advantages): 0 up to rounding (~1e-7 here), and
    # that rounding differs between layouts. So the policy loss (surrogate + c·UPO, ~0.35) is
    # compared at 1e-6 of its O(1) scale. Its gradient sums terms of both signs, and the norm
    # differs by up to 1.3e-6 relative (DP=2: 9e-7).
    assert got["loss"] == pytest.approx(single["loss"], abs=1e-6)
    for key in ("grad_norm", "critic/grad_norm"):
        assert got[key] == pytest.approx(single[key], rel=2e-6), key


def test_kill_and_resume_is_bit_exact(setup, three_steps, tmp_path):
    ref = three_steps[0]
    root, common = setup
    out = tmp_path / "run"
    with pytest.raises(Exception, match="SIGKILL"):
        spawn(_train, 1, [*common, "train.steps=3"], out, "after_step:2")
    spawn(_train, 1, [*common, "train.steps=3"], out)
    got = recorded(out)
    assert got["losses"] == {"3": ref["losses"]["3"]}
    strip = [{k: v for k, v in r.items() if not k.endswith("_s")} for r in got["rows"]]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("_s")} for r in ref["rows"]]
