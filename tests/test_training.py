"""The training loop with the SFT stage: exact resume after kill -9, layouts, packing, errors, pipelines."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ernie.training.config import compose
from tests.helpers import TEST_MOE, save_hf_model, spawn

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["recipe=sft", "data.seq_length=64", "train.global_batch_size=4", "train.micro_batch_size=2",
         "optim.lr=1e-3", "optim.warmup_steps=2"]


def _train(tmp_path: Path, *overrides: str, fault: str | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MEGATRON_ERNIE_FAULT", None)
    if fault:
        env["MEGATRON_ERNIE_FAULT"] = fault
    out = subprocess.run([sys.executable, "-m", "megatron_ernie.train", *QUICK, *overrides], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == expect, out.stderr[-3000:]
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps without interruption (the reference)."""
    tmp = tmp_path_factory.mktemp("straight")
    _train(tmp, "train.steps=6", "checkpoint.interval=3", "out_dir=run")
    return tmp / "run"


def test_resume_after_kill_is_bit_exact(straight, tmp_path):
    ref = _losses(straight)
    assert len(ref) == 6 and ref[6] < ref[1]
    # killed (SIGKILL) right after step 3 and its checkpoint; resumed for 3 more
    _train(tmp_path, "train.steps=6", "checkpoint.interval=3", "out_dir=run", fault="after_step:3", expect=-9)
    assert _losses(tmp_path / "run") == {k: ref[k] for k in (1, 2, 3)}
    out = _train(tmp_path, "train.steps=6", "checkpoint.interval=3", "out_dir=run")
    assert "resumed at step 3" in out.stdout
    assert _losses(tmp_path / "run") == ref  # every step, bit for bit
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[-1])
    assert any(k.startswith("moe_load_max_over_mean/layer") for k in rows[-1])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000


def test_kill_during_checkpoint_save_resumes_from_the_previous_one(straight, tmp_path):
    ref = _losses(straight)
    # step 4's checkpoint is fully written but not yet published when the process dies
    _train(tmp_path, "train.steps=6", "checkpoint.interval=2", "out_dir=run", fault="checkpoint_written:4", expect=-9)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert any(p.name.startswith(".step_00000004.tmp-") for p in ckpts.iterdir())  # the half-done save
    out = _train(tmp_path, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=2", "out_dir=run")
    assert "resumed at step 2" in out.stdout
    assert _losses(tmp_path / "run") == ref
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004", "step_00000006"]  # pruned


def test_bad_data_or_override_fails_clearly_and_keeps_what_was_written(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    bad.write_text(good + "\n" + good + "\n{not json\n")
    out = _train(tmp_path, "train.steps=9", "out_dir=run", f"data.path={bad}", expect=2)
    assert f"{bad}:3" in out.stderr and "Traceback" not in out.stderr
    out = _train(tmp_path, "train.stepz=9", "out_dir=run", expect=2)
    assert "train.stepz" in out.stderr
    out = _train(tmp_path, "train.steps=many", "out_dir=run", expect=2)
    assert "train.steps" in out.stderr
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing of the earlier run was touched


# --- same recipe, different layouts ---------------------------------------------------------------
LAYOUTS = {"single": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"]),
           "dp2": (2, ["parallel.distributed_optimizer=true"]),
           "from_mcore": (1, ["model.init_from={workdir}/mc"])}  # the HF weights converted to Megatron


def run_layouts(rank: int, world: int, names: list[str], workdir: Path) -> None:
    from megatron_ernie.train import run

    for name in names:
        cfg = compose([*QUICK, "train.steps=3", "optim.eps=1e-6", f"model.init_from={workdir / 'hf'}",
                       f"out_dir={workdir / name}", "checkpoint.interval=100",
                       *(o.format(workdir=workdir) for o in LAYOUTS[name][1])])
        result = run(cfg, progress=False)
        if rank == world - 1:
            torch.save(result.losses, workdir / f"{name}.pt")


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory) -> Path:
    """The runs' directory: the source HF model (hf/), its conversion (mc/), one run per layout."""
    workdir = tmp_path_factory.mktemp("sft_layouts")
    from megatron_ernie.conversion.convert import hf_to_mcore

    save_hf_model(TEST_MOE, workdir / "hf", seed=5)
    hf_to_mcore(workdir / "hf", workdir / "mc", progress=False)
    spawn(run_layouts, 1, ["single", "from_mcore"], workdir)
    spawn(run_layouts, 2, ["tp2", "pp2", "dp2"], workdir)
    return workdir


@pytest.fixture(scope="module")
def layout_losses(layout_runs):
    return {name: torch.load(layout_runs / f"{name}.pt") for name in LAYOUTS}


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_same_recipe_same_losses_at_any_layout(layout_losses, layout):
    ref, got = layout_losses["single"], layout_losses[layout]
    assert sorted(got) == [1, 2, 3]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=0), f"step {step}"


