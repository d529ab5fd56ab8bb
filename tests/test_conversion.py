"""HF ⇄ Megatron-Core conversion: bit-exact round trips through real parallel layouts.

Each layout job loads a converted checkpoint into a model sharded that way (gloo ranks), saves
it again with Megatron-Core's own `dist_checkpointing.save` (so chunks are cut by that layout),
and the saved checkpoint is converted back to HF: every tensor's bytes must equal the source's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_ernie.conversion.convert import hf_to_mcore, mcore_to_hf
from megatron_ernie.conversion.safetensors_io import INDEX_NAME, SafetensorsCheckpoint
from megatron_ernie.models.ernie import from_hf_config
from megatron_ernie.runtime import ParallelLayout
from tests.helpers import TEST_DENSE, TEST_MOE, save_hf_model, spawn

MODELS = {
    "dense": TEST_DENSE,  # tied embeddings
    # untied output layer (300B-like), MoE every 2nd layer, 2 shared experts
    "moe": TEST_MOE.replace(tie_word_embeddings=False, moe_layer_interval=2, moe_num_shared_experts=2),
}
SP_TP2 = ParallelLayout(tp=2, sequence_parallel=True)
# name: (model, layout, world, source checkpoint, saved checkpoint)
JOBS = {
    "moe_tp1": ("moe", ParallelLayout(), 1, "moe_mc", "moe_tp1_saved"),
    "dense_tp1": ("dense", ParallelLayout(), 1, "dense_mc", "dense_tp1_saved"),
    "moe_tp2": ("moe", SP_TP2, 2, "moe_mc", "moe_tp2_saved"),
    "moe_ep2": ("moe", ParallelLayout(ep=2), 2, "moe_mc", "moe_ep2_saved"),
    "moe_pp2": ("moe", ParallelLayout(pp=2), 2, "moe_mc", "moe_pp2_saved"),
    "dense_tp2": ("dense", ParallelLayout(tp=2), 2, "dense_mc", "dense_tp2_saved"),
    "dense_pp2": ("dense", ParallelLayout(pp=2), 2, "dense_mc", "dense_pp2_saved"),
    # written at TP=1 (by Megatron), loaded at TP2×EP2; then written at TP2×EP2, loaded at TP=1
    "moe_tp2ep2": ("moe", ParallelLayout(tp=2, ep=2, sequence_parallel=True), 4, "moe_tp1_saved", "moe_tp2ep2_saved"),
    "moe_back_tp1": ("moe", ParallelLayout(), 1, "moe_tp2ep2_saved", "moe_back_tp1_saved"),
}
IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(3))


def _full_logits(model) -> torch.Tensor:
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    pos = torch.arange(IDS.shape[1]).unsqueeze(0).expand(IDS.shape[0], -1)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(IDS, pos, None)).float()


def run_jobs(rank: int, world: int, names: list[str], workdir: Path) -> None:
    from megatron_ernie.conversion.mcore_model import load_model_checkpoint, save_model_checkpoint
    from megatron_ernie.models.ernie.model import build_model
    from megatron_ernie.runtime import initialize

    for name in names:
        model_name, layout, _, src, dst = JOBS[name]
        args = MODELS[model_name]
        initialize(layout, args, seed=1)
        model = build_model(args, layout).eval()
        load_model_checkpoint(model, workdir / src)
        if layout.pp == 1:
            logits = _full_logits(model)
            if rank == 0:
                torch.save(logits, workdir / f"{name}_logits.pt")
        save_model_checkpoint(model, workdir / dst)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("conversion")
    for name, args in MODELS.items():
        save_hf_model(args, workdir / f"{name}_hf", seed=21)
        hf_to_mcore(workdir / f"{name}_hf", workdir / f"{name}_mc", tp=2, ep=2 if args.is_moe else 1, progress=False)
    for group in (["moe_tp1", "dense_tp1"], ["moe_tp2", "moe_ep2", "moe_pp2", "dense_tp2", "dense_pp2"],
                  ["moe_tp2ep2"], ["moe_back_tp1"]):
        spawn(run_jobs, JOBS[group[0]][2], group, workdir)
    return workdir


def assert_same_hf_tensors(a_dir: Path, b_dir: Path) -> int:
    a, b = SafetensorsCheckpoint(a_dir), SafetensorsCheckpoint(b_dir)
    assert set(a.keys()) == set(b.keys()), sorted(set(a.keys()) ^ set(b.keys()))
    for name in a.keys():
        x, y = a.get(name), b.get(name)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), f"{name}: bytes differ"
    return len(a.keys())


def assert_index_consistent(root: Path) -> None:
    index = root / INDEX_NAME
    if not index.exists():
        return
    data = json.loads(index.read_text())
    ckpt = SafetensorsCheckpoint(root)
    assert set(data["weight_map"]) == set(ckpt.keys())
    assert data["metadata"]["total_size"] == ckpt.total_bytes()
    assert {root / f for f in data["weight_map"].values()} == set(ckpt.files)


@pytest.mark.parametrize("job", [j for j in JOBS if not j.endswith("tp1")] + ["moe_back_tp1"])
def test_round_trip_through_layout_is_bit_exact(work, job, tmp_path):
    model_name = JOBS[job][0]
    out = tmp_path / "hf"
    mcore_to_hf(work / JOBS[job][4], out, max_shard_bytes=300_000, progress=False)  # several shards + index
    n = assert_same_hf_tensors(work / f"{model_name}_hf", out)
    assert n > 20
    assert_index_consistent(out)
    assert len(list(out.glob("*.safetensors"))) > 1
    assert from_hf_config(out) == from_hf_config(work / f"{model_name}_hf")


@pytest.mark.parametrize("model_name", list(MODELS))
def test_export_loads_in_transformers_with_our_logits(work, model_name, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    mcore_to_hf(work / f"{model_name}_mc", out, progress=False)
    assert_same_hf_tensors(work / f"{model_name}_hf", out)
    assert json.loads((out / "config.json").read_text()) == json.loads((work / f"{model_name}_hf" / "config.json").read_text())
    assert (out / "generation_config.json").exists()  # non-weight files travel with the weights
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = ref(IDS).logits
    ours = torch.load(work / f"{model_name}_tp1_logits.pt")
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("job", ["moe_tp2", "moe_ep2", "dense_tp2", "moe_tp2ep2", "moe_back_tp1"])
def test_any_layout_loads_with_the_same_logits(work, job):
    model_name = JOBS[job][0]
    ref = torch.load(work / f"{model_name}_tp1_logits.pt")
    got = torch.load(work / f"{job}_logits.pt")
    assert got.shape == ref.shape
    if job == "moe_back_tp1":  # same layout, weights passed through TP2×EP2 and back: identical
        assert torch.equal(got, ref)
    else:
        assert (got - ref).abs().max().item() <= 1e-5


def test_checkpoint_written_by_megatron_is_chunked_by_its_layout(work):
    """The TP2×EP2 save really is cut into per-rank chunks (so the round trip above resharded)."""
    from megatron_ernie.conversion.mcore_format import McoreCheckpoint

    ck = McoreCheckpoint(work / "moe_tp2ep2_saved")
    qkv = ck.tensors["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert len(qkv.chunks) == 2  # TP halves
    experts = ck.tensors["decoder.layers.1.mlp.experts.experts.linear_fc2.weight"]
    assert tuple(experts.size)[0] == MODELS["moe"].num_experts
    assert len(experts.chunks) == MODELS["moe"].num_experts * 2  # one per expert, each halved by expert-TP (= TP)
