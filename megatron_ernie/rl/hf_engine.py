"""The transformers rollout engine: `rl.engine.RolloutEngine` over an HF `Ernie4_5_MoeForCausalLM` /
`Ernie4_5ForCausalLM` (any causal LM with the same interface) in this process.

The reference and benchmark baseline for the other engines, and what small judges run on:

- Batches go through `model.generate` with left padding. Requests are grouped by what
  `generate` takes once per call (greedy or the sampling settings, the stop set); each group is
  generated with the largest of its rows' token budgets and every row is then cut at its own
  (`max_new_tokens`, and the room `max_model_len` leaves after its prompt).
- Seeds: a sampled request with a seed is generated alone, under `torch.random.fork_rng` seeded
  with it, so the same seed gives the same tokens whatever else is in the batch and the caller's
  RNG is untouched. Sampled requests without a seed are batched and draw from the global RNG.
  Greedy requests ignore seeds.
- Log-probs: fp32 `log_softmax` of the raw logits (`output_logits=True`, before temperature /
  top-k / top-p) at each sampled token.
- Stops: the request's `stop_token_ids` plus the engine's EOS ids; the stop token is the last
  token of the completion (FINISH_STOP). The model's own `generation_config` (a checkpoint's
  default temperature, top-p, repetition penalty...) is not applied: only the request's settings.
- Routed experts (MoE, `return_routed_experts`): forward hooks on each MoE layer's router record
  the experts it selected in every forward `generate` runs (top-k of softmax scores +
  `e_score_correction_bias`, as ERNIE routes); a completion gets its prompt's rows from the
  prefill and one row per decode step for completion[:-1] (the last sampled token is never fed
  back), [len(prompt) + len(completion) - 1, moe_layers, top_k] int64 in layer order.
- Weights: `update_weights` takes HF checkpoint names (one tensor per expert, as `save_pretrained`
  writes and `rl.refit` yields; transformers' fused in-memory names are accepted too) and copies
  them into the parameters, streamed. An unknown, repeated or misshapen tensor is refused with
  its name; so is an incomplete stream (the missing names listed). After a failed update the
  weights are a mix: `generate` refuses (EngineNotReadyError) until a complete update succeeds.
- `sleep(level)`: level 1 moves the weights to CPU memory (nothing to free on a CPU model), level 2
  frees every weight's storage (then `wake()` reallocates them uninitialised and an
  `update_weights` is required before `generate`, as for the Megatron engine).
"""
from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from megatron_ernie.errors import ConfigError, EngineInputError
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
    token_ids,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# generate() arguments the engine sets itself: not overridable through generate_kwargs
_OWN_KEYS = {"do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "max_length", "eos_token_id",
             "pad_token_id", "output_logits", "return_dict_in_generate", "num_beams", "num_return_sequences"}