def test_initial_weights_from_a_converted_megatron_checkpoint_equal_the_hf_ones(layout_losses):
    assert layout_losses["from_mcore"] == layout_losses["single"]  # bit for bit


@pytest.mark.parametrize("name", ["single", "from_mcore"])
def test_checkpoints_and_exports_keep_the_sources_generation_config(layout_runs, name, tmp_path):
    """ERNIE's EOS ids and sampling defaults live in generation_config.json: a trained checkpoint
    carries the source's (from an HF dir or a converted checkpoint), and its export has it."""
    from megatron_ernie.conversion.convert import mcore_to_hf

    workdir = layout_runs
    source = (workdir / "hf" / "generation_config.json").read_bytes()
    ckpt = workdir / name / "checkpoints" / "step_00000003"
    assert (ckpt / "hf" / "generation_config.json").read_bytes() == source
    mcore_to_hf(ckpt, tmp_path / "export", progress=False)
    assert (tmp_path / "export" / "generation_config.json").read_bytes() == source


# --- packing and the empty think block, on the model ---------------------------------------------
def _model(world1, tmp_path):
    from megatron_ernie.models.ernie import from_hf_config
    from megatron_ernie.models.ernie.hf_adapter import load_hf_weights
    from megatron_ernie.models.ernie.model import build_model
    from megatron_ernie.runtime import ParallelLayout, initialize

    save_hf_model(TEST_MOE, tmp_path / "hf", seed=9)
    args = from_hf_config(tmp_path / "hf")
    initialize(ParallelLayout(), args, environ={"RANK": "0", "WORLD_SIZE": "1"})
    model = build_model(args).eval()
    load_hf_weights(model, tmp_path / "hf", args)
    return model


def _per_document_loss(model, dataset) -> dict[int, float]:
    from megatron_ernie.algorithms.sft import microbatch

    sums: dict[int, float] = {}
    for i in range(len(dataset)):
        batch = microbatch([dataset[i]])
        with torch.no_grad():
            tok = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
        tok = (tok.float() * batch["loss_mask"])[0]
        for d, doc in enumerate(dataset.rows[i]):
            sums[doc] = sums.get(doc, 0.0) + float(tok[batch["doc_ids"][0] == d].sum())
    return sums


def test_packed_and_unpacked_give_the_same_per_sample_losses(world1, tmp_path):
    from megatron_ernie.data.sft import SFTDataset, bundled_sft_path
    from megatron_ernie.data.tokenizer import demo_tokenizer

    model = _model(world1, tmp_path)
    lines = bundled_sft_path().read_text().splitlines()[:40]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    tok = demo_tokenizer()
    packed = SFTDataset(tmp_path / "d.jsonl", tok, seq_length=128, pack=True)
    unpacked = SFTDataset(tmp_path / "d.jsonl", tok, seq_length=128, pack=False)
    assert len(packed) < len(unpacked)  # several samples per packed sequence
    a, b = _per_document_loss(model, packed), _per_document_loss(model, unpacked)
    assert sorted(a) == sorted(b) and len(a) == len(unpacked)
    for doc in a:
        assert a[doc] == pytest.approx(b[doc], rel=1e-5, abs=1e-5), f"document {doc}"


