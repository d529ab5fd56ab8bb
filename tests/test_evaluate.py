"""Held-out evaluation (rl/evaluate.py, rl/cli.py, rl.eval): per-domain greedy accuracy and pass@k
on a scripted engine, the training router's normaliser untouched, DP ranks agreeing, the
`megatron-ernie-eval` CLI on an HF dir and on a training run's Megatron checkpoint, its one-line
errors, and a GRPO run logging eval/accuracy at its eval interval."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_ernie.errors import DataError
from megatron_ernie.rewards.router import RewardRouter
from megatron_ernie.rewards.types import PerSampleSource, RewardResult, RewardSample, register_source
from megatron_ernie.rl.engine import FINISH_STOP, Completion, EngineStats
from megatron_ernie.rl.evaluate import CORRECT, evaluate
from megatron_ernie.rl.rollout import Prompt, completion_seed, load_prompts
from tests.helpers import recorded, rl_inputs, rl_rewards, run_and_record, spawn


@register_source("eval_match")
class Match(PerSampleSource):
    """1 for the reference answer, 0.5 for "half", else 0."""

    name = "eval_match"

    def __init__(self, name="eval_match"):
        self.name = name

    def score_one(self, sample):
        if sample.response == "half":
            return RewardResult(0.5, self.name)
        return RewardResult(float(sample.response == sample.reference), self.name)


SEED = 5
# prompt -> (domain, reference, greedy answer, the k=3 sampled answers)
SCRIPT = [
    ("m0", "math", "4", "4", ["4", "x", "x"]),       # greedy right
    ("m1", "math", "7", "x", ["x", "7", "x"]),       # greedy wrong, one sample right
    ("m2", "math", "9", "half", ["x", "x", "x"]),    # partial credit only: never correct
    ("c0", "code", "ok", "ok", ["x", "x", "x"]),     # greedy right, no sample
    ("c1", "code", "ok", "x", ["ok", "ok", "ok"]),   # samples all right
]
K = 3


class ScriptedEngine:
    """Prompt ids are [index + 10]; answers come from SCRIPT by (prompt, greedy or seed); token
    ids are the answer's characters."""

    max_model_len, overlong = 64, "refuse"

    def __init__(self):
        self.stats = EngineStats()
        self.calls = 0
        self.sample_of = {completion_seed(SEED, i, s): s for i in range(len(SCRIPT)) for s in range(K)}

    def generate(self, prompts, params):
        self.calls += 1
        out = []
        for ids, p in zip(prompts, params):
            _, _, _, greedy, sampled = SCRIPT[ids[0] - 10]
            text = greedy if p.greedy else sampled[self.sample_of[p.seed]]
            out.append(Completion(list(ids), [ord(c) for c in text], [0.0] * len(text), FINISH_STOP))
        return out

    def update_weights(self, tensors): ...

    def sleep(self): ...

    def wake(self): ...


def _prompts() -> list[Prompt]:
    return [Prompt([{"role": "user", "content": t}], d, reference=ref) for t, d, ref, _, _ in SCRIPT]


def _render(messages):
    return [next(i for i, row in enumerate(SCRIPT) if row[0] == messages[-1]["content"]) + 10]


def _decode(ids):
    return "".join(chr(t) for t in ids)


def _router(normalize=None) -> RewardRouter:
    cfg = {"sources": {"m": {"type": "eval_match"}}, "routes": [{"domain": "*", "combine": {"m": 1.0}}]}
    return RewardRouter.from_config({**cfg, **({"normalize": normalize} if normalize else {})})


def _evaluate(router, **kw):
    kw = {"samples": K, "max_new_tokens": 8, "seed": SEED, **kw}
    return evaluate(ScriptedEngine(), _prompts(), router, _render, _decode, **kw)


def test_per_domain_accuracy_reward_and_pass_at_k():
    out = _evaluate(_router(), batch_size=2)
    assert out["eval/accuracy"] == pytest.approx(2 / 5)  # m0, c0
    assert out["eval/math/accuracy"] == pytest.approx(1 / 3) and out["eval/code/accuracy"] == pytest.approx(1 / 2)
    assert out["eval/reward"] == pytest.approx((1 + 0 + 0.5 + 1 + 0) / 5)
    assert out["eval/math/reward"] == pytest.approx(1.5 / 3) and out["eval/code/reward"] == pytest.approx(1 / 2)
    assert out["eval/pass@3"] == pytest.approx(3 / 5)  # m0, m1, c1
    assert out["eval/math/pass@3"] == pytest.approx(2 / 3) and out["eval/code/pass@3"] == pytest.approx(1 / 2)
    assert out["eval/sample_accuracy"] == pytest.approx(5 / 15)
    assert out["eval/prompts"] == 5 and out["eval/math/prompts"] == 3 and out["eval/code/prompts"] == 2
    assert out["eval/response_len"] == pytest.approx((1 + 1 + 4 + 2 + 1) / 5)
    assert out["eval/reward_failures"] == 0 and out["eval/truncated_share"] == 0
    # the batching does not change the numbers; k=1 has no pass@k; a lower threshold counts "half"
    assert _evaluate(_router(), batch_size=100) == out
    one = _evaluate(_router(), samples=1)
    assert not any("pass@" in key or "sample_accuracy" in key for key in one)
    assert one["eval/accuracy"] == out["eval/accuracy"]
    assert _evaluate(_router(), threshold=0.5)["eval/math/accuracy"] == pytest.approx(2 / 3)
    assert CORRECT == pytest.approx(1.0, abs=1e-5) and CORRECT < 1.0


