"""benchmarks/grpo_vs_trl.py without running it: TRL stays optional, both sides get the same
prompts, the warm-up step is left out. (The benchmark itself takes minutes: run it by hand.)"""
from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_grpo_vs_trl", ROOT / "benchmarks" / "grpo_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_is_a_bench_extra_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.lower().startswith("trl") for d in project["dependencies"])
    assert any(d.replace(" ", "").startswith("trl>=1.16,<2") for d in project["optional-dependencies"]["bench"])


def test_missing_trl_exits_with_a_message(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError
    assert bench.main(["--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "TRL is not installed" in err and "megatron-ernie[bench]" in err
    assert not any(tmp_path.iterdir())  # nothing built before the check


def test_both_sides_get_our_prompts_in_our_order(bench, tmp_path):
    from megatron_ernie.data.chat import prompt_ids
    from megatron_ernie.data.tokenizer import demo_tokenizer
    from megatron_ernie.rl.rollout import PromptOrder, load_prompts

    tokenizer = demo_tokenizer()
    tokenizer.save_pretrained(str(tmp_path))
    rows, longest = bench.rendered_prompts(tmp_path, steps=3, per_step=4)
    prompts = load_prompts([bench.TRAIN_PROMPTS])
    order = PromptOrder(len(prompts), bench.SEED)
    expected = [prompts[i] for _ in range(3) for i in order.take(4)]
    assert [r["question"] for r in rows] == [p.text for p in expected]
    assert [r["reference"] for r in rows] == [p.reference for p in expected]
    for row, p in zip(rows, expected):
        ids = prompt_ids(p.messages, tokenizer, thinking=False)
        assert tokenizer(text=row["prompt"])["input_ids"] == ids  # what TRL tokenizes: our ids
        assert row["prompt"].endswith("</think>\n\n")  # non-thinking, like rl.rollout.thinking=false
    assert longest == max(len(prompt_ids(p.messages, tokenizer, thinking=False)) for p in expected)


def test_summary_leaves_out_the_warm_up_step(bench):
    s = bench._summary([9.0, 1.0, 3.0], [5.0, 0.5, 1.5], [64, 32, 32], [0.0, 0.5, 1.0], completions=8)
    assert s["step_s"] == 2.0 and s["warmup_s"] == 9.0 and s["measured"] == 2
    assert s["gen_share"] == 0.5 and s["tokens_per_s"] == 16.0 and s["tokens_per_completion"] == 4.0
    assert s["reward"] == 0.75
