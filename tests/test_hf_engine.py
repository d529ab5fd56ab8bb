"""The transformers rollout engine (rl/hf_engine.py) and the reward system's text adapter over an
engine (rewards/generation.py EngineBackend), on the tiny random ERNIE MoE."""
from __future__ import annotations

import pytest
import torch

from megatron_ernie.errors import ConfigError, EngineInputError, WeightError
from megatron_ernie.rl.engine import FINISH_LENGTH, FINISH_STOP, Completion, EngineNotReadyError, RolloutEngine, SamplingParams
from megatron_ernie.rl.hf_engine import HFEngine, left_pad
from tests.helpers import one_thread  # noqa: F401 - the fixture
from tests.helpers import ENGINE_MOE, TEST_DENSE, hf_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
SAMPLE = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)




@pytest.fixture(scope="module")
def model():
    return hf_model(ENGINE_MOE, seed=0)


@pytest.fixture()
def engine(model):
    return HFEngine(model)


def forward_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Raw log-probs of `tokens` after `prompt` from one plain (unpadded, uncached) forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def first_new_index(tokens: list[int], start: int = 2) -> int:
    """The first position >= start whose token did not occur before it (a clean stop point)."""
    return next(j for j in range(start, len(tokens)) if tokens[j] not in tokens[:j])


def test_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)
    assert (engine.eos_token_ids, engine.pad_token_id, engine.max_model_len) == ((2,), 0, 131072)
    assert (engine.moe_layers, engine.top_k) == ([1, 2, 3], 2)


def test_greedy_equals_plain_model_generate_and_single_prompts(model, engine):
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                               pad_token_id=0, eos_token_id=2)[:, ids.shape[1]:]
    assert [c.token_ids for c in out] == plain.tolist()
    assert all(c.finish_reason == FINISH_LENGTH and len(c.token_ids) == 8 for c in out)
    assert [c.prompt_ids for c in out] == PROMPTS
    singles = [engine.generate([p], SamplingParams(max_new_tokens=8))[0].token_ids for p in PROMPTS]
    assert singles == [c.token_ids for c in out]
    assert (engine.stats.requests, engine.stats.generated_tokens) == (6, 48)


def test_logprobs_equal_a_plain_forward(model, engine):
    for params in (SamplingParams(max_new_tokens=8), SAMPLE):
        for p, c in zip(PROMPTS, engine.generate(PROMPTS, params)):
            assert len(c.logprobs) == len(c.token_ids)
            ref = forward_logprobs(model, p, c.token_ids)
            # measured: <= 4.8e-7 (left padding and the KV cache against one plain forward)
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-6, rtol=0), (p, c.logprobs, ref.tolist())


def test_logprobs_are_of_the_raw_distribution_not_the_sampled_one(model, engine):
    """At temperature 2 with top-k 5 the sampled token's processed log-prob is far from its raw one;
    the engine reports the raw one."""
    params = SamplingParams(max_new_tokens=6, temperature=2.0, top_k=5, seed=3)
    [c] = engine.generate([PROMPTS[0]], params)
    raw = forward_logprobs(model, PROMPTS[0], c.token_ids)
    assert torch.allclose(torch.tensor(c.logprobs), raw, atol=1e-6, rtol=0)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + c.token_ids])).logits[0, len(PROMPTS[0]) - 1:-1].float() / 2.0
    kth = logits.topk(5, -1).values[:, -1:]
    processed = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    processed = processed.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
    assert (processed - raw).abs().min() > 1.0   # near-uniform raw (~ -6.2) vs one of 5 (~ -1.6)


def test_seeds_reproduce_whatever_the_batch_and_leave_the_global_rng(engine):
    state = torch.get_rng_state()
    a = engine.generate(PROMPTS, SAMPLE)
    assert torch.equal(torch.get_rng_state(), state)
    b = engine.generate(PROMPTS, SAMPLE)
    assert [c.token_ids for c in a] == [c.token_ids for c in b] and [c.logprobs for c in a] == [c.logprobs for c in b]
    # one SamplingParams with seed s gives request i the seed s + i
    explicit = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=10, temperature=1.0, seed=7 + i) for i in range(3)])
    assert [c.token_ids for c in explicit] == [c.token_ids for c in a]
    # request 2 alone, or after a greedy and an unseeded request: the same tokens
    alone = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=10, temperature=1.0, seed=9))[0]
    mixed = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=10, temperature=1.0),
                                      SamplingParams(max_new_tokens=10, temperature=1.0, seed=9)])[2]
    assert mixed.token_ids == alone.token_ids == a[2].token_ids
    other = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=10, temperature=1.0, seed=10))[0]
    assert other.token_ids != alone.token_ids
    assert len(set(a[0].token_ids)) > 5   # sampled at temperature 1 from a near-uniform model: varied