def test_evaluation_leaves_the_training_normaliser_alone():
    router = _router({"mode": "zscore", "min_count": 1})
    warm = [RewardSample(prompt="q", response=r, domain=d, reference="4") for r, d in
            [("4", "math"), ("x", "math"), ("4", "code"), ("half", "math")]]
    router.score(warm)  # training statistics to protect
    before = json.dumps(router.state_dict(), sort_keys=True)
    out = _evaluate(router)
    assert json.dumps(router.state_dict(), sort_keys=True) == before  # statistics and counters
    assert out == _evaluate(_router())  # raw rewards: the same numbers as without normalisation


def test_a_prompt_without_a_route_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "domain": "math"}) + "\n\n" + json.dumps({"prompt": "b", "domain": "chat"})
                    + "\n")
    prompts = load_prompts(str(path))
    assert prompts[1].where == f"{path}:3"
    math_only = RewardRouter.from_config({"sources": {"m": {"type": "eval_match"}},
                                          "routes": [{"domain": "math", "combine": {"m": 1.0}}]})
    with pytest.raises(DataError, match=rf"{path}:3: no reward route for domain='chat'"):
        evaluate(ScriptedEngine(), prompts, math_only, lambda m: [10], _decode, max_new_tokens=4)


def _dp_rank(rank, world, out: Path):
    import torch

    torch.distributed.init_process_group("gloo")
    result = evaluate(ScriptedEngine(), _prompts(), _router(), _render, _decode, samples=K, max_new_tokens=8,
                      seed=SEED, batch_size=1, dp_size=world, dp_rank=rank)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_dp_ranks_return_the_one_process_numbers(tmp_path):
    spawn(_dp_rank, 2, tmp_path)
    single = _evaluate(_router())
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [single, single]


