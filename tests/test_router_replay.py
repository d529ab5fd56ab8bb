"""Router replay where it matters: near-tied routing (issue 11).

Two experts of every MoE layer (PAIR) get the same gate row, so their routing scores tie exactly
for every token and the correction bias alone orders them; the rollout engine's bias gives them
no margin at all (`engine`, for the "weights" arm) or prefers the first by DELTA (the "bias"
arm). The trainer then holds a tiny perturbation of the engine's weights, of the size of the noise
that other kernels, layouts, precisions or reduction orders put into router inputs:

- "bias":    its correction bias prefers the second expert of PAIR by DELTA (a 2·DELTA move of one
             bias entry per layer; the bias only selects, so nothing else changes);
- "weights": every weight multiplied by (1 + REL_NOISE · N(0, 1)) (a seeded draw), which also
             breaks the exact tie between the pair's gate rows.

With the rollout engine (in-process MegatronEngine, KV cache, a batch of prompts) recording its
routing and the trainer running a plain forward over each prompt + completion:

(a) without replay, the trainer's own selection (recorded through `record_routing`, as the loop's
    mismatch measurement does) differs from the rollout's on some tokens — first where the pair
    trades places — and its log-probs move by far more than any tolerance;
(b) with the rollout's routing replayed (`replay_routing`), the experts each router hands to the
    dispatcher (its routing map) are the rollout's on 100 % of tokens and the log-probs equal the
    rollout's up to the perturbation alone.

The same in the loop's measurement (`rl.logprobs.recompute`, the mismatch metrics every RL step
logs) at TP=1 in this process, and at TP=2 with sequence parallelism (engine and trainer both
TP=2, each TP rank replaying its sequence shard) in a 2-rank gloo world.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_ernie.models.ernie.router import ernie_routers
from megatron_ernie.rl.engine import SamplingParams
from megatron_ernie.rl.replay import record_routing, replay_routing
from megatron_ernie.runtime import ParallelLayout
from tests.helpers import ENGINE_MOE as ARGS
from tests.helpers import one_thread  # noqa: F401 - the fixture
from tests.helpers import spawn
from tests.test_megatron_engine import _decisive_reference

PAIR = (0, 1)  # experts given the same gate row in every MoE layer
DELTA = 1e-6  # the "bias" arm's margin between them (the engine prefers PAIR[0], the trainer PAIR[1])
REL_NOISE = 1e-6  # the "weights" arm's relative perturbation of every trainer weight
ARMS = ("bias", "weights")
NEW = 12
SEQ = 32  # >= the longest prompt + NEW; a multiple of TP
_g = torch.Generator().manual_seed(5)
PROMPTS = [torch.randint(3, ARGS.vocab_size, (n,), generator=_g).tolist() for n in (9, 4, 14, 6, 11)]
MOE_LAYERS = [i for i in range(ARGS.num_layers) if ARGS.is_moe_layer(i)]
# With replay, the trainer's log-probs differ from the engine's by the engine-vs-trainer fp32
# noise (KV cache, batch; measured ~4e-6 on the "bias" arm, where the weights that compute are
# identical) plus what the perturbation itself does (measured ~4e-5 on the "weights" arm).
REPLAYED_TOL = {"bias": 2e-5, "weights": 1e-4}
MOVED = 1e-3  # without replay: a flipped expert moves some log-prob by more than this (measured > 1)


def _near_tied(margin: float) -> torch.nn.Module:
    """The decisive test model with PAIR tied in every router; bias[PAIR[1]] = bias[PAIR[0]] + margin."""
    model = _decisive_reference()
    a, b = PAIR
    with torch.no_grad():
        for i in MOE_LAYERS:
            gate = model.model.layers[i].mlp.gate
            gate.weight[b] = gate.weight[a]
            bias = gate.moe_statics.e_score_correction_bias
            bias[0, b] = bias[0, a] + margin
    return model


def _perturbed(model: torch.nn.Module, rel: float, seed: int = 11) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.mul_(1 + rel * torch.randn(p.shape, generator=g))
    return model


def _models(arm: str) -> dict[str, torch.nn.Module]:
    if arm == "bias":
        return {"engine": _near_tied(-DELTA), "trainer": _near_tied(DELTA)}
    return {"engine": _near_tied(0.0), "trainer": _perturbed(_near_tied(0.0), REL_NOISE)}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("near_tie")
    out = {}
    for arm in ARMS:
        out[arm] = {}
        for side, model in _models(arm).items():
            model.save_pretrained(root / arm / side)
            out[arm][side] = root / arm / side
    return out


@pytest.fixture(scope="module")
def tp1(world1):
    from megatron_ernie.runtime import initialize

    initialize(ParallelLayout(), ARGS, environ={"RANK": "0", "WORLD_SIZE": "1"})  # re-inits MP state only


@pytest.fixture(scope="module")
def rollouts(tp1, dirs):
    from megatron_ernie.rl.megatron_engine import MegatronEngine

    params = SamplingParams(max_new_tokens=NEW, return_routed_experts=True)
    return {arm: MegatronEngine.from_hf(dirs[arm]["engine"]).generate(PROMPTS, params) for arm in ARMS}


@pytest.fixture(scope="module")
def trainers(tp1, dirs):
    from megatron_ernie.models.ernie.hf_adapter import load_hf_weights
    from megatron_ernie.models.ernie.model import build_model

    out = {}
    for arm in ARMS:
        out[arm] = build_model(ARGS).eval()
        load_hf_weights(out[arm], dirs[arm]["trainer"], ARGS)
    return out


def _trainer_pass(model, completion, replay: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain forward over prompt + completion[:-1], replaying the rollout's routing or not:
    (log-probs of the completion's tokens, selected experts [T, MoE layers, k]).

    Without replay the experts are the routers' own selection, recorded through RouterReplay
    (`record_routing`); with replay, the routing map each router hands to the dispatcher."""
    ids = completion.prompt_ids + completion.token_ids
    tokens, labels = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    inputs = (tokens, torch.arange(tokens.shape[1])[None], None)
    maps = []  # each router's routing map [T, E] as it leaves the router: what the experts get
    hooks = [r.register_forward_hook(lambda _m, _i, out: maps.append(out[1])) for r in ernie_routers([model])]
    recorded: dict[int, torch.Tensor] = {}
    try:
        with torch.no_grad():
            if replay:
                with replay_routing(model, completion.routed_experts[None].long()):
                    loss = model(*inputs, labels=labels)
            else:
                with record_routing(model, recorded):
                    loss = model(*inputs, labels=labels)
    finally:
        for h in hooks:
            h.remove()
    from_maps = torch.stack([m.nonzero()[:, 1].view(m.shape[0], ARGS.moe_k) for m in maps], dim=1)
    if replay:
        experts = from_maps
    else:
        experts = torch.stack([recorded[i] for i in MOE_LAYERS], dim=1)
        assert torch.equal(_as_sets(experts), from_maps)  # the record is what the dispatcher got
    return -loss[0, len(completion.prompt_ids) - 1:].float(), experts


