"""Offline UPO: pairs as a policy trains on them (masks on the response only, `file:line` errors),
`tools/build_pairs.py`'s builder (best/worst per prompt, margin, resumable after a crash, atomic),
`recipe=upo_offline` (log 2 at the first step, the loss falls), and offline pairs mixed into PPO
beside the online ones."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_ernie.errors import DataError
from megatron_ernie.rewards.router import RewardRouter
from megatron_ernie.rl.engine import FINISH_STOP, Completion, EngineStats
from megatron_ernie.rl.pairs import build_pairs, partial_path, pick_pair
from megatron_ernie.rl.rollout import Prompt
from tests.helpers import recorded, rl_inputs, run_and_record, spawn

PAIRS = [
    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
    {"prompt": "Spell cat.", "chosen": "c-a-t", "rejected": "k-a-t"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Say bye."}], "chosen": "Bye!", "rejected": "No."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I do not know."},
]


def _write_pairs(path: Path, rows=PAIRS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pair_rows_train_on_the_responses_only(tmp_path):
    from megatron_ernie.data.preference import PolicyPairDataset
    from megatron_ernie.data.tokenizer import demo_tokenizer

    tok = demo_tokenizer()
    ds = PolicyPairDataset(_write_pairs(tmp_path / "p.jsonl"), tok, seq_length=64)
    assert len(ds) == 4 and ds.stats["pairs"] == 4
    for i, pair in enumerate(PAIRS):
        item = ds[i]
        assert item["tokens"].shape == (2, 64)
        for row, key in ((0, "chosen"), (1, "rejected")):
            trained = item["labels"][row][item["loss_mask"][row].bool()].tolist()
            # the response and the end of the turn, nothing of the prompt
            assert tok.decode(trained, skip_special_tokens=True).strip() == pair[key]
            n = int((item["tokens"][row] != 0).sum())
            assert item["tokens"][row, 1:n].tolist() == item["labels"][row, :n - 1].tolist()


def test_bad_pair_line_names_file_and_line(tmp_path):
    from megatron_ernie.data.preference import PolicyPairDataset
    from megatron_ernie.data.tokenizer import demo_tokenizer

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + '{"prompt": "x", "chosen": "y"}\n')
    with pytest.raises(DataError, match=rf"{path}:3: missing 'rejected'"):
        PolicyPairDataset(path, demo_tokenizer(), seq_length=64)
    path.write_text(json.dumps(PAIRS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        PolicyPairDataset(path, demo_tokenizer(), seq_length=64)


def test_pick_pair_margin_ties_and_single_samples():
    assert pick_pair(["a", "b", "c"], [0.2, 1.0, 0.0], 0.0) == (1, 2)
    assert pick_pair(["a", "b", "c"], [1.0, 0.0, 1.0], 0.0) == (0, 1)  # ties: the first sampled
    assert pick_pair(["a", "b"], [0.5, 0.5], 0.0) is None  # no margin
    assert pick_pair(["a", "b"], [0.6, 0.5], 0.2) is None  # below the threshold
    assert pick_pair(["a"], [1.0], 0.0) is None


class Engine:
    """Response s of prompt i is "ok" when s == i % 3 (prompt 2: never), else "no"."""

    max_model_len, overlong = 64, "refuse"

    def __init__(self, fail_after: int | None = None):
        self.stats, self.calls, self.fail_after, self.prompts_seen = EngineStats(), 0, fail_after, []

    def generate(self, prompts, params):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        out = []
        seeds = {}
        for ids, p in zip(prompts, params):
            s = seeds.setdefault(ids[0], 0)
            seeds[ids[0]] += 1
            if s == 0:
                self.prompts_seen.append(ids[0])
            text = "ok" if ids[0] != 2 and s == ids[0] % 3 else "no"
            out.append(Completion(list(ids), [ord(c) for c in text], [0.0] * len(text), FINISH_STOP))
        return out


def _builder_inputs():
    prompts = [Prompt([{"role": "user", "content": f"q{i}"}], "general", reference="ok") for i in range(7)]
    router = RewardRouter.from_config({"sources": {"e": {"type": "exact"}},
                                       "routes": [{"domain": "general", "combine": {"e": 1.0}}]})
    render = lambda messages: [int(messages[-1]["content"][1:])]  # noqa: E731
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    return prompts, router, render, decode


def test_build_pairs_resumes_after_a_crash_and_writes_atomically(tmp_path):
    prompts, router, render, decode = _builder_inputs()
    whole = tmp_path / "whole.jsonl"
    stats = build_pairs(Engine(), prompts, router, render, decode, whole, samples=3, batch_size=2, progress=False)
    rows = [json.loads(x) for x in whole.read_text().splitlines()]
    assert stats["pairs"] == 6 and stats["no_pair"] == 1  # prompt 2 never gets "ok": no pair
    assert [r["prompt_index"] for r in rows] == [0, 1, 3, 4, 5, 6]
    assert all(r["chosen"] == "ok" and r["rejected"] == "no" and r["margin"] == 1.0 for r in rows)
    assert not partial_path(whole).exists()

    out = tmp_path / "pairs.jsonl"
    with pytest.raises(RuntimeError, match="killed"):  # dies in its third batch
        build_pairs(Engine(fail_after=2), prompts, router, render, decode, out, samples=3, batch_size=2,
                    progress=False)
    assert not out.exists()  # nothing half-written where the pairs go
    assert len(partial_path(out).read_text().splitlines()) == 4
    with partial_path(out).open("a") as f:
        f.write('{"index": 4, "pa')  # and a torn line from the kill
    engine = Engine()
    stats = build_pairs(engine, prompts, router, render, decode, out, samples=3, batch_size=2, progress=False)
    assert stats["resumed"] == 4 and engine.prompts_seen == [4, 5, 6]  # the first four are not redone
    assert out.read_text() == whole.read_text()
    assert not partial_path(out).exists()
    again = Engine()
    build_pairs(again, prompts, router, render, decode, out, samples=3, progress=False)  # finished: a no-op
    assert again.calls == 0


def test_build_pairs_refuses_prompts_without_a_route(tmp_path):
    prompts, router, render, decode = _builder_inputs()
    prompts.append(Prompt([{"role": "user", "content": "q9"}], "maths", where="p.jsonl:8"))
    with pytest.raises(DataError, match=r"p.jsonl:8: no reward route for domain='maths'"):
        build_pairs(Engine(), prompts, router, render, decode, tmp_path / "x.jsonl", samples=2, progress=False)


# --- on the training loop --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("upo")
    return root, rl_inputs(root), _write_pairs(root / "pairs.jsonl")


def _train(rank, world, overrides, out):
    run_and_record(rank, world, overrides, out)


def test_offline_upo_starts_at_log2_and_learns(setup):
    root, common, pairs = setup
    out = root / "offline"
    spawn(_train, 1, [common[0], "recipe=upo_offline", f"data.path={pairs}", "data.seq_length=48",
                      "train.steps=4", "train.global_batch_size=4", "train.micro_batch_size=2", "optim.lr=3e-3",
                      "rl.ppo.upo_beta=0.5", "checkpoint.interval=4"], out)
    rows = recorded(out)["rows"]
    assert rows[0]["upo_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert rows[0]["upo_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["loss_tokens"] == 4  # the mean over the step's pairs
    assert rows[-1]["upo_loss"] < rows[0]["upo_loss"] - 0.05
    assert rows[-1]["upo_pair_accuracy"] > 0.5 and rows[-1]["upo_reward_margin"] > 0


def test_ppo_mixes_offline_pairs_beside_online_ones(setup):
    root, common, pairs = setup
    out = root / "ppo_mixed"
    spawn(_train, 1, [*common, "recipe=ppo", "data.seq_length=48", "train.micro_batch_size=2", "train.steps=2",
                      "optim.lr=3e-3", "rl.rollout.prompts_per_step=2", "rl.rollout.samples_per_prompt=2",
                      "rl.rollout.max_new_tokens=8", "rl.policy.mini_batches=1", f"rl.ppo.offline_pairs={pairs}",
                      "rl.ppo.offline_pairs_per_step=2", "checkpoint.interval=2"], out)
    rows = recorded(out)["rows"]
    for r in rows:
        assert r["upo/offline_pairs"] == 2 and math.isfinite(r["loss"]) and math.isfinite(r["critic/loss"])
    assert rows[0]["upo_loss"] == pytest.approx(math.log(2), abs=1e-6)  # every pair starts at log 2
    assert rows[-1]["upo_loss"] != rows[0]["upo_loss"]


def test_offline_pairs_need_upo_and_a_count():
    from megatron_ernie.errors import ConfigError
    from megatron_ernie.training.config import compose

    with pytest.raises(ConfigError, match="rl.ppo.offline_pairs"):
        compose(["recipe=ppo", "rl.ppo.offline_pairs=x.jsonl", "rl.ppo.upo_coef=0"])


def test_a_random_start_is_one_model_for_policy_and_reference(setup):
    """No model.init_from: every role is drawn from the same seed, so the reference is the policy."""
    root, _, pairs = setup
    out = root / "random"
    spawn(_train, 1, ["recipe=upo_offline", f"data.path={pairs}", "data.seq_length=48", "train.steps=1",
                      "train.global_batch_size=4", "train.micro_batch_size=2", "checkpoint.interval=1"], out)
    row = recorded(out)["rows"][0]
    assert row["upo_loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert row["upo_reward_margin"] == 0.0