def test_empty_think_block_is_masked_but_seen_by_the_model(world1, tmp_path):
    from megatron_ernie.data.chat import EMPTY_THINK, render_messages
    from megatron_ernie.data.tokenizer import demo_tokenizer

    model = _model(world1, tmp_path)
    tok = demo_tokenizer()
    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    with_think, without = render_messages(msgs, tok, empty_think=True), render_messages(msgs, tok, empty_think=False)
    assert tok.decode(with_think.input_ids).count(EMPTY_THINK) == 1
    think_len = len(with_think.input_ids) - len(without.input_ids)
    assert think_len > 0
    # the think tokens carry no loss; the answer and eos carry the same loss weight in both
    assert sum(with_think.loss_mask) == sum(without.loss_mask)

    def answer_loss(sample) -> torch.Tensor:
        ids = torch.tensor([sample.input_ids])
        tokens, labels = ids[:, :-1], ids[:, 1:]
        pos = torch.arange(tokens.shape[1]).unsqueeze(0)
        with torch.no_grad():
            losses = model(tokens, pos, None, labels=labels).float()[0]
        return losses[torch.tensor(sample.label_mask, dtype=torch.bool)]

    a, b = answer_loss(with_think), answer_loss(without)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() > 1e-4  # the masked think tokens still shape the answer's context


# --- pipelines ------------------------------------------------------------------------------------
def test_pipeline_stage_starts_from_the_previous_stage(tmp_path):
    recipes = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", recipes)
    (recipes / "recipe" / "two_links.yaml").write_text(
        "# @package _global_\nname: two\npipeline:\n"
        "  - recipe: sft\n    overrides: [name=first, train.steps=4]\n"
        "  - recipe: sft\n    overrides: [name=second, train.steps=2, optim.lr=1e-6, optim.warmup_steps=0]\n")
    env = dict(os.environ, MEGATRON_ERNIE_RECIPES=str(recipes))
    out = subprocess.run([sys.executable, "-m", "megatron_ernie.train", *QUICK, "recipe=two_links", "out_dir=run",
                          "checkpoint.interval=100"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = _losses(tmp_path / "run" / "00_first"), _losses(tmp_path / "run" / "01_second")
    assert len(first) == 4 and len(second) == 2
    assert "run/00_first/checkpoints/step_00000004" in (tmp_path / "run" / "01_second" / "run_config.yaml").read_text()
    assert second[1] < first[1] - 0.05  # it did not start from scratch
    # the checkpoint carries the tokenizer: the next stage (and an HF export) use the same one
    assert (tmp_path / "run" / "00_first" / "checkpoints" / "step_00000004" / "hf" / "tokenizer_config.json").exists()


def test_packing_is_refused_where_attention_would_ignore_the_document_mask(monkeypatch):
    """On the TE spec (GPU) a packed batch would let documents attend to each other."""
    import megatron_ernie.models.ernie.spec as spec
    from megatron_ernie.training.config import ConfigError
    from megatron_ernie.training.loop import _check_packing_support

    cfg = compose(QUICK)
    _check_packing_support(cfg)  # local spec: fine
    monkeypatch.setattr(spec, "te_available", lambda: True)
    with pytest.raises(ConfigError, match="data.pack=true is not supported on the Transformer Engine spec"):
        _check_packing_support(cfg)
    _check_packing_support(compose([*QUICK, "data.pack=false"]))


def test_trained_checkpoint_exports_to_a_loadable_hf_model_with_its_tokenizer(straight, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_ernie.conversion.convert import mcore_to_hf

    mcore_to_hf(straight / "checkpoints" / "step_00000006", tmp_path / "hf", progress=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tok("User: What is 2 + 3?\nAssistant: ", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert tok.convert_tokens_to_ids("<think>") == 3 and tok.eos_token_id == 2


def test_show_prints_the_validated_config_and_runs_nothing(tmp_path, capsys):
    from megatron_ernie.train import main

    assert main(["--show", "recipe=sft", "parallel.tp=2", f"out_dir={tmp_path / 'x'}"]) == []
    out = capsys.readouterr().out
    assert "tp: 2" in out and "stage: sft" in out and "preset: ernie45_tiny_moe" in out
    assert not (tmp_path / "x").exists()