# --- the CLI and an RL stage --------------------------------------------------------------------
EVAL_PROMPTS = [("what is 2 + 3?", "math"), ("say hello", "general"), ("spell dog", "general")]
BASE = ["recipe=grpo", "data.seq_length=48", "train.micro_batch_size=2", "optim.lr=3e-3", "train.steps=2",
        "rl.rollout.prompts_per_step=2", "rl.rollout.samples_per_prompt=2", "rl.rollout.max_new_tokens=8",
        "rl.grpo.dynamic_sampling=false", "rl.grpo.overlong_buffer=0", "train.eval_interval=1", "rl.eval.samples=2", "rl.eval.max_new_tokens=6",
        "rl.eval.threshold=0.3"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """A 2-step GRPO run evaluating held-out prompts after each step (its checkpoint feeds the CLI)."""
    root = tmp_path_factory.mktemp("eval")
    overrides = rl_inputs(root)
    held = root / "held_out.jsonl"
    held.write_text("".join(json.dumps({"prompt": p, "domain": d}) + "\n" for p, d in EVAL_PROMPTS))
    out = root / "run"
    spawn(run_and_record, 1, [*BASE, *overrides, f"rl.eval.prompts={held}"], out)
    return root, held, out


def test_grpo_logs_eval_accuracy_at_its_eval_interval(grpo_run):
    _, _, out = grpo_run
    rows = [r for r in recorded(out)["rows"] if "eval/accuracy" in r]
    assert [r["step"] for r in rows] == [1, 2]  # train.eval_interval=1 (and the end)
    for r in rows:
        assert 0 <= r["eval/accuracy"] <= 1 and 0 <= r["eval/pass@2"] <= 1
        assert r["eval/prompts"] == 3 and r["eval/math/prompts"] == 1 and r["eval/general/prompts"] == 2
        assert 0 <= r["eval/reward"] <= 1 and 0 < r["eval/response_len"] <= 6
    train = [r for r in recorded(out)["rows"] if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in train)


def _cli(capsys, *argv):
    from megatron_ernie.rl.cli import main

    code = main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_on_an_hf_dir_and_on_the_runs_checkpoint(grpo_run, capsys):
    root, held, run_dir = grpo_run
    rewards = rl_rewards(root, "test_vowels")
    common = ["--prompts", str(held), "--samples", "2", "--max-new-tokens", "6", "--threshold", "0.3",
              "--seed", "1234"]  # the run's train.seed: its evaluation's samples
    results = {}
    for name, model, extra in [("hf", root / "hf", ["--engine", "hf", "--rewards", str(rewards)]),
                               ("hf_megatron", root / "hf", ["--rewards", str(rewards)]),
                               ("checkpoint", run_dir, [])]:  # the run's rl.rewards by default
        out = root / f"{name}.json"
        code, stdout, err = _cli(capsys, "--model", str(model), *common, *extra, "--out", str(out))
        assert code == 0, err
        assert json.loads(stdout) == json.loads(out.read_text())
        results[name] = json.loads(out.read_text())
    hf, ckpt = results["hf"], results["checkpoint"]
    assert hf["kind"] == "hf" and ckpt["kind"] == "mcore" and Path(ckpt["model"]).name == "step_00000002"
    assert ckpt["rewards"] == str(rewards)
    assert set(hf) == set(ckpt) and set(hf["metrics"]) == set(ckpt["metrics"])
    assert {"eval/accuracy", "eval/pass@2", "eval/math/accuracy", "eval/general/pass@2", "eval/reward",
            "eval/response_len"} <= set(hf["metrics"])
    # the same weights in the transformers and the in-process engine: the same greedy answers
    for key in ("eval/accuracy", "eval/reward", "eval/response_len"):
        assert results["hf_megatron"]["metrics"][key] == pytest.approx(hf["metrics"][key], abs=1e-6)
    # the checkpoint is the run's last policy: its numbers are the run's last evaluation's
    last = [r for r in recorded(run_dir)["rows"] if "eval/accuracy" in r][-1]
    for key in ("eval/accuracy", "eval/reward", "eval/response_len", "eval/pass@2"):
        assert ckpt["metrics"][key] == pytest.approx(last[key], abs=1e-6)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n{not json\n")
    code, out, err = _cli(capsys, "--model", str(tmp_path), "--prompts", str(bad))
    assert code == 2 and out == "" and err.startswith(f"error: {bad}:2:") and err.count("\n") == 1
    code, _, err = _cli(capsys, "--model", str(tmp_path), "--prompts", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "not found" in err and "Traceback" not in err
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "hi", "domain": "chat"}) + "\n")
    model = tmp_path / "model"  # checked before anything is loaded: a config.json is enough
    model.mkdir()
    (model / "config.json").write_text("{}")
    code, _, err = _cli(capsys, "--model", str(model), "--prompts", str(chat))  # the rules-only default
    assert code == 2 and f"{chat}:1: no reward route for domain='chat'" in err
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"prompt": "1+1?", "domain": "math", "reference": "2"}) + "\n")
    code, _, err = _cli(capsys, "--model", str(tmp_path / "nowhere"), "--prompts", str(ok))
    assert code == 2 and "nowhere" in err and err.count("\n") == 1


def test_prefilter_samples_a_training_checkpoint_and_writes_a_prompt_file(grpo_run):
    """The pre-filter before a stage: on a run's checkpoint (the in-process engine), its kept
    prompts are a prompt file the next stage reads."""
    from megatron_ernie.rl.cli import prefilter_main

    root, held, run_dir = grpo_run
    out = root / "kept.jsonl"
    code = prefilter_main(["--rewards", str(rl_rewards(root, "test_vowels")), "--prompts", str(held), "--model",
                           str(run_dir), "--out", str(out), "--k", "4", "--pass-threshold", "0.3",
                           "--max-new-tokens", "6"])
    assert code == 0
    kept = load_prompts(out)  # pass_rate and the input's keys only: loadable as rl.rollout.prompts
    assert 1 <= len(kept) <= len(EVAL_PROMPTS)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(0 < r["pass_rate"] < 1 for r in rows) and {r["domain"] for r in rows} <= {"math", "general"}


def test_build_pairs_cli_on_a_training_checkpoint(grpo_run, capsys):
    """tools/build_pairs.py end to end: a run's checkpoint samples, the run's rewards score, and the
    pair file is what recipe=upo_offline reads."""
    from megatron_ernie.data.preference import PolicyPairDataset
    from megatron_ernie.data.tokenizer import demo_tokenizer
    from megatron_ernie.rl.pairs import main

    root, held, run_dir = grpo_run
    out = root / "pairs.jsonl"
    code = main(["--model", str(run_dir), "--prompts", str(held), "--samples", "4", "--max-new-tokens", "6",
                 "--out", str(out), "--no-progress"])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and stats["prompts"] == len(EVAL_PROMPTS) and stats["pairs"] >= 1
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == stats["pairs"] and all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    assert len(PolicyPairDataset(out, demo_tokenizer(), seq_length=48)) == len(rows)
    code = main(["--model", str(run_dir), "--prompts", str(root / "missing.jsonl"), "--out", str(out)])
    assert code == 2 and "missing.jsonl: prompt file not found" in capsys.readouterr().err