_EXPERT_NAME = re.compile(r"^(?P<base>.+\.mlp\.experts\.)(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


class HFEngine:
    """A transformers causal LM as a rollout engine (see the module docstring).

    max_model_len: prompt + completion, default the config's `max_position_embeddings`.
    overlong: "refuse" or "truncate" (from the left) prompts that leave no room for a token.
    eos_token_ids: what finishes a request besides its stop tokens, default the config's EOS.
    pad_token_id: fills the left padding (masked out), default the config's pad, else the EOS.
    max_batch_size: at most this many rows per `generate` call (None: a group at once).
    generate_kwargs: further `GenerationConfig` fields for every call (e.g. repetition_penalty);
    they change what is sampled, not the reported log-probs (raw logits).
    sleep_level: 1 (keep weights, off the GPU) or 2 (free them; refit after wake)."""

    name = "HFEngine"

    def __init__(self, model, *, max_model_len: int | None = None, overlong: str = "refuse",
                 eos_token_ids: Iterable[int] | int | None = None, pad_token_id: int | None = None,
                 max_batch_size: int | None = None, generate_kwargs: Mapping[str, Any] | None = None,
                 sleep_level: int = 1):
        from transformers import GenerationConfig

        cfg = model.config
        self.model = model.eval()
        self.vocab_size = int(cfg.vocab_size)
        self.max_model_len = int(max_model_len or cfg.max_position_embeddings)
        if self.max_model_len < 2:
            raise ConfigError(f"max_model_len={self.max_model_len}: needs room for a prompt token and a new one")
        self.overlong = overlong
        self.eos_token_ids = token_ids(eos_token_ids if eos_token_ids is not None else cfg.eos_token_id)
        if pad_token_id is None:
            pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (self.eos_token_ids or (0,))[0]
        self.pad_token_id = int(pad_token_id)
        if max_batch_size is not None and max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.generate_kwargs = dict(generate_kwargs or {})
        known = GenerationConfig().to_dict()
        for key in self.generate_kwargs:
            if key in _OWN_KEYS:
                raise ConfigError(f"generate_kwargs[{key!r}]: set by the engine from SamplingParams, not here")
            if key not in known:
                raise ConfigError(f"generate_kwargs[{key!r}]: not a transformers GenerationConfig field")
        if sleep_level not in (1, 2):
            raise ConfigError(f"sleep_level must be 1 (keep weights) or 2 (free them), got {sleep_level}")
        self.sleep_level = sleep_level
        self.stats = EngineStats()
        self.moe_gates = _moe_gates(model)
        self.top_k = int(self.moe_gates[0][1].top_k) if self.moe_gates else 0
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self._asleep: str | None = None  # None | "offloaded" | "freed"
        self._device = None
        self._freed: list[tuple[torch.Tensor, torch.Size]] = []
        self._not_ready: str | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
                        **kwargs) -> "HFEngine":
        """Load an HF model directory (config.json + safetensors). EOS ids come from its
        generation_config.json when it has one (unless `eos_token_ids` is given)."""
        from transformers import AutoModelForCausalLM

        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        path = Path(path)
        if not (path / "config.json").exists():
            from megatron_ernie.errors import CheckpointError

            raise CheckpointError(f"{path}: no config.json (not an HF model directory)")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
        if "eos_token_ids" not in kwargs and (eos := hf_eos_ids(path)):
            kwargs["eos_token_ids"] = eos
        return cls(model, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, _ in self.moe_gates]

    # --- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        self._ready("generate")
        prompts = list(prompts)
        ps = per_request(params, len(prompts))
        for i, p in enumerate(ps):
            if p.return_routed_experts and not self.moe_gates:
                raise EngineInputError(f"prompt {i}: return_routed_experts asked of a model with no MoE layers")
        served = check_prompts(prompts, ps, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                               overlong=self.overlong, stats=self.stats)
        self.stats.requests += len(prompts)
        out: list[Completion | None] = [None] * len(prompts)
        for rows in self._groups(ps):
            done = self._generate_rows([served[i][0] for i in rows], [ps[i] for i in rows])
            for i, c in zip(rows, done):
                c.prompt_truncated = served[i][1]
                out[i] = c
        self.stats.generated_tokens += sum(len(c.token_ids) for c in out)
        return out

    def _groups(self, ps: list[SamplingParams]) -> list[list[int]]:
        """Request indices that can share one generate call, in first-seen order."""
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(ps):
            stops = tuple(sorted(set(p.stop_token_ids) | set(self.eos_token_ids)))
            if p.greedy:
                key = ("greedy", stops)
            elif p.seed is not None:
                key = ("seeded", i)
            else:
                key = ("sample", p.temperature, p.top_p, p.top_k, stops)
            groups.setdefault(key, []).append(i)
        step = self.max_batch_size
        out = []
        for rows in groups.values():
            out += [rows[s:s + step] for s in range(0, len(rows), step)] if step else [rows]
        return out

    def _generate_rows(self, rows: list[list[int]], ps: list[SamplingParams]) -> list[Completion]:
        from transformers import GenerationConfig

        p0 = ps[0]
        stops = set(p0.stop_token_ids) | set(self.eos_token_ids)
        limits = [min(p.max_new_tokens, self.max_model_len - len(r)) for r, p in zip(rows, ps)]
        ids, mask = left_pad(rows, self.pad_token_id, self.device)
        settings = dict(max_new_tokens=max(limits), do_sample=not p0.greedy, pad_token_id=self.pad_token_id,
                        eos_token_id=sorted(stops) or None, output_logits=True, return_dict_in_generate=True,
                        num_beams=1, use_cache=True)
        if not p0.greedy:
            settings.update(temperature=p0.temperature, top_p=p0.top_p, top_k=p0.top_k)
        settings.update(self.generate_kwargs)
        record = self.moe_gates and any(p.return_routed_experts for p in ps)
        seed = p0.seed if (not p0.greedy and p0.seed is not None) else None
        devices = [self.device] if self.device.type == "cuda" else []
        captured: dict[int, list[torch.Tensor]] = {}
        hooks = self._record(captured) if record else []
        own_defaults = self.model.generation_config
        try:
            # the checkpoint's generation defaults (temperature, top_p, ...) must not fill in
            # what a request leaves at its default: generate merges them from here
            self.model.generation_config = GenerationConfig()
            with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                out = self.model.generate(input_ids=ids, attention_mask=mask,
                                          generation_config=GenerationConfig(**settings))
        finally:
            self.model.generation_config = own_defaults
            for h in hooks:
                h.remove()
        width = ids.shape[1]
        new = out.sequences[:, width:].cpu()
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
        logprobs = logprobs.gather(-1, new.to(logprobs.device).unsqueeze(-1)).squeeze(-1).cpu()
        completions = []
        for r, (row, p, limit) in enumerate(zip(rows, ps, limits)):
            tokens = new[r, :limit].tolist()
            stop_at = next((j for j, t in enumerate(tokens) if t in stops), None)
            if stop_at is not None:
                tokens, reason = tokens[:stop_at + 1], FINISH_STOP
            else:
                reason = FINISH_LENGTH
            c = Completion(prompt_ids=list(row), token_ids=tokens, logprobs=logprobs[r, :len(tokens)].tolist(),
                           finish_reason=reason)
            if p.return_routed_experts:
                c.routed_experts = _routed_rows(captured, r, len(row), width, len(tokens))
            completions.append(c)
        return completions

    def _record(self, captured: dict[int, list[torch.Tensor]]) -> list:
        """Hooks on every MoE router: the selected experts of each forward, per layer."""
        def hook(layer):
            def fn(module, inputs, output):
                if not (isinstance(output, tuple) and len(output) == 3):
                    raise RuntimeError(f"layer {layer}: the MoE router returned {type(output).__name__}; expected "
                                       "(router_logits, weights, selected_experts) as transformers' ERNIE router does")
                captured.setdefault(layer, []).append(output[2].detach().to("cpu", torch.int64))
            return fn
        return [gate.register_forward_hook(hook(layer)) for layer, gate in self.moe_gates]

    # --- weights ------------------------------------------------------------------------------
    def expected_weights(self) -> dict[str, tuple[int, ...]]:
        """HF checkpoint name -> shape of every weight the model holds."""
        return {name: tuple(view.shape) for name, view in self._weight_views().items()}

    def _weight_views(self) -> dict[str, torch.Tensor]:
        """HF checkpoint name -> the tensor (a parameter or a view into one) it is copied into."""
        views: dict[str, torch.Tensor] = {}
        for name, param in self.model.named_parameters():
            data = param.data
            if name.endswith(".mlp.experts.gate_up_proj") and data.dim() == 3:
                base = name[: -len("gate_up_proj")]
                half = data.shape[1] // 2
                for e in range(data.shape[0]):
                    views[f"{base}{e}.gate_proj.weight"] = data[e, :half]
                    views[f"{base}{e}.up_proj.weight"] = data[e, half:]
            elif name.endswith(".mlp.experts.down_proj") and data.dim() == 3:
                base = name[: -len("down_proj")]
                for e in range(data.shape[0]):
                    views[f"{base}{e}.down_proj.weight"] = data[e]
            else:
                views[name.replace(".mlp.gate.moe_statics.", ".mlp.moe_statics.")] = data
        return views

    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a full set of HF-named tensors into the model (see the module docstring)."""
        if self._asleep:
            raise EngineNotReadyError("update_weights: the engine is asleep; call wake() first")
        views = self._weight_views()
        check = RefitCheck({k: tuple(v.shape) for k, v in views.items()}, tied=self.tied, engine=self.name)
        self._not_ready = "update_weights is in progress or was interrupted"
        try:
            with torch.no_grad():
                for name, t in hf_checkpoint_tensors(tensors):
                    if check.check(name, t):
                        views[name].copy_(t)
            check.finish()
        except BaseException as e:
            self._not_ready = (f"the last update_weights failed, the weights are a mix ({e}); a complete "
                               "update_weights must succeed before generate")
            raise
        self._not_ready = None
        self.stats.refits += 1

    # --- memory -------------------------------------------------------------------------------
    @property
    def asleep(self) -> bool:
        return self._asleep is not None

    def sleep(self) -> None:
        """Level 1: weights to CPU memory (a no-op for a CPU model). Level 2: free their storage."""
        if self._asleep:
            return
        if self.sleep_level == 1:
            self._device = self.device
            self.model.to("cpu")
            self._asleep = "offloaded"
        else:
            self._freed = []
            for t in self.model.parameters():  # buffers (rotary frequencies) are derived, and small
                self._freed.append((t, t.shape))
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            self._asleep = "freed"
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if not self._asleep:
            return
        if self._asleep == "offloaded":
            self.model.to(self._device)
        else:
            for t, shape in self._freed:
                t.data = torch.empty(shape, dtype=t.dtype, device=t.device)
            self._freed = []
            self._not_ready = "woken from sleep level 2: the weights need an update_weights before generate"
        self._asleep = None

    def _ready(self, what: str) -> None:
        if self._asleep:
            raise EngineNotReadyError(f"{what} refused: the engine is asleep; call wake() first")
        if self._not_ready:
            raise EngineNotReadyError(f"{what} refused: {self._not_ready}")


def _moe_gates(model) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, router) of every MoE layer, in model order."""
    layers = getattr(getattr(model, "model", model), "layers", [])
    return [(i, layer.mlp.gate) for i, layer in enumerate(layers)
            if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")]


def _routed_rows(captured: dict[int, list[torch.Tensor]], row: int, prompt_len: int, width: int,
                 n_tokens: int) -> torch.Tensor:
    """[prompt_len + n_tokens - 1, layers, top_k] for batch row `row`: its prompt's positions of the
    prefill (the last `prompt_len` of `width`), then decode steps 1 .. n_tokens - 1."""
    per_layer = []
    for layer in sorted(captured):
        calls = captured[layer]
        if len(calls) < n_tokens:
            raise RuntimeError(f"layer {layer}: {len(calls)} router calls recorded for {n_tokens} generated tokens")
        batch = calls[0].shape[0] // width
        prefill = calls[0].view(batch, width, -1)[row, width - prompt_len:]
        steps = [calls[c].view(batch, -1)[row:row + 1] for c in range(1, n_tokens)]
        per_layer.append(torch.cat([prefill, *steps], dim=0))
    return torch.stack(per_layer, dim=1)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every row's last prompt token sits at the same position and generation
    continues all rows in step."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)
