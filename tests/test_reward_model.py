"""Reward models (DRM / RDRM) on the training engine: Bradley-Terry training reaches > 0.9
pairwise accuracy on the bundled pairs, equal losses at every layout, deterministic scoring,
reference-guided inputs, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_ernie.training.config import compose
from tests.helpers import TEST_MOE, save_hf_model, spawn

ROOT = Path(__file__).resolve().parents[1]


def train_rm(rank: int, world: int, workdir: Path, overrides: list[str], tag: str) -> None:
    from megatron_ernie.train import run

    result = run(compose(["recipe=reward_model", *overrides]), progress=False)
    if rank == world - 1:
        torch.save({"losses": result.losses, "metrics": result.metrics, "evaluation": result.evaluation},
                   workdir / f"{tag}.pt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The recipe as shipped (bundled pairs, random init, 80 steps)."""
    workdir = tmp_path_factory.mktemp("rm")
    spawn(train_rm, 1, workdir, [f"out_dir={workdir / 'run'}"], "run")
    return workdir / "run", torch.load(workdir / "run.pt")


def test_bradley_terry_training_reaches_high_pairwise_accuracy_on_bundled_pairs(trained):
    run_dir, out = trained
    first, last = out["metrics"][1]["pair_accuracy"], min(out["evaluation"])
    assert first < 0.8  # an untrained head is near chance on its first batch
    final_eval = out["evaluation"][max(out["evaluation"])]
    assert final_eval["eval/pairs"] == 256
    assert final_eval["eval/pair_accuracy"] > 0.9, out["evaluation"]
    late_train = [out["metrics"][s]["pair_accuracy"] for s in range(61, 81)]
    assert sum(late_train) / len(late_train) > 0.9
    assert out["losses"][80] < 0.5 * out["losses"][1]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/pair_accuracy" in r for r in rows) and any("pair_accuracy" in r for r in rows)
    assert (run_dir / "curves.png").stat().st_size > 0 and last == 20


def _eval_samples():
    from megatron_ernie.data.preference import bundled_pairs_path
    from megatron_ernie.rewards.types import RewardSample

    pairs = [json.loads(x) for x in bundled_pairs_path("eval").read_text().splitlines()]
    return ([RewardSample(p["prompt"], p["chosen"], domain=p["domain"]) for p in pairs],
            [RewardSample(p["prompt"], p["rejected"], domain=p["domain"]) for p in pairs])


def score_checkpoint(rank: int, world: int, run_dir: Path, out: Path) -> None:
    from megatron_ernie.rewards.registry import build_source
    from megatron_ernie.rewards.reward_model import RewardModelScorer

    scorer = RewardModelScorer.from_checkpoint(run_dir, micro_batch_size=8)
    chosen, rejected = _eval_samples()
    c, r = scorer.values(chosen), scorer.values(rejected)
    again = scorer.values(chosen[:8])[:3]
    alone = [scorer.values([s])[0] for s in chosen[:3]]
    drm = build_source("bt", "drm", scorer=scorer).score(chosen[:2])
    rdrm = build_source("ref_bt", "rdrm", scorer=scorer).score(chosen[:2])
    torch.save({"chosen": c, "rejected": r, "again": again, "alone": alone, "drm": drm, "rdrm": rdrm}, out)


def test_scoring_api_reproduces_the_evaluation_and_is_deterministic(trained, tmp_path):
    run_dir, out = trained
    spawn(score_checkpoint, 1, run_dir, tmp_path / "scores.pt")
    s = torch.load(tmp_path / "scores.pt", weights_only=False)
    accuracy = sum(c > r for c, r in zip(s["chosen"], s["rejected"])) / len(s["chosen"])
    assert accuracy == out["evaluation"][80]["eval/pair_accuracy"]  # same model, same inputs, same verdicts
    assert s["again"] == s["chosen"][:3]  # the same batch: bit-identical on a second call
    # alone instead of with 7 batch-mates: the MoE experts' GEMMs change shape, values stay put
    assert s["alone"] == pytest.approx(s["chosen"][:3], rel=1e-5)
    assert [r.reward for r in s["drm"]] == s["chosen"][:2] and not any(r.failed for r in s["drm"])
    assert all(r.failed and "reference" in r.reason and r.reward == 0.0 for r in s["rdrm"])


# --- layouts: the same recipe from the same weights, equal losses ------------------------------------
LAYOUTS = {"single": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"]),
           "dp2": (2, ["parallel.distributed_optimizer=true"]), "from_mcore": (1, ["model.init_from={workdir}/mc"])}


