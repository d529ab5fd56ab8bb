"""Refit, trainer side: a live Megatron model at any layout streams exactly the HF tensors.

Fresh loads: a transformers reference is saved, loaded into Megatron models at TP/EP/PP layouts
(gloo ranks) and `hf_tensors` must yield every tensor of the saved safetensors exactly once,
bit-identical, on every rank (or only on `dst`). After an Adam step the stream must equal the
model's own state taken another way: `save_model_checkpoint` + `mcore_to_hf`, read back from disk
(bit-identical), and match a single-process model given the same step (layout tolerance).
Buckets: a capped bucket size bounds what is alive, and the engine gets each tensor once.
"""
from __future__ import annotations

import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron_ernie.conversion.safetensors_io import SafetensorsCheckpoint
from megatron_ernie.errors import WeightError
from megatron_ernie.rl import refit as refit_mod
from megatron_ernie.rl.refit import MiB, RefitStats, buckets, hf_tensors, refit, unshard
from megatron_ernie.runtime import ParallelLayout
from tests.helpers import TEST_MOE, save_hf_model, spawn
from tests.test_layout_parity import PARAM_TOL, adam_step

MODELS = {
    "moe": TEST_MOE,  # tied embedding, dense layer 0, MoE layers 1-3, 8 experts top-2, 1 shared expert
    # untied lm_head (300B-like), MoE on layers 1 and 3 only, 2 shared experts
    "untied": TEST_MOE.replace(tie_word_embeddings=False, moe_layer_interval=2, moe_num_shared_experts=2),
}
# HF tensors of each: embedding + final norm (+ lm_head), 9 per dense layer, 35 per MoE layer
# (2 norms, q/k/v/o, gate, correction bias, 3 shared-expert, 8 experts x gate/up/down)
N_HF = {"moe": 2 + 9 + 3 * 35, "untied": 3 + 2 * 9 + 2 * 35}
# the step's model: every router feature on, so the correction bias moves too
STEP_ARGS = TEST_MOE.replace(moe_aux_loss_coeff=0.01, moe_bias_update_rate=1e-3)
SP = dict(sequence_parallel=True)  # MoE with TP needs it

# job: (model, layout, world, dst)
FRESH = {
    "moe_tp2": ("moe", ParallelLayout(tp=2, **SP), 2, "all"),
    "moe_ep2": ("moe", ParallelLayout(ep=2), 2, "all"),
    "moe_pp2": ("moe", ParallelLayout(pp=2), 2, "all"),  # tied: last stage's output layer = embedding
    "untied_tp2": ("untied", ParallelLayout(tp=2, **SP), 2, "all"),
    "untied_pp2": ("untied", ParallelLayout(pp=2), 2, "all"),
    "moe_pp2_dst0": ("moe", ParallelLayout(pp=2), 2, 0),
    # bf16 weights, fp32 routers and biases: stage 0 receives stage 1's fp32 tensors
    "moe_pp2_bf16": ("moe", ParallelLayout(pp=2), 2, "all"),
    "moe_tp2_ep2": ("moe", ParallelLayout(tp=2, ep=2, **SP), 4, "all"),
    "moe_tp2_pp2": ("moe", ParallelLayout(tp=2, pp=2, **SP), 4, "all"),
    "untied_pp2_ep2": ("untied", ParallelLayout(pp=2, ep=2), 4, "all"),
    "moe_tp2_etp1_ep2": ("moe", ParallelLayout(tp=2, etp=1, ep=2, **SP), 4, "all"),  # experts unsplit
    "untied_tp2_pp2_dst1": ("untied", ParallelLayout(tp=2, pp=2, **SP), 4, 1),  # rank 1: TP rank 1, stage 0
}
STEP = {
    "step_tp1": (ParallelLayout(), 1),
    "step_tp2": (ParallelLayout(tp=2, **SP), 2),
    "step_ep2": (ParallelLayout(ep=2), 2),
    "step_pp2": (ParallelLayout(pp=2), 2),
    "step_dp2_distopt": (ParallelLayout(distributed_optimizer=True), 2),  # params all-gathered after the step
    "step_tp2_ep2": (ParallelLayout(tp=2, ep=2, **SP), 4),
}
BF16 = {"moe_pp2_bf16"}
FP32_IN_BF16 = ("mlp.gate.weight", "e_score_correction_bias")  # ERNIE keeps the router in fp32
EXTRA = "decoder.layers.3.mlp.extra_gain"  # the error job's unknown parameter (last stage, local layer 1)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def read_hf(path: Path) -> dict[str, torch.Tensor]:
    ck = SafetensorsCheckpoint(path)
    return {n: ck.get(n) for n in ck.keys()}


