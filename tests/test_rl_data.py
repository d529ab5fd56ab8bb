"""The bundled RL demo data: generated as committed, held-out splits disjoint from what trains,
every prompt routed by the demo reward config, and the verifiers agreeing with the generator
(the task's right answer scores 1, its typical mistakes less)."""
from __future__ import annotations

import json
import random

import yaml

from megatron_ernie.data.rl_data import BUNDLED, DOMAINS, FAMILIES, PAIRS_PATH, SFT_PATH, generate, rl_path
from megatron_ernie.rewards.router import RewardRouter
from megatron_ernie.rewards.types import RewardSample
from megatron_ernie.rl.rollout import load_prompts
from megatron_ernie.training.config import recipes_dir


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_bundled_files_are_what_the_generator_writes():
    for name, records in generate().items():
        assert _rows(BUNDLED / name) == records, f"{name} is stale: python -m megatron_ernie.data.rl_data"


def test_held_out_prompts_never_train():
    trained = {r["messages"][0]["content"] for r in _rows(SFT_PATH)} | {r["prompt"] for r in _rows(PAIRS_PATH)}
    for domain in DOMAINS:
        train = {p.text for p in load_prompts(rl_path(domain, "train"))}
        held_out = [p.text for p in load_prompts(rl_path(domain, "eval"))]
        assert held_out and len(set(held_out)) == len(held_out)
        assert not set(held_out) & (train | trained), domain
        assert {r["messages"][0]["content"] for r in _rows(SFT_PATH) if r["domain"] == domain} <= train


def _router():
    cfg = yaml.safe_load((recipes_dir() / "rewards" / "demo.yaml").read_text())
    return RewardRouter.from_config({**cfg, "normalize": None})


def test_the_demo_verifiers_score_right_answers_1_and_mistakes_lower():
    router, rng, samples, right = _router(), random.Random(11), [], []
    for domain, family in FAMILIES.items():
        for _ in range(3):
            row, good, bad = family(rng)
            for response in [good, *bad]:
                samples.append(RewardSample(prompt=row["prompt"], response=response, domain=domain, task=row["task"],
                                            reference=row.get("reference"), tests=row.get("tests"),
                                            checklist=row.get("checklist")))
                right.append(response == good)
    scored = router.score(samples)
    assert not any(r.failed for r in scored), [r.record() for r in scored if r.failed][:2]
    for s, r, ok in zip(samples, scored, right):
        assert (r.raw == 1.0) if ok else (r.raw < 1.0), (s.domain, s.response, r.raw)


def test_every_bundled_prompt_has_a_route():
    from megatron_ernie.rl.evaluate import check_routes

    router = _router()
    for domain in DOMAINS:
        for split in ("train", "eval"):
            check_routes(load_prompts(rl_path(domain, split)), router)
