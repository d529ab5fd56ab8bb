"""Router replay where it matters: near-tied routing (issue 11, section 4).

Two experts of every MoE layer get the same gate row, so their routing scores tie exactly for
every token; the correction bias alone decides between them. The rollout engine's bias prefers
the lower one by DELTA, the trainer's prefers the higher one by DELTA: a difference far below
any log-prob tolerance, of the size of the noise that different kernels, layouts or reduction
orders put into router logits. The bias only selects experts (the weights are the unbiased
scores), so with replay the trainer computes exactly what the engine computed.

- Without replay the trainer's routing differs from the rollout's on the tokens where the pair
  straddles the top-k boundary, and its log-probs move visibly.
- With the rollout's routing replayed, the trainer's selected experts are the rollout's for
  100 % of tokens and its log-probs equal the rollout's within fp32 rounding.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_ernie.rl.engine import SamplingParams
from megatron_ernie.models.ernie.router import ernie_routers
from megatron_ernie.rl.replay import replay_routing
from tests.helpers import ENGINE_MOE as ARGS
from tests.helpers import one_thread  # noqa: F401 - the fixture
from tests.test_megatron_engine import _decisive_reference

PAIR = (0, 1)  # experts given the same gate row in every MoE layer
DELTA = 1e-6  # the bias margin between them (each side prefers another one)
NEW = 12
_g = torch.Generator().manual_seed(5)
PROMPTS = [torch.randint(3, ARGS.vocab_size, (n,), generator=_g).tolist() for n in (9, 4, 14, 6, 11)]
MOE_LAYERS = [i for i in range(ARGS.num_layers) if ARGS.is_moe_layer(i)]
LOGPROB_TOL = 1e-5  # engine (KV cache, batch of 5) vs trainer (one uncached sequence), fp32


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


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("near_tie")
    out = {}
    for name, margin in (("engine", -DELTA), ("trainer", DELTA)):
        _near_tied(margin).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def rollout(world1, dirs):
    from megatron_ernie.rl.megatron_engine import MegatronEngine

    engine = MegatronEngine.from_hf(dirs["engine"])
    return engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, return_routed_experts=True))


@pytest.fixture(scope="module")
def trainer(world1, dirs):
    from megatron_ernie.models.ernie.hf_adapter import load_hf_weights
    from megatron_ernie.models.ernie.model import build_model

    model = build_model(ARGS).eval()
    load_hf_weights(model, dirs["trainer"], ARGS)
    return model


def _trainer_pass(model, completion, replay: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the completion's tokens, selected experts [T, MoE layers, k]) of one plain
    forward over prompt + completion[:-1], replaying the rollout's routing or not. The experts are
    read from the routers' outputs (the routing map the dispatcher uses), in either case."""
    ids = completion.prompt_ids + completion.token_ids
    tokens, labels = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    routed = completion.routed_experts[None].long() if replay else None
    maps = []  # each router's routing map [T, E] as it leaves the router: what the experts get
    hooks = [r.register_forward_hook(lambda _m, _i, out: maps.append(out[1])) for r in ernie_routers([model])]
    try:
        with torch.no_grad(), replay_routing(model, routed):
            loss = model(tokens, torch.arange(tokens.shape[1])[None], None, labels=labels)
    finally:
        for h in hooks:
            h.remove()
    logprobs = -loss[0, len(completion.prompt_ids) - 1:].float()
    experts = [m.nonzero()[:, 1].view(m.shape[0], ARGS.moe_k) for m in maps]  # ascending ids per token
    return logprobs, torch.stack(experts, dim=1)


def _as_sets(experts: torch.Tensor) -> torch.Tensor:
    return experts.sort(dim=-1).values  # the order within top-k carries no meaning


def test_the_pair_ties_exactly_and_the_bias_alone_decides(dirs):
    from safetensors.torch import load_file

    engine, trainer = (load_file(str(dirs[n] / "model.safetensors")) for n in ("engine", "trainer"))
    differ = [k for k in engine if not torch.equal(engine[k], trainer[k])]
    assert sorted(differ) == sorted(f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias"
                                    for i in MOE_LAYERS)
    for i in MOE_LAYERS:
        gate = engine[f"model.layers.{i}.mlp.gate.weight"]
        assert torch.equal(gate[PAIR[0]], gate[PAIR[1]])


def test_without_replay_the_routing_differs_and_log_probs_move(rollout, trainer):
    differing_tokens = tokens = 0
    worst = 0.0
    for c in rollout:
        logprobs, experts = _trainer_pass(trainer, c, replay=False)
        mismatch = (_as_sets(experts) != _as_sets(c.routed_experts.long())).any(-1).any(-1)  # [T]
        differing_tokens += int(mismatch.sum())
        tokens += mismatch.numel()
        grid = (_as_sets(experts) != _as_sets(c.routed_experts.long())).any(-1)  # [T, MoE layers]
        if grid.any():  # the first divergence (all earlier tokens and layers agree) is the pair trading places;
            t, layer = grid.nonzero()[0].tolist()  # after it the hidden states differ and anything goes
            mine, theirs = set(experts[t, layer].tolist()), set(c.routed_experts[t, layer].tolist())
            assert mine ^ theirs == set(PAIR), f"token {t}, MoE layer {layer}: {mine} vs {theirs}"
        worst = max(worst, (logprobs - torch.tensor(c.logprobs)).abs().max().item())
    assert differing_tokens > 0, "no token straddled the top-k boundary: the test shows nothing"
    assert differing_tokens < tokens  # near ties, not a different router
    assert worst > 1e-3, f"routing differed on {differing_tokens} tokens but log-probs moved only {worst:.2g}"


def test_with_replay_routing_agrees_on_every_token_and_log_probs_match(rollout, trainer):
    for c in rollout:
        logprobs, experts = _trainer_pass(trainer, c, replay=True)
        assert torch.equal(_as_sets(experts), _as_sets(c.routed_experts.long()))
        diff = (logprobs - torch.tensor(c.logprobs)).abs().max().item()
        assert diff <= LOGPROB_TOL, f"replayed log-probs differ by {diff:.3g}"