def summary(items: list[tuple[str, torch.Tensor]], reference: dict[str, torch.Tensor]) -> dict:
    counts = Counter(n for n, _ in items)
    return {
        "names": [n for n, _ in items],
        "duplicates": sorted(n for n, c in counts.items() if c > 1),
        "missing": sorted(set(reference) - set(counts)),
        "extra": sorted(set(counts) - set(reference)),
        "differ": sorted(n for n, t in items if n in reference and not same_bits(t, reference[n])),
    }


def _model(args, layout, hf_dir, dtype=torch.float32):
    from megatron_ernie.models.ernie.hf_adapter import load_hf_weights
    from megatron_ernie.models.ernie.model import build_model
    from megatron_ernie.runtime import initialize

    initialize(layout, args, seed=1)
    model = build_model(args, layout, dtype=dtype)
    load_hf_weights(model, hf_dir, args)
    return model


def _stream(model_chunks, args, dst="all") -> list[tuple[str, torch.Tensor]]:
    return [(n, t.clone()) for n, t in hf_tensors(model_chunks, args, dst=dst)]


def _fresh_job(rank, name, workdir):
    model_name, layout, _, dst = FRESH[name]
    args = MODELS[model_name]
    bf16 = name in BF16
    model = _model(args, layout, workdir / f"{model_name}_hf", torch.bfloat16 if bf16 else torch.float32)
    items = _stream(model, args, dst)
    ref = read_hf(workdir / f"{model_name}_hf")
    if bf16:  # what loading did to the reference: rounded to bf16, routers kept fp32
        ref = {n: t if n.endswith(FP32_IN_BF16) else t.to(torch.bfloat16) for n, t in ref.items()}
    torch.save(summary(items, ref), workdir / f"{name}.rank{rank}.pt")


def stepped_trainer(args, layout, hf_dir):
    """(model, its DDP wrapper): loaded from `hf_dir` at `layout`, after one Adam step on a fixed
    global batch split over the data-parallel ranks (test_layout_parity's step)."""
    model = _model(args, layout, hf_dir)
    ddp, result = adam_step(model, layout, args)
    assert result.update_successful
    return model, ddp


def _step_job(rank, name, workdir):
    from megatron_ernie.conversion.convert import mcore_to_hf
    from megatron_ernie.conversion.mcore_model import save_model_checkpoint
    from megatron_ernie.runtime.distributed import barrier

    layout, _ = STEP[name]
    model, ddp = stepped_trainer(STEP_ARGS, layout, workdir / "moe_hf")

    items = _stream([ddp], STEP_ARGS)  # a list of DDP-wrapped chunks
    save_model_checkpoint(model, workdir / f"{name}_mc")
    if rank == 0:
        mcore_to_hf(workdir / f"{name}_mc", workdir / f"{name}_export", progress=False)
    barrier()
    out = summary(items, read_hf(workdir / f"{name}_export"))
    if rank == 0:
        torch.save(dict(items), workdir / f"{name}_stream.pt")
    torch.save(out, workdir / f"{name}.rank{rank}.pt")


def _error_job(rank, workdir):
    from megatron.core import parallel_state as ps

    model = _model(MODELS["moe"], ParallelLayout(pp=2), workdir / "moe_hf")
    if ps.get_pipeline_model_parallel_rank() == 1:  # only one rank has it: both must still fail
        model.decoder.layers[1].mlp.register_parameter("extra_gain", torch.nn.Parameter(torch.ones(4)))
    try:
        hf_tensors(model, MODELS["moe"])
        message = None
    except WeightError as e:
        message = str(e)
    torch.save(message, workdir / f"error.rank{rank}.pt")


def run_jobs(rank: int, world: int, jobs: list[str], workdir: Path) -> None:
    for job in jobs:
        if job in FRESH:
            _fresh_job(rank, job, workdir)
        elif job in STEP:
            _step_job(rank, job, workdir)
        else:
            _error_job(rank, workdir)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("refit")
    for name, args in MODELS.items():
        save_hf_model(args, workdir / f"{name}_hf", seed=5)
    return workdir