def _as_sets(experts: torch.Tensor) -> torch.Tensor:
    return experts.long().sort(dim=-1).values  # the order within top-k carries no meaning


def test_the_setup_is_a_near_tie(dirs):
    from safetensors.torch import load_file

    for arm in ARMS:
        engine, trainer = (load_file(str(dirs[arm][side] / "model.safetensors")) for side in ("engine", "trainer"))
        for i in MOE_LAYERS:
            gate = engine[f"model.layers.{i}.mlp.gate.weight"]
            assert torch.equal(gate[PAIR[0]], gate[PAIR[1]])  # the pair's scores tie exactly in the engine
        differ = {k for k in engine if not torch.equal(engine[k], trainer[k])}
        biases = {f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias" for i in MOE_LAYERS}
        if arm == "bias":
            assert differ == biases
            for k in biases:
                assert (trainer[k] - engine[k]).abs().max().item() == pytest.approx(2 * DELTA, rel=1e-2)
        else:  # every weight moved (the correction bias too), by a relative 1e-6 or so
            assert differ == set(engine)
            worst = max(((trainer[k] - engine[k]).abs() / engine[k].abs().clamp_min(1e-30)).max().item()
                        for k in differ)
            assert worst < 10 * REL_NOISE


@pytest.mark.parametrize("arm", ARMS)
def test_without_replay_the_routing_differs_and_log_probs_move(arm, rollouts, trainers):
    differing = tokens = 0
    worst = 0.0
    for c in rollouts[arm]:
        logprobs, experts = _trainer_pass(trainers[arm], c, replay=False)
        grid = (_as_sets(experts) != _as_sets(c.routed_experts)).any(-1)  # [T, MoE layers]
        differing += int(grid.any(-1).sum())
        tokens += grid.shape[0]
        if grid.any():  # the first divergence (all earlier tokens and layers agree) is the pair trading
            t, layer = grid.nonzero()[0].tolist()  # places; after it the hidden states differ and anything goes
            mine, theirs = set(experts[t, layer].tolist()), set(c.routed_experts[t, layer].tolist())
            assert mine ^ theirs == set(PAIR), f"token {t}, MoE layer {layer}: {mine} vs {theirs}"
        worst = max(worst, (logprobs - torch.tensor(c.logprobs)).abs().max().item())
    print(f"{arm}: without replay the trainer's experts differ on {differing}/{tokens} tokens; "
          f"max |delta log p| {worst:.3g}")
    assert differing > 0, "no token's routing differed: the test shows nothing"
    assert worst > MOVED, f"routing differed on {differing} tokens but log-probs moved only {worst:.2g}"


@pytest.mark.parametrize("arm", ARMS)
def test_with_replay_routing_agrees_on_every_token_and_log_probs_match(arm, rollouts, trainers):
    worst = 0.0
    for c in rollouts[arm]:
        logprobs, experts = _trainer_pass(trainers[arm], c, replay=True)
        assert experts.shape == c.routed_experts.shape
        assert torch.equal(_as_sets(experts), _as_sets(c.routed_experts))  # 100 % of tokens, every layer
        worst = max(worst, (logprobs - torch.tensor(c.logprobs)).abs().max().item())
    print(f"{arm}: with replay max |delta log p| {worst:.3g}")
    assert worst < REPLAYED_TOL[arm], f"replayed log-probs differ by {worst:.3g}"


# --- the loop's measurement: recompute() and its mismatch metrics ------------------------------
def _experiences(completions):
    from megatron_ernie.rl.rollout import Experience

    return [Experience(c.prompt_ids, c.token_ids, c.logprobs, c.finish_reason, group=i, sample=0,
                       domain="general", routed_experts=c.routed_experts) for i, c in enumerate(completions)]


def _recompute(model, completions, replay: bool) -> dict[str, float]:
    from megatron_ernie.rl.logprobs import recompute

    run = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(seq_length=SEQ)),
                          models={"policy": SimpleNamespace(chunks=[model])})
    _, metrics = recompute(run, _experiences(completions), micro_batch_size=len(completions), replay=replay)
    return metrics


