"""The in-process Megatron rollout engine against transformers on the same random weights.

Layouts TP=2, EP=2 (each DP rank its own prompts) and PP=2 run in gloo worlds; TP=1 and the
single-process behaviours (sampling, stops, bad input, weights, sleep) run in this process.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_ernie.errors import EngineInputError, WeightError
from megatron_ernie.rl.engine import FINISH_LENGTH, FINISH_STOP, EngineNotReadyError, SamplingParams
from megatron_ernie.runtime import ParallelLayout
from tests.helpers import one_thread  # noqa: F401 - the fixture
from tests.helpers import ENGINE_MOE, hf_model, spawn

ARGS = ENGINE_MOE
EOS = ARGS.eos_token_id
NEW = 10
_g = torch.Generator().manual_seed(2024)
PROMPTS = [torch.randint(3, ARGS.vocab_size, (n,), generator=_g).tolist() for n in (7, 3, 12, 5)]
LAYOUTS = {  # name: (layout, world size)
    "tp2": (ParallelLayout(tp=2, sequence_parallel=True), 2),
    "ep2": (ParallelLayout(ep=2), 2),
    "pp2": (ParallelLayout(pp=2), 2),
}
GREEDY = SamplingParams(max_new_tokens=NEW, return_routed_experts=True)
MOE_LAYERS = sum(ARGS.moe_layer_pattern())


def _decisive_reference(seed: int = 3):
    """At the default init (std 0.02) a tiny tied-embedding model repeats its last token; std 0.2
    on the matrices gives varied greedy text and a spread sampling distribution."""
    model = hf_model(ARGS, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model




@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("engine_hf")
    _decisive_reference().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(hf_dir):
    return type(hf_model(ARGS)).from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def expected(reference):
    """transformers' greedy completion of each prompt alone."""
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        with torch.no_grad():
            seq = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                     eos_token_id=EOS, pad_token_id=ARGS.pad_token_id)
        out.append(seq[0, len(p):].tolist())
    return out


def _reference_logprobs(reference, prompt, tokens) -> torch.Tensor:
    """log p(token) under a plain fp32 forward over prompt + completion."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(reference(ids).logits.float(), dim=-1)[0]
    return logp[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def _training_forward_routing(hf_dir, sequences) -> list[torch.Tensor]:
    """Experts selected in a plain (training-style, uncached) forward of each sequence, recorded
    through Megatron's RouterReplay RECORD as a trainer would: [T, MoE layers, k]."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from megatron_ernie.models.ernie.hf_adapter import load_hf_weights
    from megatron_ernie.models.ernie.model import build_model, transformer_config

    RouterReplay.clear_global_router_replay_instances()
    model = build_model(ARGS, config=transformer_config(ARGS, moe_enable_routing_replay=True)).eval()
    load_hf_weights(model, hf_dir, ARGS)
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    out = []
    try:
        for seq in sequences:
            with torch.no_grad():
                model(torch.tensor([seq]), torch.arange(len(seq))[None], None)
            out.append(torch.stack(RouterReplay.get_recorded_data(), dim=1))
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_router_replay_instances()
    return out


# --- multi-process layouts ------------------------------------------------------------------
def _layout_worker(rank: int, world: int, names: list[str], hf_dir: Path, out: Path) -> None:
    for name in names:
        torch.save(_run_layout(name, hf_dir), out / f"{name}.rank{rank}.pt")


def _run_layout(name: str, hf_dir: Path) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_ernie.rl.megatron_engine import MegatronEngine
    from megatron_ernie.runtime import initialize

    layout = LAYOUTS[name][0]
    initialize(layout, ARGS, seed=1234)
    engine = MegatronEngine.from_hf(hf_dir, layout)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = list(range(dp_rank, len(PROMPTS), dp))  # EP: each DP rank its own prompts
    outs = engine.generate([PROMPTS[i] for i in share], GREEDY)
    result = {"share": share, "outs": [(o.token_ids, o.logprobs, o.finish_reason, o.routed_experts) for o in outs]}
    if name == "ep2":
        # a DP rank without requests still runs the forwards the alltoall needs
        idle = engine.generate([PROMPTS[i] for i in share] if dp_rank == 0 else [], GREEDY)
        result["idle"] = [o.token_ids for o in idle]
        # an error on one rank fails generate on every rank, before any forward
        try:
            engine.generate([[]] if dp_rank == 1 else [PROMPTS[0]], GREEDY)
        except EngineInputError as e:
            result["error"] = str(e)
        result["after_error"] = [o.token_ids for o in engine.generate([PROMPTS[share[0]]], GREEDY)]
    return result