@pytest.fixture(scope="module")
def work(hf_dirs):
    workdir = hf_dirs
    for world in (1, 2, 4):
        jobs = [j for j, v in FRESH.items() if v[2] == world] + [j for j, v in STEP.items() if v[1] == world]
        spawn(run_jobs, world, jobs + (["error"] if world == 2 else []), workdir)
    return workdir


def _ranks(work: Path, job: str, world: int) -> list[dict]:
    return [torch.load(work / f"{job}.rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("job", list(FRESH))
def test_stream_from_layout_is_the_saved_hf_checkpoint(work, job):
    model_name, _, world, dst = FRESH[job]
    saved = SafetensorsCheckpoint(work / f"{model_name}_hf").keys()
    assert len(saved) == N_HF[model_name]
    for r, out in enumerate(_ranks(work, job, world)):
        if dst != "all" and r != dst:
            assert out["names"] == [], f"rank {r} is not dst={dst}"
            continue
        assert len(out["names"]) == N_HF[model_name], f"rank {r}"
        assert (out["duplicates"], out["missing"], out["extra"], out["differ"]) == ([], [], [], []), f"rank {r}"


def test_stream_order_is_the_same_at_every_layout(work):
    for model_name in MODELS:
        orders = {tuple(_ranks(work, j, w)[0 if d == "all" else d]["names"])
                  for j, (m, _, w, d) in FRESH.items() if m == model_name}
        assert len(orders) == 1
        names = list(orders.pop())
        assert names[0] == "model.embed_tokens.weight"
        assert names[-1] == ("lm_head.weight" if model_name == "untied" else "model.norm.weight")


@pytest.mark.parametrize("job", list(STEP))
def test_stream_after_a_step_is_the_models_exported_state(work, job):
    _, world = STEP[job]
    for r, out in enumerate(_ranks(work, job, world)):
        assert len(out["names"]) == N_HF["moe"], f"rank {r}"
        assert (out["duplicates"], out["missing"], out["extra"], out["differ"]) == ([], [], [], []), f"rank {r}"


@pytest.mark.parametrize("job", [j for j in STEP if j != "step_tp1"])
def test_stream_after_a_step_matches_single_process(work, job):
    ref = torch.load(work / "step_tp1_stream.pt")
    got = torch.load(work / f"{job}_stream.pt")
    assert list(got) == list(ref)
    worst = max(((got[n] - ref[n]).abs().max().item(), n) for n in ref)
    assert worst[0] <= PARAM_TOL, f"{worst[1]} differs by {worst[0]:.3g}"


def test_the_step_moved_weights_and_biases(work):
    """Guards the two tests above against a no-op step."""
    before, after = read_hf(work / "moe_hf"), torch.load(work / "step_tp1_stream.pt")
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(moved) >= len(before) // 2
    biases = [n for n in before if n.endswith("e_score_correction_bias")]
    assert len(biases) == 3 and set(biases) <= set(moved)
    assert after[biases[0]].dtype == torch.float32


def test_a_bad_tensor_on_one_rank_fails_every_rank_naming_it(work):
    messages = [torch.load(work / f"error.rank{r}.pt") for r in range(2)]
    for m in messages:
        assert m is not None
        assert f"{EXTRA!r} (parameter 'decoder.layers.1.mlp.extra_gain') has no row in hf_adapter.KEY_MAP [rank 1]" in m
    assert messages[0] == messages[1]


# --- single process (this process's gloo world) ------------------------------------------------
@pytest.fixture
def tp1(world1, hf_dirs):
    return _model(MODELS["moe"], ParallelLayout(), hf_dirs / "moe_hf")


def test_tp1_stream_of_the_model_and_its_wrappers(tp1, hf_dirs):
    ref = read_hf(hf_dirs / "moe_hf")
    for chunks in (tp1, [tp1]):
        out = summary(_stream(chunks, MODELS["moe"]), ref)
        assert len(out["names"]) == N_HF["moe"]
        assert (out["duplicates"], out["missing"], out["extra"], out["differ"]) == ([], [], [], [])


def test_untied_tp1_stream(world1, hf_dirs):
    model = _model(MODELS["untied"], ParallelLayout(), hf_dirs / "untied_hf")
    out = summary(_stream(model, None), read_hf(hf_dirs / "untied_hf"))  # args: the model's own
    assert len(out["names"]) == N_HF["untied"] and "lm_head.weight" in out["names"]
    assert (out["duplicates"], out["missing"], out["extra"], out["differ"]) == ([], [], [], [])


def test_unshard_is_the_inverse_of_shard_for_rank():
    from megatron_ernie.models.ernie.hf_adapter import RankInfo, shard_for_rank

    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    layer = "decoder.layers.1."
    for name, dim in ((layer + "mlp.linear_fc1.weight", 0), (layer + "mlp.experts.local_experts.3.linear_fc1.weight", 0),
                      (layer + "self_attention.linear_qkv.weight", 0), (layer + "self_attention.linear_proj.weight", 1)):
        local = torch.empty(4, 6) if dim == 0 else torch.empty(8, 3)
        local.tensor_model_parallel, local.partition_dim = True, dim
        shards = [shard_for_rank(full, local, name, RankInfo(0, 0, (r, 2), (r, 2))) for r in range(2)]
        if name.endswith("linear_fc1.weight"):  # GLU: rank 0 holds gate rows 0-1 and up rows 4-5
            assert torch.equal(shards[0], full[[0, 1, 4, 5]]), name
        assert torch.equal(unshard(shards, name, dim), full), name


def _sizes_stream(sizes):
    return ((f"t{i}", torch.empty(n, dtype=torch.uint8)) for i, n in enumerate(sizes))


def test_buckets_cap_and_boundaries():
    cap_mb = 100 / MiB  # 100 bytes
    got = [[t.nbytes for _, t in b] for b in buckets(_sizes_stream([40, 40, 30, 100, 10, 60, 60, 150, 1]), cap_mb)]
    # 40+40 (+30 would overflow) | 30 (+100 would) | 100 (full) | 10+60 | 60 | 150 alone (> cap) | 1
    assert got == [[40, 40], [30], [100], [10, 60], [60], [150], [1]]
    kept = list(buckets(_sizes_stream([40, 40, 30]), cap_mb))
    assert [len(b) for b in kept] == [0, 0]  # each list is emptied when the next is asked for
    with pytest.raises(ValueError, match="bucket_mb=0"):
        next(buckets(_sizes_stream([1]), 0))


class CopyEngine:
    """Copies every tensor into preallocated storage and keeps no reference to what it got."""

    def __init__(self, reference: dict[str, torch.Tensor]):
        self.store = {n: torch.zeros_like(t) for n, t in reference.items()}
        self.received: Counter = Counter()
        self.calls = 0

    def update_weights(self, tensors):
        self.calls += 1
        it = iter(tensors)
        while (item := next(it, None)) is not None:
            self.store[item[0]].copy_(item[1])
            self.received[item[0]] += 1
            del item


class Tracked:
    """Wraps the refit's stream: at each tensor produced, which earlier ones are still alive."""

    def __init__(self):
        self.refs: list[tuple[weakref.ref, int]] = []
        self.alive: list[list[int]] = []

    def wrap(self, *args, **kwargs):
        inner = iter(real_hf_tensors(*args, **kwargs))

        def gen():
            while (item := next(inner, None)) is not None:
                self.alive.append([j for j, (ref, _) in enumerate(self.refs) if ref() is not None])
                self.refs.append((weakref.ref(item[1]), item[1].nbytes))
                yield item
                del item
        return gen()


real_hf_tensors = refit_mod.hf_tensors


def _expected_buckets(sizes: list[int], cap: int) -> list[list[int]]:
    """The documented rule, independently: close before an overflow, or when full."""
    out, cur, size = [], [], 0
    for i, n in enumerate(sizes):
        if cur and size + n > cap:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
        if size >= cap:
            out.append(cur)
            cur, size = [], 0
    return out + ([cur] if cur else [])


def test_refit_with_capped_buckets_holds_one_bucket_and_delivers_each_tensor_once(tp1, hf_dirs, monkeypatch):
    ref = read_hf(hf_dirs / "moe_hf")
    engine, tracked = CopyEngine(ref), Tracked()
    monkeypatch.setattr(refit_mod, "hf_tensors", tracked.wrap)
    cap_mb = 0.05
    cap = int(cap_mb * MiB)
    stats = refit(engine, tp1, MODELS["moe"], bucket_mb=cap_mb)

    sizes = [n for _, n in tracked.refs]
    expected = _expected_buckets(sizes, cap)
    # (c) every tensor exactly once, bit-identical, in one update_weights call
    assert engine.calls == 1
    assert set(engine.received) == set(ref) and set(engine.received.values()) == {1}
    assert all(same_bits(engine.store[n], ref[n]) for n in ref)
    # (a) bucket sizes: each <= cap unless it is one larger tensor (the embedding, 128 KiB)
    bucket_bytes = [sum(sizes[i] for i in b) for b in expected]
    assert all(b <= cap or len(idx) == 1 for b, idx in zip(bucket_bytes, expected))
    oversized = [[sizes[i] for i in b] for b, n in zip(expected, bucket_bytes) if n > cap]
    assert oversized == [[512 * 64 * 4]]
    assert stats == RefitStats(tensors=N_HF["moe"], bytes=sum(sizes), buckets=len(expected),
                               seconds=stats.seconds, peak_bucket_bytes=512 * 64 * 4)
    assert stats.bytes == sum(t.nbytes for t in ref.values())
    # (b) when a tensor is produced, what is still alive is part of one bucket (the one being
    # filled, or the one it overflowed and that is still to be handed out), never more
    bucket_of = {i: k for k, b in enumerate(expected) for i in b}
    for i, alive in enumerate(tracked.alive):
        k = bucket_of[i]
        before_me = [j for j in expected[k] if j < i]
        if before_me:
            assert alive == before_me, i
        else:
            prev = expected[k - 1] if k else []
            closed_by_overflow = k and sum(sizes[j] for j in prev) < cap
            assert alive == (prev if closed_by_overflow else []), i
        assert sum(sizes[j] for j in alive) <= cap
    assert sum(1 for a in tracked.alive if a) > len(expected) // 2  # the check above was not vacuous


def test_engine_that_raises_or_stops_early(tp1, monkeypatch):
    tracked = Tracked()
    monkeypatch.setattr(refit_mod, "hf_tensors", tracked.wrap)

    class Raises:
        def update_weights(self, tensors):
            for i, _ in enumerate(tensors):
                if i == 4:
                    raise ValueError("engine broke")

    with pytest.raises(ValueError, match="engine broke"):
        refit(Raises(), tp1, MODELS["moe"], bucket_mb=0.05)
    assert len(tracked.refs) == N_HF["moe"]  # the rest was still gathered: other ranks do not hang

    class Stops:
        def update_weights(self, tensors):
            for _ in zip(range(3), tensors):  # takes exactly 3
                pass

    left = N_HF["moe"] - 3
    with pytest.raises(RuntimeError, match=rf"Stops\.update_weights returned after taking 3 tensors; {left} more"):
        refit(Stops(), tp1, MODELS["moe"], bucket_mb=1)


def test_unknown_parameter_is_named(tp1):
    tp1.decoder.layers[0].self_attention.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    name = r"'decoder\.layers\.0\.self_attention\.extra_scale'"
    with pytest.raises(WeightError, match=rf"{name} \(parameter {name}\) has no row in hf_adapter\.KEY_MAP"):
        hf_tensors(tp1, MODELS["moe"])  # raised at the call, before any tensor


def test_args_that_do_not_describe_the_model(tp1):
    with pytest.raises(WeightError, match=r"no rank holds 1 tensors of ernie45_tiny_moe: \['output_layer\.weight'\]"):
        hf_tensors(tp1, MODELS["moe"].replace(tie_word_embeddings=False))
    with pytest.raises(WeightError, match=r"'decoder\.layers\.0\.self_attention\.linear_qkv\.weight': this rank holds "
                                          r"shape \(128, 64\), ernie45_tiny_moe implies \(192, 64\)"):
        hf_tensors(tp1, MODELS["moe"].replace(num_key_value_heads=4))


def test_scalar_head_model_is_refused(world1):
    from megatron_ernie.models.ernie.model import build_model
    from megatron_ernie.runtime import initialize

    args = MODELS["moe"]
    initialize(ParallelLayout(), args, seed=1)
    model = build_model(args, head="scalar")
    with pytest.raises(WeightError, match=r"'reward_head\.weight': a scalar-head \(reward / value\) model has no "
                                          r"Hugging Face counterpart"):
        refit(CopyEngine({}), model, args)


def test_dst_must_be_a_rank(tp1):
    with pytest.raises(ValueError, match=r"dst=3: expected 'all' or a global rank in \[0, 1\)"):
        hf_tensors(tp1, MODELS["moe"], dst=3)