def test_stop_tokens_eos_and_lengths(model, engine):
    full = engine.generate([PROMPTS[0]], SAMPLE)[0].token_ids
    j = first_new_index(full)
    stopped = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=1.0, seed=7,
                                                           stop_token_ids=(full[j],)))[0]
    assert stopped.token_ids == full[:j + 1] and stopped.finish_reason == FINISH_STOP
    assert len(stopped.logprobs) == j + 1
    # the engine's EOS ids stop the same way
    eos_engine = HFEngine(model, eos_token_ids=[full[j]])
    assert eos_engine.generate([PROMPTS[0]], SAMPLE)[0].token_ids == full[:j + 1]
    # max_new_tokens per row inside one batch, and the context: max_model_len 12 leaves a 7-token
    # prompt 5 new tokens, a 2-token one 10
    short = HFEngine(model, max_model_len=12)
    out = short.generate(PROMPTS[:2], [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=3)])
    assert [len(c.token_ids) for c in out] == [5, 3] and {c.finish_reason for c in out} == {FINISH_LENGTH}
    wide = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=10))
    assert out[0].token_ids == wide[0].token_ids[:5] and out[1].token_ids == wide[1].token_ids[:3]


def test_overlong_prompts_refused_or_truncated_and_counted(model):
    long = list(range(3, 20))   # 17 tokens; a context of 12 has room for 11
    refusing = HFEngine(model, max_model_len=12)
    with pytest.raises(EngineInputError, match="prompt 1 has 17 tokens; the engine's context is 12"):
        refusing.generate([PROMPTS[1], long], SamplingParams(max_new_tokens=4))
    assert refusing.stats.refused_prompts == 1 and refusing.stats.requests == 0
    truncating = HFEngine(model, max_model_len=12, overlong="truncate")
    [c] = truncating.generate([long], SamplingParams(max_new_tokens=4))
    assert c.prompt_ids == long[-11:] and c.prompt_truncated and len(c.token_ids) == 1
    assert c.token_ids == truncating.generate([long[-11:]], SamplingParams(max_new_tokens=1))[0].token_ids
    assert truncating.stats.truncated_prompts == 1


@pytest.mark.parametrize("prompts, message", [
    ([[5, 6], []], "prompt 1 is empty"),
    ([[5, 512, 6]], r"prompt 0, position 1: token id 512 outside the vocabulary \[0, 512\)"),
    ([[5, 6, -1]], r"prompt 0, position 2: token id -1 outside"),
])
def test_bad_prompts_are_refused_by_name(engine, prompts, message):
    with pytest.raises(EngineInputError, match=message):
        engine.generate(prompts, SamplingParams(max_new_tokens=2))
    assert engine.stats.requests == 0


def test_bad_settings_are_refused():
    dense = HFEngine(hf_model(TEST_DENSE, seed=0))
    with pytest.raises(EngineInputError, match="prompt 0: return_routed_experts asked of a model with no MoE layers"):
        dense.generate([[5, 6]], SamplingParams(max_new_tokens=2, return_routed_experts=True))
    with pytest.raises(ConfigError, match=r"generate_kwargs\['temperature'\]: set by the engine"):
        HFEngine(dense.model, generate_kwargs={"temperature": 0.5})
    with pytest.raises(ConfigError, match=r"generate_kwargs\['no_such'\]: not a transformers GenerationConfig field"):
        HFEngine(dense.model, generate_kwargs={"no_such": 1})
    with pytest.raises(EngineInputError, match="top_p must be in"):
        SamplingParams(top_p=0)