@pytest.fixture(scope="module")
def layouts(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_layouts")
    assert {world for _, world in LAYOUTS.values()} == {2}
    spawn(_layout_worker, 2, list(LAYOUTS), hf_dir, out)  # one world, re-initialised per layout
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(world)]
            for name, (_, world) in LAYOUTS.items()}


# --- the in-process engine ------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(world1, hf_dir):
    from megatron_ernie.rl.megatron_engine import MegatronEngine
    from megatron_ernie.runtime import initialize

    initialize(ParallelLayout(), ARGS, environ={"RANK": "0", "WORLD_SIZE": "1"})  # re-inits MP state only
    return MegatronEngine.from_hf(hf_dir)


@pytest.fixture(scope="module")
def tp1(engine):
    """TP=1 results in the same form as the layout workers'."""
    outs = engine.generate(PROMPTS, GREEDY)
    return [{"share": list(range(len(PROMPTS))),
             "outs": [(o.token_ids, o.logprobs, o.finish_reason, o.routed_experts) for o in outs]}]


@pytest.fixture(scope="module")
def megatron_path(engine, hf_dir):
    """The same model on Megatron-Core's inference path (the lean forward off)."""
    from megatron_ernie.rl.megatron_engine import MegatronEngine

    return MegatronEngine.from_hf(hf_dir, lean=False)


@pytest.fixture(scope="module")
def tp1_megatron(megatron_path):
    outs = megatron_path.generate(PROMPTS, GREEDY)
    return [{"share": list(range(len(PROMPTS))),
             "outs": [(o.token_ids, o.logprobs, o.finish_reason, o.routed_experts) for o in outs]}]


def _results(name, request):
    """One layout's per-rank results: tp1 (the lean forward), tp1-megatron, or a spawned layout."""
    if name.startswith("tp1"):
        return request.getfixturevalue(name.replace("-", "_"))
    return request.getfixturevalue("layouts")[name]


@contextlib.contextmanager
def _engine_settings(engine, **settings):
    saved = {k: getattr(engine, k) for k in settings}
    for k, v in settings.items():
        setattr(engine, k, v)
    try:
        yield engine
    finally:
        for k, v in saved.items():
            setattr(engine, k, v)


@pytest.mark.parametrize("name", ["tp1", "tp1-megatron", *LAYOUTS])
def test_greedy_tokens_and_logprobs_match_transformers(name, request, expected, reference):
    ranks = _results(name, request)
    assert sorted({i for r in ranks for i in r["share"]}) == list(range(len(PROMPTS)))
    for rank in ranks:
        for i, (tokens, logprobs, finish, _) in zip(rank["share"], rank["outs"]):
            assert tokens == expected[i], f"prompt {i}"
            assert finish == (FINISH_STOP if tokens[-1] == EOS else FINISH_LENGTH)
            diff = (torch.tensor(logprobs) - _reference_logprobs(reference, PROMPTS[i], tokens)).abs().max().item()
            assert diff <= 1e-5, f"prompt {i}: log-probs differ by {diff:.3g}"
    if name in ("tp2", "pp2"):  # the ranks of one model-parallel group return the same completions
        assert [o[:3] for o in ranks[0]["outs"]] == [o[:3] for o in ranks[1]["outs"]]


def test_lean_forward_equals_megatrons_path(engine, megatron_path, monkeypatch):
    """The lean forward (one CPU rank) against Megatron-Core's inference path on the same
    weights: greedy and seeded sampled tokens identical, log-probs equal to rounding (the
    summation order differs), routed experts identical; both of its expert paths run."""
    from megatron_ernie.rl import lean_forward

    assert engine._lean is not None and megatron_path._lean is None
    used = {"every": 0, "grouped": 0}
    every, grouped = lean_forward.LeanForward._every_expert, type(engine._lean.layers[1].mlp.experts)._grouped

    def count(key, fn):
        def wrapped(*a, **k):
            used[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(lean_forward.LeanForward, "_every_expert", count("every", every))
    monkeypatch.setattr(type(engine._lean.layers[1].mlp.experts), "_grouped", count("grouped", grouped))
    prompts = PROMPTS * 3  # 12 rows: the prefill takes the grouped experts, decode steps every expert
    params = [GREEDY] * len(PROMPTS) + [SamplingParams(max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=7 + i,
                                                       return_routed_experts=True) for i in range(8)]
    lean, meg = engine.generate(prompts, params), megatron_path.generate(prompts, params)
    assert used["every"] > 0 and used["grouped"] > 0
    worst = 0.0
    for i, (a, b) in enumerate(zip(lean, meg)):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason, f"row {i}"
        assert torch.equal(a.routed_experts, b.routed_experts), f"row {i}"
        worst = max(worst, max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)))
    assert worst <= 1e-5, f"log-probs differ by {worst:.3g}"