def _check_loop_metrics(arm: str, measured: dict, replayed: dict) -> None:
    assert 0 < measured["rollout/expert_mismatch"] <= 1
    assert measured["rollout/logp_abs_diff"] > 1e-4 and measured["rollout/max_ratio"] > 1 + MOVED
    assert "rollout/expert_mismatch" not in replayed  # replayed: nothing to compare
    assert replayed["rollout/logp_abs_diff"] < REPLAYED_TOL[arm]
    assert replayed["rollout/max_ratio"] == pytest.approx(1.0, abs=2 * REPLAYED_TOL[arm])
    assert 0 <= replayed["rollout/k3_kl"] < REPLAYED_TOL[arm] ** 2


@pytest.mark.parametrize("arm", ARMS)
def test_the_loops_mismatch_metrics_show_it(arm, rollouts, trainers):
    measured = _recompute(trainers[arm], rollouts[arm], replay=False)
    replayed = _recompute(trainers[arm], rollouts[arm], replay=True)
    print(f"{arm}: recompute without replay {measured}; with replay {replayed}")
    _check_loop_metrics(arm, measured, replayed)


# --- TP=2 with sequence parallelism: engine and trainer sharded ---------------------------------
def _tp2_worker(rank: int, world: int, dirs: dict, out: Path) -> None:
    from megatron_ernie.models.ernie.hf_adapter import load_hf_weights
    from megatron_ernie.models.ernie.model import build_model
    from megatron_ernie.rl.megatron_engine import MegatronEngine
    from megatron_ernie.runtime import initialize

    layout = ParallelLayout(tp=2, sequence_parallel=True)
    initialize(layout, ARGS, seed=1234)
    params = SamplingParams(max_new_tokens=NEW, return_routed_experts=True)
    result = {}
    for arm in ARMS:
        completions = MegatronEngine.from_hf(dirs[arm]["engine"], layout).generate(PROMPTS, params)
        trainer = build_model(ARGS, layout).eval()
        load_hf_weights(trainer, dirs[arm]["trainer"], ARGS)
        result[arm] = {"measured": _recompute(trainer, completions, replay=False),
                       "replayed": _recompute(trainer, completions, replay=True)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def test_tp2_sequence_parallel_replay_agrees_and_the_mismatch_is_measured(dirs, tmp_path):
    spawn(_tp2_worker, 2, dirs, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # the metrics are reduced over the world: identical everywhere
    for arm in ARMS:
        print(f"TP2 {arm}: {ranks[0][arm]}")
        _check_loop_metrics(arm, ranks[0][arm]["measured"], ranks[0][arm]["replayed"])