def test_routed_experts_equal_a_recomputation_from_router_logits(model, engine):
    out = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=6, return_routed_experts=True), SAMPLE,
                                    SamplingParams(max_new_tokens=5, temperature=1.0, seed=2, return_routed_experts=True)])
    assert out[1].routed_experts is None
    for p, c in ((PROMPTS[0], out[0]), (PROMPTS[2], out[2])):
        seq = p + c.token_ids[:-1]
        assert c.routed_experts.shape == (len(seq), 3, 2) and c.routed_experts.dtype == torch.int64
        with torch.no_grad():
            router_logits = model(torch.tensor([seq]), output_router_logits=True).router_logits
        ref = []
        for logits, (_, gate) in zip(router_logits, engine.moe_gates):
            scores = torch.softmax(logits.float(), -1) + gate.moe_statics.e_score_correction_bias.squeeze()
            ref.append(scores.topk(2, -1).indices)
        assert torch.equal(c.routed_experts, torch.stack(ref, 1))
        assert len({tuple(r) for r in c.routed_experts[:, 0].tolist()}) > 2   # routing depends on the token


def test_update_weights_loads_another_model_exactly(model):
    other = hf_model(ENGINE_MOE, seed=1)
    want = HFEngine(other).generate(PROMPTS, SAMPLE)
    engine = HFEngine(hf_model(ENGINE_MOE, seed=0))
    before = engine.generate(PROMPTS, SAMPLE)
    assert [c.token_ids for c in before] != [c.token_ids for c in want]
    engine.update_weights(other.state_dict().items())          # transformers' fused in-memory names
    got = engine.generate(PROMPTS, SAMPLE)
    assert [(c.token_ids, c.logprobs) for c in got] == [(c.token_ids, c.logprobs) for c in want]
    back = _checkpoint(model)                                   # checkpoint names (one tensor per expert)
    assert len(back) == 116 and "model.layers.1.mlp.experts.7.up_proj.weight" in dict(back)
    engine.update_weights(iter(back))
    assert [c.token_ids for c in engine.generate(PROMPTS, SAMPLE)] == [c.token_ids for c in before]
    assert engine.stats.refits == 2
    assert engine.expected_weights() == {n: tuple(t.shape) for n, t in back}