def test_reference_completions_are_varied(expected):
    """Guards the comparisons: the random model does not just repeat one token."""
    assert all(len(set(t)) >= NEW // 2 for t in expected)


@pytest.mark.parametrize("name", ["tp1", "tp1-megatron", *LAYOUTS])
def test_routed_experts_equal_a_training_forwards_routing(name, request, hf_dir):
    ranks = _results(name, request)
    for rank in ranks:
        rows = list(zip(rank["share"], rank["outs"]))
        seqs = [PROMPTS[i] + tokens[:-1] for i, (tokens, *_) in rows]
        for seq, (i, (tokens, _, _, routed)), want in zip(seqs, rows, _training_forward_routing(hf_dir, seqs)):
            assert routed.dtype == torch.int32
            assert tuple(routed.shape) == (len(PROMPTS[i]) + len(tokens) - 1, MOE_LAYERS, ARGS.moe_k)
            assert torch.equal(routed, want.to(torch.int32)), f"prompt {i}"


def test_ep_idle_rank_and_errors_agree_across_ranks(layouts):
    r0, r1 = layouts["ep2"]
    assert r0["share"] == [0, 2] and r1["share"] == [1, 3]
    assert r0["idle"] == [o[0] for o in r0["outs"]] and r1["idle"] == []
    assert r1["error"] == "prompt 0 is empty"
    assert r0["error"] == "generate refused: rank 1 could not serve its requests (see its error)"
    assert r0["after_error"] == [r0["outs"][0][0]] and r1["after_error"] == [r1["outs"][0][0]]


# --- batching, sampling, stopping -----------------------------------------------------------
def test_ragged_batch_gives_each_prompt_its_alone_result(engine, tp1):
    batch = tp1[0]["outs"]
    for i, prompt in enumerate(PROMPTS):
        (alone,) = engine.generate([prompt], GREEDY)
        assert alone.token_ids == batch[i][0]
        # fp32 GEMMs over another number of rows round differently: equal to a few ulps
        assert max(abs(a - b) for a, b in zip(alone.logprobs, batch[i][1])) <= 1e-5
        assert torch.equal(alone.routed_experts, batch[i][3])
    reordered = engine.generate([PROMPTS[2], PROMPTS[0]], GREEDY)
    assert [o.token_ids for o in reordered] == [batch[2][0], batch[0][0]]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=100 + i)
              for i in range(len(PROMPTS))]
    first = [o.token_ids for o in engine.generate(PROMPTS, params)]
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == first
    (alone,) = engine.generate([PROMPTS[2]], [params[2]])  # same seed, other batch
    assert alone.token_ids == first[2]
    other = [o.token_ids for o in engine.generate(PROMPTS, [replace(p, seed=p.seed + 50) for p in params])]
    assert all(a != b for a, b in zip(first, other))
    # one SamplingParams with a seed: request i gets seed + i
    shared = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=100))
    assert [o.token_ids for o in shared] == first


def test_top_k_1_is_greedy_and_logprobs_are_the_raw_distribution(engine, tp1, reference):
    greedy = [o[0] for o in tp1[0]["outs"]]
    top1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, temperature=1.0, top_k=1, seed=5))
    assert [o.token_ids for o in top1] == greedy
    hot = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, temperature=0.7, top_p=0.8, seed=9))
    for prompt, out in zip(PROMPTS, hot):  # log p under the model, not under the tempered/filtered one
        want = _reference_logprobs(reference, prompt, out.token_ids)
        assert (torch.tensor(out.logprobs) - want).abs().max().item() <= 1e-5