def run_layouts(rank: int, world: int, names: list[str], workdir: Path) -> None:
    for name in names:
        overrides = [f"model.init_from={workdir / 'hf'}", "train.steps=3", "train.global_batch_size=8",
                     "train.micro_batch_size=2", "train.eval_interval=0", "optim.eps=1e-6", "checkpoint.interval=100",
                     f"out_dir={workdir / name}", *(o.format(workdir=workdir) for o in LAYOUTS[name][1])]
        train_rm(rank, world, workdir, overrides, name)


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    from megatron_ernie.conversion.convert import hf_to_mcore

    workdir = tmp_path_factory.mktemp("rm_layouts")
    save_hf_model(TEST_MOE, workdir / "hf", seed=3)
    hf_to_mcore(workdir / "hf", workdir / "mc", progress=False)
    spawn(run_layouts, 1, ["single", "from_mcore"], workdir)
    spawn(run_layouts, 2, ["tp2", "pp2", "dp2"], workdir)
    return {name: torch.load(workdir / f"{name}.pt") for name in LAYOUTS}


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_reward_model_losses_are_equal_at_every_layout(layout_runs, layout):
    ref, got = layout_runs["single"], layout_runs[layout]
    assert sorted(got["losses"]) == [1, 2, 3]
    for step in ref["losses"]:
        assert got["losses"][step] == pytest.approx(ref["losses"][step], rel=1e-6), f"step {step}"
        assert got["metrics"][step]["pair_accuracy"] == ref["metrics"][step]["pair_accuracy"]
    assert got["evaluation"][3]["eval/pair_accuracy"] == ref["evaluation"][3]["eval/pair_accuracy"]


def test_language_model_checkpoint_initialises_the_decoder_and_leaves_the_head_fresh(layout_runs):
    assert layout_runs["from_mcore"]["losses"] == layout_runs["single"]["losses"]  # HF dir or its Megatron copy


# --- inputs --------------------------------------------------------------------------------------
def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_reference_answer_is_part_of_the_rdrm_input_and_optional_for_drm(tmp_path):
    from megatron_ernie.data.preference import REFERENCE_HEADER, PreferenceDataset
    from megatron_ernie.data.tokenizer import demo_tokenizer

    tok = demo_tokenizer()
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6", "reference": "5", "domain": "math"},
        {"messages": [{"role": "user", "content": "Hi"}], "chosen": {"content": "Hello!"}, "rejected": "Go away."}])
    with_ref = PreferenceDataset(path, tok, 64, use_reference=True)
    without = PreferenceDataset(path, tok, 64, use_reference=False)
    assert with_ref.stats["with_reference"] == 1 and without.stats["with_reference"] == 0
    text = tok.decode(with_ref.rows[0][0])
    assert REFERENCE_HEADER.strip() in text and text.index("What is 2 + 3?") < text.index("[Reference answer]")
    assert REFERENCE_HEADER.strip() not in tok.decode(without.rows[0][0])
    assert with_ref.rows[1] == without.rows[1]  # no reference: the same input either way
    item = with_ref[0]
    end = item["end_index"].tolist()
    assert item["tokens"].shape == (2, 64) and all(item["tokens"][k, end[k]] == tok.convert_tokens_to_ids("<|end_of_sentence|>") for k in range(2))


def test_overlong_pairs_keep_the_response_end_or_are_dropped(tmp_path):
    from megatron_ernie.data.preference import PreferenceDataset
    from megatron_ernie.data.tokenizer import demo_tokenizer

    tok = demo_tokenizer()
    path = _write(tmp_path / "p.jsonl", [{"prompt": "word " * 100, "chosen": "yes", "rejected": "no"},
                                         {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    cut = PreferenceDataset(path, tok, 32, overlong="truncate")
    assert cut.stats == {"pairs": 2, "truncated": 1, "dropped_overlong": 0, "with_reference": 0}
    assert len(cut.rows[0][0]) == 32 and tok.decode(cut.rows[0][0]).endswith("<|end_of_sentence|>")
    dropped = PreferenceDataset(path, tok, 32, overlong="drop")
    assert dropped.stats["pairs"] == 1 and dropped.stats["dropped_overlong"] == 1


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    ({"prompt": "Hi", "chosen": "a"}, "missing 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "needs 'prompt'"),
    ({"prompt": "Hi", "chosen": 3, "rejected": "b"}, "'chosen' must be"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "user turn"),
    ({"prompt": "Hi", "chosen": "a", "rejected": "b", "reference": 5}, "'reference' must be a string"),
])
def test_bad_preference_data_names_file_and_line(tmp_path, line, message):
    from megatron_ernie.data.preference import load_pairs
    from megatron_ernie.data.sft import DataError

    path = _write(tmp_path / "bad.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert f"{path}:2" in str(e.value) and message in str(e.value)


def test_an_sft_checkpoint_is_refused_as_a_reward_model(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "megatron_ernie.train", "recipe=sft", "data.seq_length=32",
                          "train.steps=1", "train.global_batch_size=2", "out_dir=lm"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    check = subprocess.run([sys.executable, "-c", "import sys\nfrom megatron_ernie.rewards.reward_model import "
                            "RewardModelScorer, NotARewardModel\ntry:\n RewardModelScorer.from_checkpoint('lm')\n"
                            "except NotARewardModel as e:\n print('refused:', e)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert "refused:" in check.stdout and "reward_head.weight" in check.stdout, check.stderr[-2000:]


def test_reward_model_checkpoints_are_not_exported_as_causal_lms(trained, tmp_path):
    from megatron_ernie.conversion.convert import mcore_to_hf
    from megatron_ernie.conversion.safetensors_io import CheckpointError

    run_dir, _ = trained
    with pytest.raises(CheckpointError, match="reward-model checkpoint"):
        mcore_to_hf(run_dir / "checkpoints" / "step_00000080", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()