def _checkpoint(model) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors as an HF checkpoint names them (no lm_head: tied to the embedding)."""
    from megatron_ernie.models.ernie.hf_adapter import HFWeights

    w = HFWeights(model.state_dict())
    return [(k, w.get(k).clone()) for k in w.keys() if k != "lm_head.weight"]


@pytest.mark.parametrize("change, message", [
    (lambda ts: ts + [("model.layers.9.mlp.gate.weight", torch.zeros(8, 64))],
     "unknown tensor 'model.layers.9.mlp.gate.weight'"),
    (lambda ts: [(n, t[:-1] if n == "model.layers.2.self_attn.k_proj.weight" else t) for n, t in ts],
     r"tensor 'model.layers.2.self_attn.k_proj.weight' has shape \[127, 64\], the model's is \[128, 64\]"),
    (lambda ts: [(n, t) for n, t in ts if n != "model.layers.3.mlp.experts.5.down_proj.weight"],
     "1 of the model's 116 tensors missing from the stream: 'model.layers.3.mlp.experts.5.down_proj.weight'"),
    (lambda ts: ts + ts[:1], "tensor 'model.embed_tokens.weight' sent twice"),
    (lambda ts: ts + [("lm_head.weight", torch.ones(512, 64))],
     "'lm_head.weight' differs from 'model.embed_tokens.weight', but the model ties them"),
])
def test_update_weights_refuses_a_bad_stream_by_name_then_refuses_to_generate(model, change, message):
    engine = HFEngine(hf_model(ENGINE_MOE, seed=0))
    with pytest.raises(WeightError, match=message):
        engine.update_weights(change(_checkpoint(hf_model(ENGINE_MOE, seed=1))))
    with pytest.raises(EngineNotReadyError, match="the last update_weights failed, the weights are a mix"):
        engine.generate(PROMPTS, SAMPLE)
    engine.update_weights(_checkpoint(model))                  # a complete update makes it usable again
    assert engine.generate(PROMPTS, SAMPLE)[0].token_ids == HFEngine(model).generate(PROMPTS, SAMPLE)[0].token_ids
    assert engine.stats.refits == 1


def test_tied_lm_head_equal_to_the_embedding_is_accepted(model):
    engine = HFEngine(hf_model(ENGINE_MOE, seed=0))
    tensors = _checkpoint(model)
    engine.update_weights(tensors + [("lm_head.weight", dict(tensors)["model.embed_tokens.weight"].clone())])
    assert engine.stats.refits == 1


def test_sleep_levels(model):
    want = HFEngine(model).generate(PROMPTS, SAMPLE)
    keep = HFEngine(hf_model(ENGINE_MOE, seed=0))
    keep.sleep()
    assert keep.asleep
    with pytest.raises(EngineNotReadyError, match="generate refused: the engine is asleep"):
        keep.generate(PROMPTS, SAMPLE)
    with pytest.raises(EngineNotReadyError, match="update_weights: the engine is asleep"):
        keep.update_weights([])
    keep.wake()
    assert [c.token_ids for c in keep.generate(PROMPTS, SAMPLE)] == [c.token_ids for c in want]

    free = HFEngine(hf_model(ENGINE_MOE, seed=0), sleep_level=2)
    free.sleep()
    assert sum(p.numel() for p in free.model.parameters()) == 0
    free.wake()
    assert sum(p.numel() for p in free.model.parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(EngineNotReadyError, match="woken from sleep level 2: the weights need an update_weights"):
        free.generate(PROMPTS, SAMPLE)
    free.update_weights(model.state_dict().items())
    got = free.generate(PROMPTS, SAMPLE)
    assert [(c.token_ids, c.logprobs) for c in got] == [(c.token_ids, c.logprobs) for c in want]


# --- the reward system's adapter over an engine ------------------------------------------------
class ScriptedEngine:
    """Answers every prompt with fixed token ids, finishing on a stop token."""

    def __init__(self, ids: list[int], finish: str):
        self.ids, self.finish, self.calls = ids, finish, []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [Completion(prompt_ids=list(p), token_ids=list(self.ids), logprobs=[0.0] * len(self.ids),
                           finish_reason=self.finish) for p in prompts]


def test_engine_backend_renders_prompts_decodes_without_the_stop_token_and_a_judge_scores():
    from megatron_ernie.data.tokenizer import demo_tokenizer
    from megatron_ernie.rewards.generation import EngineBackend
    from megatron_ernie.rewards.judges import RLLMJudge
    from megatron_ernie.rewards.types import RewardSample

    tok = demo_tokenizer()
    verdict = tok.encode("Verdict: CORRECT", add_special_tokens=False)
    engine = ScriptedEngine(verdict + [tok.eos_token_id], FINISH_STOP)
    backend = EngineBackend(engine, tok, thinking=False, batch_size=2, sampling={"top_p": 0.9})
    judge = RLLMJudge(backend, max_new_tokens=16, seed=5)
    sample = RewardSample(prompt="What is 2 + 2?", response="4", reference="4", domain="math")
    results = judge.score([sample] * 3)
    assert [r.reward for r in results] == [1.0, 1.0, 1.0]
    assert results[0].details["judge_output"] == "Verdict: CORRECT"
    # 3 prompts in chunks of 2: seeds 5 (+i inside the chunk) and 7, the tokenizer's EOS as a stop
    assert [len(p) for p, _ in engine.calls] == [2, 1]
    assert [(sp.seed, sp.max_new_tokens, sp.top_p, sp.stop_token_ids) for _, sp in engine.calls] == \
        [(5, 16, 0.9, (2,)), (7, 16, 0.9, (2,))]
    assert engine.calls[0][0][0] == backend.prompt_ids(judge.build_prompt(sample))
    # a completion cut by length keeps its last token
    cut = EngineBackend(ScriptedEngine(verdict, FINISH_LENGTH), tok)
    assert cut.generate(["q"], max_new_tokens=4) == ["Verdict: CORRECT"]
    with pytest.raises(ValueError, match="sampling option\\(s\\) min_p: not one of"):
        EngineBackend(engine, tok, sampling={"min_p": 0.1})


def test_hf_generation_backend_is_the_adapter_over_hf_engine(model):
    from megatron_ernie.data.tokenizer import demo_tokenizer
    from megatron_ernie.rewards.generation import EngineBackend, HFGenerationBackend

    tok = demo_tokenizer()
    hf = HFGenerationBackend(model, tok, batch_size=2)
    assert isinstance(hf, EngineBackend) and isinstance(hf.engine, HFEngine) and hf.model is model
    prompts = ["What is the capital of France?", "Hi", "Name a prime."]
    text = hf.generate(prompts, max_new_tokens=6)
    ids = [hf.prompt_ids(p) for p in prompts]
    direct = HFEngine(model).generate(ids, SamplingParams(max_new_tokens=6, stop_token_ids=(2,)))
    assert text == [tok.decode(c.token_ids, skip_special_tokens=True) for c in direct]
    assert all(t for t in text)