def test_sampling_filters():
    from megatron_ernie.rl.megatron_engine import sample_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(400)]
    top_p = sample_tokens(logits, [SamplingParams(temperature=1.0, top_p=0.7)] * 400, gens)
    assert set(top_p.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    top_k = sample_tokens(logits, [SamplingParams(temperature=1.0, top_k=3)] * 400, gens)
    assert set(top_k.tolist()) == {0, 1, 2}
    free = sample_tokens(logits, [SamplingParams(temperature=1.0)] * 400, gens)
    assert set(free.tolist()) == {0, 1, 2, 3}
    assert 0.4 < (free == 0).float().mean().item() < 0.6


def test_stop_tokens_eos_and_max_new_tokens(engine, tp1):
    greedy = tp1[0]["outs"][0][0]
    j = next(j for j in range(2, NEW) if greedy[j] not in greedy[:j])
    stop = greedy[j]
    forwards = engine.stats.forwards
    (out,) = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=50, stop_token_ids=(stop,)))
    assert out.token_ids == greedy[: j + 1] and out.finish_reason == FINISH_STOP
    assert engine.stats.forwards - forwards == j + 1  # early exit: no forward after the stop
    forwards = engine.stats.forwards
    both = engine.generate([PROMPTS[0], PROMPTS[1]], [SamplingParams(max_new_tokens=50, stop_token_ids=(stop,)),
                                                       SamplingParams(max_new_tokens=6)])
    assert [o.finish_reason for o in both] == [FINISH_STOP, FINISH_LENGTH]
    assert len(both[1].token_ids) == 6 and engine.stats.forwards - forwards == max(j + 1, 6)
    with _engine_settings(engine, eos_token_ids=frozenset({stop})):  # the engine's EOS ids stop too
        (eos,) = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=50))
    assert eos.token_ids == greedy[: j + 1] and eos.finish_reason == FINISH_STOP
    (short,) = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4))
    assert short.token_ids == greedy[:4] and short.finish_reason == FINISH_LENGTH


def test_context_full_stops_with_length(engine, tp1):
    greedy = tp1[0]["outs"][0][0]
    with _engine_settings(engine, max_model_len=len(PROMPTS[0]) + 3):
        (out,) = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=50))
    assert out.token_ids == greedy[:3] and out.finish_reason == FINISH_LENGTH


# --- bad input --------------------------------------------------------------------------------
def test_overlong_prompts_refused_or_truncated(engine):
    long = PROMPTS[2]  # 12 tokens
    refused = engine.stats.refused_prompts
    with _engine_settings(engine, max_model_len=10):
        with pytest.raises(EngineInputError, match=r"prompt 0 has 12 tokens; the engine's context is 10"):
            engine.generate([long], SamplingParams(max_new_tokens=4))
        assert engine.stats.refused_prompts == refused + 1
        truncated = engine.stats.truncated_prompts
        with _engine_settings(engine, overlong="truncate"):
            (out,) = engine.generate([long], SamplingParams(max_new_tokens=4))
        assert engine.stats.truncated_prompts == truncated + 1
        assert out.prompt_truncated and out.prompt_ids == long[-9:]
        assert len(out.token_ids) == 1 and out.finish_reason == FINISH_LENGTH  # 9 + 1 fill the context
        (direct,) = engine.generate([long[-9:]], SamplingParams(max_new_tokens=4))
        assert direct.token_ids == out.token_ids and not direct.prompt_truncated


def test_bad_requests_are_named(engine):
    with pytest.raises(EngineInputError, match="prompt 1 is empty"):
        engine.generate([PROMPTS[0], []], GREEDY)
    with pytest.raises(EngineInputError, match=r"prompt 0, position 2: token id 512 outside the vocabulary \[0, 512\)"):
        engine.generate([[5, 6, 512]], GREEDY)
    with pytest.raises(EngineInputError, match="token id -1 outside"):
        engine.generate([[-1]], GREEDY)
    with pytest.raises(EngineInputError, match="2 sampling params for 1 prompts"):
        engine.generate([PROMPTS[0]], [GREEDY, GREEDY])
    assert engine.generate([], GREEDY) == []


# --- weights, sleep -------------------------------------------------------------------------
def _stream(hf_dir):
    from megatron_ernie.conversion.safetensors_io import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(hf_dir)
    return [(name, ckpt.get(name)) for name in ckpt.keys()]


