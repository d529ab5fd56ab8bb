"""Reward normalisation per (domain, source), group filters and the prompt pre-filter,
checked against hand-computed numbers."""
from __future__ import annotations

import json
import math

import pytest

from megatron_ernie.rewards.filters import backend_sampler, filter_groups, prefilter_prompts
from megatron_ernie.rewards.generation import CallableBackend
from megatron_ernie.rewards.normalize import RewardNormalizer, strata
from megatron_ernie.rewards.types import RewardResult, RewardSample

A, B = ("math", "verifier"), ("chat", "grm")


# --- normaliser ------------------------------------------------------------------------------
def test_zscore_per_stratum():
    samples = [RewardSample(prompt="q", response="r", domain=d) for d in ("math", "chat", "math", "chat", "math")]
    results = [RewardResult(r, s) for r, s in [(1.0, "verifier"), (10.0, "grm"), (2.0, "verifier"),
                                                (10.0, "grm"), (3.0, "verifier")]]
    assert strata(samples, results) == [A, B, A, B, A]
    norm = RewardNormalizer()
    out = norm(strata(samples, results), [r.reward for r in results])
    # a: mean 2, population variance (1 + 0 + 1) / 3 = 2/3; b: mean 10, std 0 -> 0
    z = 1 / math.sqrt(2 / 3)
    assert out == pytest.approx([-z, 0.0, 0.0, 0.0, z])
    assert norm.summary()["math/verifier"] == pytest.approx(
        {"count": 3, "mean": 2.0, "std": math.sqrt(2 / 3), "min": 1.0, "max": 3.0})


