"""Same weights, same global batch, different parallel layouts -> the same step.

A single-process run is the reference. Every layout must reproduce its loss and grad norm
within 1e-6 relative, and after one Adam step every parameter slice it holds (and every
router correction bias moved by aux-loss-free balancing) must match the reference's.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_ernie.models.ernie.hf_adapter import (
    HFWeights, canonical_from_hf, canonical_name, canonical_names, local_tensors, load_canonical,
    rank_info, shard_for_rank,
)
from megatron_ernie.runtime import ParallelLayout
from tests.helpers import TEST_DENSE, TEST_MOE, fixed_batch, hf_model, spawn

MODELS = {
    "dense": TEST_DENSE,
    # every router feature on (aux loss, orthogonal loss, correction-bias updates) and an untied
    # output layer like the 300B's (the dense model covers the tied one, PP included)
    "moe": TEST_MOE.replace(moe_aux_loss_coeff=0.01, moe_orthogonal_loss_coeff=0.01, moe_bias_update_rate=1e-3,
                            tie_word_embeddings=False),
}
JOBS = {  # name: (model, layout, world size)
    "dense_tp2": ("dense", ParallelLayout(tp=2), 2),
    "dense_tp2_sp": ("dense", ParallelLayout(tp=2, sequence_parallel=True), 2),
    "dense_pp2": ("dense", ParallelLayout(pp=2), 2),
    "dense_dp2_distopt": ("dense", ParallelLayout(distributed_optimizer=True), 2),
    "moe_tp2_sp": ("moe", ParallelLayout(tp=2, sequence_parallel=True), 2),
    "moe_pp2": ("moe", ParallelLayout(pp=2), 2),
    "moe_ep2": ("moe", ParallelLayout(ep=2), 2),
    "moe_dp2_distopt": ("moe", ParallelLayout(distributed_optimizer=True), 2),
    "moe_tp2_ep2": ("moe", ParallelLayout(tp=2, ep=2, sequence_parallel=True), 4),
}
GLOBAL_BATCH, SEQ, LR = 4, 32, 1e-3
# Adam moves a weight whose grad is far below eps by lr*g/eps: fp32 reduction-order noise in g
# (~1e-10 between layouts) is amplified by lr/eps. eps=1e-6 keeps that amplification at 1e3.
ADAM_EPS = 1e-6
# Hence parameters are compared to a fraction of one Adam step (every weight moves by ~LR).
PARAM_TOL = 5e-3 * LR


def _one_step(model_name: str, layout: ParallelLayout, workdir: Path):
    from megatron_ernie.models.ernie.model import build_model
    from megatron_ernie.runtime import initialize

    args = MODELS[model_name]
    initialize(layout, args, seed=1234)
    model = build_model(args, layout)
    weights = torch.load(workdir / f"{model_name}_weights.pt")
    load_canonical(model, weights.__getitem__)
    _, result = adam_step(model, layout, args)
    return model, result


def adam_step(model, layout: ParallelLayout, args):
    """(DDP wrapper, StepResult) of one Adam step (LR, ADAM_EPS) on the fixed global batch, split
    over the data-parallel ranks (one sample per micro-batch)."""
    from megatron.core import parallel_state as ps

    from megatron_ernie.training.step import attach_schedule_hooks, build_optimizer, train_step, wrap_ddp

    ddp = wrap_ddp(model, layout)
    opt = build_optimizer([ddp], layout, lr=LR, eps=ADAM_EPS)
    attach_schedule_hooks([ddp], opt)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // dp
    batch = fixed_batch(args, GLOBAL_BATCH, SEQ)
    mine = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    micro = [{k: v[i : i + 1] for k, v in batch.items()} for i in mine]
    result = train_step([ddp], opt, micro, num_microbatches=per_rank, seq_length=SEQ, micro_batch_size=1,
                        forward_step=sft_forward_step)
    return ddp, result


def sft_forward_step(data_iterator, model):
    from megatron_ernie.algorithms.sft import forward_step

    return forward_step(data_iterator, model)


def run_jobs(rank: int, world: int, names: list[str], workdir: Path) -> None:
    for name in names:
        model_name, layout, _ = JOBS.get(name, (name.removesuffix("_base"), ParallelLayout(), 1))
        model, result = _one_step(model_name, layout, workdir)
        out = {"loss": result.loss, "grad_norm": result.grad_norm, "tokens": result.num_tokens}
        info = rank_info(model)
        if world == 1:
            after = {canonical_name(n, info): t.detach().clone() for n, t in local_tensors(model)}
            torch.save(after, workdir / f"{model_name}_after.pt")
        else:
            ref = torch.load(workdir / f"{model_name}_after.pt")
            diffs = {}
            for n, t in local_tensors(model):
                canon = canonical_name(n, info)
                diffs[canon] = (t - shard_for_rank(ref[canon], t, canon, info)).abs().max().item()
            out["param_diffs"] = diffs
        torch.save(out, workdir / f"{name}.rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("layouts")
    for model_name, args in MODELS.items():
        hf = HFWeights(hf_model(args, seed=3).state_dict())
        full = {n: canonical_from_hf(n, hf.get, args).clone() for n in canonical_names(args)}
        torch.save(full, workdir / f"{model_name}_weights.pt")
    spawn(run_jobs, 1, ["dense_base", "moe_base"], workdir)
    for world in (2, 4):
        names = [n for n, (_, _, w) in JOBS.items() if w == world]
        spawn(run_jobs, world, names, workdir)
    return workdir


def _load(workdir: Path, name: str, world: int):
    return [torch.load(workdir / f"{name}.rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("job", list(JOBS))
def test_layout_matches_single_process(results, job):
    model_name, layout, world = JOBS[job]
    base = torch.load(results / f"{model_name}_base.rank0.pt")
    ranks = _load(results, job, world)
    assert base["tokens"] > 0
    for r, out in enumerate(ranks):
        assert out["tokens"] == base["tokens"], f"rank {r}"
        assert out["loss"] == pytest.approx(base["loss"], rel=1e-6), f"rank {r} loss"
        assert out["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-6), f"rank {r} grad norm"
        worst = max(out["param_diffs"].items(), key=lambda kv: kv[1])
        print(f"{job} rank {r}: worst parameter difference {worst[1]:.3g} ({worst[0]})")
        assert worst[1] <= PARAM_TOL, f"rank {r}: parameter {worst[0]} differs by {worst[1]:.3g} after the step"
    # every canonical tensor is held by at least one rank
    held = set().union(*(o["param_diffs"] for o in ranks))
    assert held >= set(torch.load(results / f"{model_name}_after.pt")), "some tensors were never compared"


def test_reference_step_moved_weights_and_bias(results):
    """Guards the comparison above against a no-op step."""
    for model_name in MODELS:
        before = torch.load(results / f"{model_name}_weights.pt")
        after = torch.load(results / f"{model_name}_after.pt")
        moved = [n for n in before if not torch.equal(before[n], after[n])]
        assert len(moved) >= len(before) // 2
    biases = [n for n in before if n.endswith("e_score_correction_bias")]
    assert biases and all(not torch.equal(before[n], after[n]) for n in biases)