def test_update_weights_from_a_stream_equals_loading_the_directory(engine, hf_dir):
    from megatron_ernie.rl.megatron_engine import MegatronEngine

    fresh = MegatronEngine(ARGS)
    with pytest.raises(EngineNotReadyError, match="no weights loaded"):
        fresh.generate([PROMPTS[0]], GREEDY)
    fresh.update_weights(iter(_stream(hf_dir)[::-1]))  # any order
    assert fresh.stats.refits == 1
    a, b = engine.generate(PROMPTS, GREEDY), fresh.generate(PROMPTS, GREEDY)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.logprobs == y.logprobs
        assert torch.equal(x.routed_experts, y.routed_experts)
    # transformers' in-memory names (fused experts) are accepted too
    fresh.update_weights(_decisive_reference().state_dict().items())
    assert [o.token_ids for o in fresh.generate(PROMPTS, GREEDY)] == [o.token_ids for o in a]


def test_failed_updates_are_named_and_refuse_generate(world1, hf_dir):
    from megatron_ernie.rl.megatron_engine import MegatronEngine

    engine = MegatronEngine(ARGS)
    stream = _stream(hf_dir)
    drop = {"model.norm.weight", "model.layers.2.mlp.experts.3.down_proj.weight"}
    with pytest.raises(WeightError, match=r"update_weights: 2 tensors are missing: "
                                          r"\['model.layers.2.mlp.experts.3.down_proj.weight', 'model.norm.weight'\]"):
        engine.update_weights((n, t) for n, t in stream if n not in drop)
    with pytest.raises(EngineNotReadyError, match="the last weight update failed, weights are inconsistent"):
        engine.generate([PROMPTS[0]], GREEDY)
    bad = [(n, torch.zeros(3, 3) if n.endswith("layers.0.self_attn.o_proj.weight") else t) for n, t in stream]
    with pytest.raises(WeightError, match=r"'model.layers.0.self_attn.o_proj.weight' for 'decoder.layers.0."
                                          r"self_attention.linear_proj.weight': source shape \(3, 3\) "
                                          r"does not match \(64, 256\)"):
        engine.update_weights(bad)
    with pytest.raises(WeightError, match=r"tensors not part of engine_tiny_moe: \['model.layers.0.mlp.extra'\]"):
        engine.update_weights([*stream[:3], ("model.layers.0.mlp.extra", torch.zeros(1)), *stream[3:]])
    with pytest.raises(WeightError, match="tensor 'model.norm.weight' was given twice"):
        engine.update_weights([*stream, next(x for x in stream if x[0] == "model.norm.weight")])
    with pytest.raises(EngineNotReadyError, match="weights are inconsistent"):
        engine.generate([PROMPTS[0]], GREEDY)
    assert engine.stats.refits == 0
    engine.update_weights(stream)
    assert engine.stats.refits == 1 and len(engine.generate([PROMPTS[0]], GREEDY)[0].token_ids) > 0


def test_sleep_frees_memory_and_wake_requires_a_refit(world1, hf_dir):
    from megatron_ernie.models.ernie.hf_adapter import local_tensors
    from megatron_ernie.rl.megatron_engine import MegatronEngine

    engine = MegatronEngine.from_hf(hf_dir)
    before = engine.generate(PROMPTS, GREEDY)
    weight_bytes = sum(t.untyped_storage().nbytes() for _, t in local_tensors(engine.model))
    assert engine._lean is not None  # one CPU rank: the lean forward and its own cache
    assert weight_bytes > 0 and engine._lean.cache is not None
    engine.sleep()
    assert engine.asleep and engine._lean.cache is None
    assert sum(t.untyped_storage().nbytes() for _, t in local_tensors(engine.model)) == 0
    with pytest.raises(EngineNotReadyError, match="generate refused: the engine is asleep"):
        engine.generate([PROMPTS[0]], GREEDY)
    with pytest.raises(EngineNotReadyError, match="asleep; call wake"):
        engine.update_weights(_stream(hf_dir))
    engine.wake()
    assert sum(t.untyped_storage().nbytes() for _, t in local_tensors(engine.model)) == weight_bytes
    with pytest.raises(EngineNotReadyError, match="woken from sleep: the weights need an update_weights"):
        engine.generate([PROMPTS[0]], GREEDY)
    engine.update_weights(_stream(hf_dir))
    after = engine.generate(PROMPTS, GREEDY)
    assert [(o.token_ids, o.logprobs) for o in after] == [(o.token_ids, o.logprobs) for o in before]
    assert engine.stats.refits == 2
