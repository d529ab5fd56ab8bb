"""The reward router: routes, weighted combination, concurrency, failures counted, normalisation,
configuration errors, and the shipped ERNIE reward configs built with real sources."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megatron_ernie.rewards.router import RewardConfigError, RewardRouter
from megatron_ernie.rewards.types import RewardResult, RewardSample

ROOT = Path(__file__).resolve().parents[1]


class Table:
    """A stub source: reward = table[response]; records every batch it is given."""

    def __init__(self, table: dict, name: str = "table"):
        self.name, self.table, self.batches = name, table, []

    def score(self, samples):
        self.batches.append([s.response for s in samples])
        return [RewardResult(self.table[s.response], self.name) for s in samples]


class Broken:
    name = "broken"

    def score(self, samples):
        raise RuntimeError("judge server down")


def S(response, domain="general", task="default", **kw):
    return RewardSample("q", response, domain=domain, task=task, **kw)


def router(sources, routes, **kw):
    return RewardRouter.from_config({"sources": sources, "routes": routes, **kw})


def test_samples_go_to_the_first_matching_route_and_combine_by_weight():
    verifier = Table({"a": 1.0, "b": 0.0, "c": 1.0})
    bt = Table({"a": 0.5, "b": 2.0, "c": -1.0, "d": 3.0})
    r = router({"verifier": verifier, "bt": bt},
               [{"domain": "vl_stem", "combine": {"bt": 1.0, "verifier": 1.0}},
                {"domain": "math*", "combine": {"verifier": 2.0}},
                {"domain": "*", "task": "chat", "combine": {"bt": 0.5}}])
    out = r.score([S("a", "vl_stem"), S("b", "math_hard"), S("c", "vl_stem"), S("d", "general", "chat"),
                   S("a", "general", "other")])
    assert [o.reward for o in out[:4]] == [1.5, 0.0, 0.0, 1.5]  # 0.5+1, 2*0, -1+1, 0.5*3
    assert [o.route for o in out[:4]] == ["vl_stem/*", "math*/*", "vl_stem/*", "*/chat"]
    assert out[0].components["bt"].reward == 0.5 and out[0].components["verifier"].reward == 1.0
    assert out[4].route is None and out[4].reward == 0.0 and out[4].failed == ["<no route>"]
    assert r.metrics()["reward/unrouted"] == 1.0
    # one call per source per batch, with all of its samples
    assert verifier.batches == [["a", "b", "c"]] and bt.batches == [["a", "c", "d"]]
    assert out[3].record()["components"]["bt"] == {"reward": 3.0, "used": 3.0, "reason": "", "failed": False}


def test_min_mode_needs_every_judge_and_fallback_takes_the_first_that_scored():
    a, b = Table({"x": 1.0, "y": 1.0}), Table({"x": 1.0, "y": 0.0})
    r = router({"a": a, "b": b, "broken": Broken()},
               [{"domain": "puzzle", "mode": "min", "combine": {"a": 1.0, "b": 1.0}},
                {"domain": "fb", "mode": "fallback", "combine": {"broken": 1.0, "b": 0.5}}])
    out = r.score([S("x", "puzzle"), S("y", "puzzle"), S("x", "fb")])
    assert [o.reward for o in out] == [1.0, 0.0, 0.5]
    assert out[2].failed == ["broken"] and "judge server down" in out[2].components["broken"].reason


def test_sources_run_concurrently():
    barrier = threading.Barrier(2, timeout=10)

    class Waits(Table):
        def score(self, samples):
            barrier.wait()  # both sources must be inside score() at once, else BrokenBarrierError
            return super().score(samples)

    r = router({"p": Waits({"x": 1.0}), "q": Waits({"x": 2.0})}, [{"combine": {"p": 1.0, "q": 1.0}}], concurrency=2)
    out = r.score([S("x")])
    assert out[0].reward == 3.0 and out[0].failed == []


def test_broken_sources_never_crash_the_batch_and_are_counted():
    class Short(Table):
        def score(self, samples):
            return super().score(samples)[:-1]

    class NaN(Table):
        def score(self, samples):
            return [RewardResult(float("nan"), "nan") for _ in samples]

    good = Table({"x": 1.0, "y": 0.25})
    r = router({"good": good, "broken": Broken(), "short": Short({"x": 1, "y": 1}), "nan": NaN({})},
               [{"combine": {"good": 1.0, "broken": 1.0, "short": 1.0, "nan": 1.0}}])
    out = r.score([S("x"), S("y")])
    assert [o.reward for o in out] == [1.0, 0.25]  # only the good source counts; failures give 0
    for o in out:
        assert sorted(o.failed) == ["broken", "nan", "short"]
        assert "RuntimeError: judge server down" in o.components["broken"].reason
        assert "returned 1 results for 2 samples" in o.components["short"].reason
        assert "non-finite reward" in o.components["nan"].reason
    m = r.metrics()
    assert (m["reward/good/scored"], m["reward/broken/failed"], m["reward/short/failed"], m["reward/nan/failed"]) == (2, 2, 2, 2)
    assert r.reasons["broken"]["source error: RuntimeError: judge server down"] == 2


def test_rewards_are_standardised_per_domain_and_source():
    v = Table({"1": 1.0, "2": 2.0, "3": 3.0, "10": 10.0})
    flaky = Table({"1": 0.0, "2": 4.0, "3": 8.0, "10": 5.0})
    r = router({"v": v, "flaky": flaky}, [{"combine": {"v": 1.0, "flaky": 0.5}}],
               normalize={"mode": "zscore", "min_count": 2})
    out = r.score([S("1", "a"), S("2", "a"), S("3", "a"), S("10", "b"), S("10", "b")])
    z = 1.0 / (2.0 / 3.0) ** 0.5  # (x - 2) / std([1, 2, 3]) for x = 3
    # v in domain a: z-scores of [1, 2, 3]; flaky in domain a: [0, 4, 8] -> the same z-scores
    assert [o.normalized["v"] for o in out[:3]] == pytest.approx([-z, 0.0, z])
    assert [o.normalized["flaky"] for o in out[:3]] == pytest.approx([-z, 0.0, z])
    assert [o.reward for o in out[:3]] == pytest.approx([-1.5 * z, 0.0, 1.5 * z])
    assert [o.normalized["v"] for o in out[3:]] == [0.0, 0.0]  # domain b: constant -> its mean


def test_failed_rewards_stay_out_of_the_statistics():
    class Sometimes(Table):
        def score(self, samples):
            return [RewardResult.failure(self.name, "unparsable judge output") if s.response == "bad"
                    else RewardResult(self.table[s.response], self.name) for s in samples]

    r = router({"j": Sometimes({"1": 1.0, "3": 3.0})}, [{"combine": {"j": 1.0}}],
               normalize={"mode": "zscore", "min_count": 2})
    out = r.score([S("1"), S("bad"), S("3")])
    assert [o.reward for o in out] == pytest.approx([-1.0, 0.0, 1.0])  # stats of [1, 3] only
    assert r.normalizer.stats[("general", "j")].count == 2


@pytest.mark.parametrize("cfg, message", [
    ({"sources": {"m": {"type": "math"}}, "routes": [{"combine": {"x": 1.0}}]}, "rewards.routes[0].combine.x: no such source"),
    ({"sources": {"m": {"type": "nope"}}, "routes": [{"combine": {"m": 1.0}}]}, "rewards.sources.m.type='nope': unknown"),
    ({"sources": {"m": {"kind": "math"}}, "routes": [{"combine": {"m": 1.0}}]}, "rewards.sources.m: needs a 'type'"),
    ({"sources": {"m": {"type": "math"}}, "routes": [{"mode": "avg", "combine": {"m": 1.0}}]}, "rewards.routes[0].mode='avg'"),
    ({"sources": {"m": {"type": "math"}}, "routes": [{"combine": {"m": "high"}}]}, "rewards.routes[0].combine.m: weight must be a number"),
    ({"sources": {"m": {"type": "math"}}, "routes": [{"domian": "x", "combine": {"m": 1}}]}, "rewards.routes[0]: unknown keys ['domian']"),
    ({"sources": {"m": {"type": "math"}}, "routes": []}, "rewards.routes: at least one route"),
    ({"sources": {"m": {"type": "math", "colour": 1}}, "routes": [{"combine": {"m": 1}}]}, "rewards.sources.m"),
    ({"sources": {"m": {"type": "math"}}, "routes": [{"combine": {"m": 1}}], "normalise": {}}, "rewards: unknown keys ['normalise']"),
    ({"sources": {"m": {"type": "math"}}, "routes": [{"combine": {"m": 1}}], "normalize": {"mode": "rank"}}, "rewards.normalize"),
])
def test_bad_configuration_names_the_key(cfg, message):
    with pytest.raises(RewardConfigError) as e:
        RewardRouter.from_config(cfg)
    assert message in str(e.value)


def test_real_verifiers_through_a_config():
    r = RewardRouter.from_config(OmegaConf.create({
        "sources": {"math": {"type": "math"}, "checklist": {"type": "checklist"}, "exact": {"type": "exact"}},
        "routes": [{"domain": "math", "combine": {"math": 1.0}},
                   {"task": "checklist", "combine": {"checklist": 1.0}},
                   {"combine": {"exact": 1.0}}]}))
    out = r.score([
        S(r"So the result is \boxed{\frac{1}{2}}.", "math", reference="0.5"),
        S("The answer is 7.", "math", reference="8"),
        S("one two three", "writing", "checklist", checklist=[{"type": "max_words", "value": 5},
                                                             {"type": "required_words", "words": ["four"]}]),
        S("Paris", "qa", reference="Paris"),
        S(r"\boxed{2}", "math"),  # no reference: the verifier cannot score it
    ])
    assert [o.reward for o in out] == [1.0, 0.0, 0.5, 1.0, 0.0]
    assert out[4].failed == ["math"] and r.metrics()["reward/math/failed"] == 1.0


def test_shipped_reward_configs_build_with_real_sources(tmp_path):
    """The ERNIE 4.5 LLM and VL configs, pointed at a tiny judge model; reward-model checkpoints
    load lazily (first score), so placeholder paths build."""
    from tests.helpers import TEST_DENSE, save_hf_model

    save_hf_model(TEST_DENSE, tmp_path / "judge", seed=0)
    for name in ("ernie45_llm", "ernie45_vl"):
        cfg = OmegaConf.load(ROOT / "recipes" / "rewards" / f"{name}.yaml")
        for src in cfg.sources.values():
            if "backend" in src:
                src.backend = {"type": "hf", "path": str(tmp_path / "judge"), "tokenizer": "demo"}
        r = RewardRouter.from_config(cfg)
        judges = [s for s in r.sources.values() if hasattr(s, "backend")]
        assert judges and len({id(j.backend) for j in judges}) == 1  # one judge model, shared
        assert r.route_for(S("x", "math")) is not None and r.route_for(S("x", "anything")) is not None
        assert r.normalizer is not None


def test_router_state_resumes_the_statistics_exactly():
    import json

    def make():
        return router({"v": Table({"1": 1.0, "2": 2.0, "5": 5.0, "9": 9.0})}, [{"combine": {"v": 1.0}}],
                      normalize={"mode": "zscore", "min_count": 1})

    straight = make()
    straight.score([S("1"), S("2")])
    expected = [o.reward for o in straight.score([S("5"), S("9")])]
    first = make()
    first.score([S("1"), S("2")])
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # survives JSON (checkpoint files)
    assert [o.reward for o in resumed.score([S("5"), S("9")])] == expected
    assert resumed.metrics()["reward/v/scored"] == 4.0