def test_running_stats_over_two_batches_equal_one_batch():
    split, whole = RewardNormalizer(), RewardNormalizer()
    split.update([A, A], [1.0, 2.0])
    split.update([A, A, A], [3.0, 4.0, 5.0])
    whole.update([A] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    s = split.stats[A]
    # 1..5: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2
    assert (s.count, s.min, s.max) == (5, 1.0, 5.0)
    assert (s.mean, s.var) == pytest.approx((3.0, 2.0))
    assert split.normalize([A], [5.0]) == pytest.approx(whole.normalize([A], [5.0]))
    assert split.normalize([A], [5.0]) == pytest.approx([2 / math.sqrt(2)])


def test_ema_statistics():
    norm = RewardNormalizer(momentum=0.5)
    norm.update([A, A], [0.0, 2.0])          # first batch initialises: mean 1, var 1
    norm.update([A, A], [4.0, 4.0])          # batch mean 4, var 0, d = 3
    s = norm.stats[A]
    # mean 1 + 0.5 * 3 = 2.5; var 0.5 * (1 + 0.5 * 9) + 0.5 * 0 = 2.75
    assert (s.mean, s.var, s.count) == pytest.approx((2.5, 2.75, 4))
    assert norm.normalize([A], [4.0]) == pytest.approx([1.5 / math.sqrt(2.75)])


def test_update_then_normalize_order():
    norm = RewardNormalizer()
    assert norm([A, A], [0.0, 2.0]) == pytest.approx([-1.0, 1.0])    # the batch's own statistics
    assert norm.normalize([A], [3.0]) == pytest.approx([2.0])        # no update: mean 1, std 1
    assert norm.stats[A].count == 2


@pytest.mark.parametrize("below_min, expected", [("center", [-1.0, 1.0]), ("pass", [1.0, 3.0])])
def test_min_count(below_min, expected):
    norm = RewardNormalizer(min_count=3, below_min=below_min)
    assert norm([A, A], [1.0, 3.0]) == pytest.approx(expected)
    # third reward: 1, 3, 5 -> mean 3, variance 8/3 -> z-scores from now on
    assert norm([A], [5.0]) == pytest.approx([2 / math.sqrt(8 / 3)])


def test_minmax_clip_none_and_unseen_keys():
    assert RewardNormalizer("minmax")([A] * 3, [2.0, 4.0, 6.0]) == pytest.approx([0.0, 0.5, 1.0])
    assert RewardNormalizer(clip=1.0)([A] * 3, [1.0, 2.0, 3.0]) == pytest.approx([-1.0, 0.0, 1.0])
    none = RewardNormalizer("none")
    assert none([A, A], [1.0, 3.0]) == [1.0, 3.0] and none.stats[A].mean == 2.0
    assert RewardNormalizer().normalize([B], [7.0]) == [7.0]


def test_state_dict_round_trip_through_json():
    norm = RewardNormalizer(momentum=0.1)
    norm([A, B, A], [1.0, 0.5, 3.0])
    norm([A, B], [2.0, 0.7])
    state = json.loads(json.dumps(norm.state_dict()))
    assert state["stats"][0]["key"] == ["math", "verifier"]
    resumed = RewardNormalizer(momentum=0.1)
    resumed.load_state_dict(state)
    assert resumed.stats == norm.stats
    assert resumed([A, B], [4.0, 0.1]) == norm([A, B], [4.0, 0.1])     # continues identically
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({"version": 99, "stats": []})


def test_normalizer_rejects_bad_input():
    with pytest.raises(ValueError, match="2 keys for 1 rewards"):
        RewardNormalizer()([A, A], [1.0])
    with pytest.raises(ValueError, match="not finite"):
        RewardNormalizer()([A], [float("nan")])
    with pytest.raises(ValueError, match="mode"):
        RewardNormalizer("rank")
    with pytest.raises(ValueError, match="momentum"):
        RewardNormalizer(momentum=1.5)


# --- group filter ----------------------------------------------------------------------------
GROUPS = ["easy", "hard", "flat", "good", "easy", "hard", "flat", "good"]
REWARDS = [1.0, 0.0, 0.49, 0.0, 1.0, 0.0, 0.51, 1.0]


def test_filter_groups_by_correctness_and_variance():
    # flat: rewards 0.49 / 0.51 (one correct at threshold 0.5), variance 0.0001
    res = filter_groups(GROUPS, REWARDS, min_variance=0.01)
    assert res.kept_groups == ["good"] and res.kept_indices == [3, 7]
    assert res.dropped == {"easy": "all_correct", "hard": "all_wrong", "flat": "low_variance"}
    assert res.counts == {"total": 4, "kept": 1, "all_correct": 1, "all_wrong": 1, "low_variance": 1}


def test_filter_groups_options():
    keep_flat = filter_groups(GROUPS, REWARDS)                       # no variance filter
    assert keep_flat.kept_groups == ["flat", "good"]
    # without the all-correct rule, "easy" (variance 0) falls to the variance rule
    res = filter_groups(GROUPS, REWARDS, drop_all_correct=False, min_variance=0.01)
    assert res.dropped["easy"] == "low_variance"
    # explicit flags win over the reward threshold: "good" marked all correct
    flags = [True, False, True, True, True, False, False, True]
    assert filter_groups(GROUPS, REWARDS, correct=flags).dropped == {"easy": "all_correct", "hard": "all_wrong",
                                                                     "good": "all_correct"}


def test_filter_groups_takes_samples_and_results():
    samples = [RewardSample(prompt="q", response=str(i), group=g) for i, g in enumerate(["x", "x", "y", "y"])]
    results = [RewardResult(r, "math") for r in (1.0, 0.0, 1.0, 1.0)]
    res = filter_groups(samples, results)
    assert res.kept_indices == [0, 1] and res.counts["all_correct"] == 1
    with pytest.raises(ValueError, match="sample 0 has no group"):
        filter_groups([RewardSample(prompt="q", response="r")], [1.0])
    with pytest.raises(ValueError, match="same length"):
        filter_groups(["x"], [1.0, 0.0])


# --- prompt pre-filter -----------------------------------------------------------------------
K = 4
SOLVED = {"p0": 0, "p1": 1, "p2": 4, "p3": 2, "p4": 3}     # correct responses out of K


class FakeSampler:
    def __init__(self, fail_on_call: int | None = None):
        self.calls = []
        self.fail_on_call = fail_on_call

    def __call__(self, prompts, k):
        self.calls.append(list(prompts))
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("sampler crashed")
        return [["right"] * SOLVED[p] + ["wrong"] * (k - SOLVED[p]) for p in prompts]


def exact_scorer(samples):
    return [1.0 if s.response == "right" else 0.0 for s in samples]


def records():
    return [{"prompt": p, "id": i, "reference": "right"} for i, p in enumerate(SOLVED)]


def test_prefilter_pass_rates_and_counts():
    sampler = FakeSampler()
    res = prefilter_prompts(records(), sampler, exact_scorer, k=K, batch_size=2, progress=False)
    assert res.pass_rates == [0.0, 0.25, 1.0, 0.5, 0.75]
    assert [r["prompt"] for r in res.kept] == ["p1", "p3", "p4"]
    assert res.counts == {"total": 5, "kept": 3, "too_hard": 1, "too_easy": 1, "failed_scores": 0}
    assert sampler.calls == [["p0", "p1"], ["p2", "p3"], ["p4"]]      # streamed in batches


def test_prefilter_bounds_are_strict():
    res = prefilter_prompts(records(), FakeSampler(), exact_scorer, k=K, low=0.25, high=0.75, progress=False)
    assert [r["prompt"] for r in res.kept] == ["p3"]
    assert res.counts["too_hard"] == 2 and res.counts["too_easy"] == 2
    with pytest.raises(ValueError, match="low < high"):
        prefilter_prompts(records(), FakeSampler(), exact_scorer, low=0.5, high=0.5)


def test_prefilter_scores_samples_built_from_records_with_a_reward_source():
    seen = []

    class Source:
        name = "fake"

        def score(self, samples):
            seen.extend(samples)
            return [RewardResult.failure("fake", "timeout") if s.response == "wrong"
                    else RewardResult(1.0, "fake") for s in samples]

    res = prefilter_prompts(records()[:2], FakeSampler(), Source(), k=K, progress=True)
    assert res.pass_rates == [0.0, 0.25] and res.counts["failed_scores"] == 7
    first = seen[4]   # prompt p1's first response
    assert (first.prompt, first.response, first.reference, first.group, first.uid) == ("p1", "right", "right", "1", "1/0")
    assert first.meta == {"id": 1}


def test_prefilter_writes_jsonl_atomically(tmp_path):
    out = tmp_path / "kept.jsonl"
    out.write_text("old\n")
    with pytest.raises(RuntimeError, match="sampler crashed"):
        prefilter_prompts(records(), FakeSampler(fail_on_call=2), exact_scorer, k=K, batch_size=2,
                          output=out, progress=False)
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["kept.jsonl"]

    prefilter_prompts(records(), FakeSampler(), exact_scorer, k=K, batch_size=2, output=out, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "p1", "id": 1, "reference": "right", "pass_rate": 0.25},
                    {"prompt": "p3", "id": 3, "reference": "right", "pass_rate": 0.5},
                    {"prompt": "p4", "id": 4, "reference": "right", "pass_rate": 0.75}]
    assert [p.name for p in tmp_path.iterdir()] == ["kept.jsonl"]


def test_backend_sampler_one_call_per_batch_with_seeds():
    backend = CallableBackend(lambda prompts: [f"{p}#{i}" for i, p in enumerate(prompts)])
    sample = backend_sampler(backend, max_new_tokens=16, temperature=0.8, seed=100)
    assert sample(["a", "b"], 2) == [["a#0", "a#1"], ["b#2", "b#3"]]
    sample(["c"], 3)
    assert [c["prompts"] for c in backend.calls] == [["a", "a", "b", "b"], ["c", "c", "c"]]
    assert [(c["seed"], c["temperature"], c["max_new_tokens"]) for c in backend.calls] == [(100, 0.8, 16), (101, 0.8, 16)]


def test_prefilter_over_a_generator_of_strings_and_samples():
    prompts = (p for p in ["p3", RewardSample(prompt="p1", response="", group="g")])
    res = prefilter_prompts(prompts, FakeSampler(), exact_scorer, k=K, progress=False)
    assert res.pass_rates == [0.5, 0.25] and res.kept[0] == "p3" and res.kept[1].group == "g"
