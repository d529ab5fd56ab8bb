"""The token-level rollout engine interface: every engine (in-process Megatron, transformers, vLLM)
implements it, and everything above it (the rollout source, the reward system's text backend)
talks only to it.

    engine.generate(prompts: list[list[int]], params) -> list[Completion]
    engine.update_weights(stream of (HF name, tensor))      # refit from the trainer
    engine.sleep() / engine.wake()                           # free / retake memory between phases

A `Completion` carries the sampled token ids, the log-probability of each under the engine's
sampling distribution *before* temperature/top-p/top-k (the policy's log-prob, what RL's ratios
need), why it finished, and for MoE models — when asked — the experts each router selected for
every token the model consumed (prompt + completion[:-1]), which the trainer replays.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch

from megatron_ernie.errors import EngineInputError, WeightError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    stop_token_ids: tuple[int, ...] = ()  # besides the engine's EOS; the stop token is kept in the output
    seed: int | None = None  # per request: the same seed gives the same tokens on the same engine
    return_routed_experts: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise EngineInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EngineInputError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class EngineNotReadyError(EngineInputError):
    """generate/update_weights refused in the engine's current state: no complete weights (never
    loaded, a failed update_weights, woken from sleep without a refit) or asleep."""


FINISH_STOP = "stop"  # an EOS / stop token was sampled (it is the last token)
FINISH_LENGTH = "length"  # max_new_tokens reached, or the engine's context is full


@dataclass
class Completion:
    prompt_ids: list[int]  # as served (after truncation, if the engine truncates overlong prompts)
    token_ids: list[int]
    logprobs: list[float]  # one per token in token_ids
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH
    # [len(prompt_ids) + len(token_ids) - 1, moe_layers, top_k] int, selected experts per token
    # and MoE layer in model order; None unless asked for (and the engine can)
    routed_experts: torch.Tensor | None = None
    prompt_truncated: bool = False


@dataclass
class EngineStats:
    """Counted per engine over its lifetime (reported by the rollout source)."""

    requests: int = 0
    generated_tokens: int = 0
    truncated_prompts: int = 0
    refused_prompts: int = 0
    refits: int = 0
    forwards: int = 0  # model forwards of generate (prefill and decode steps; in-process engine)


@runtime_checkable
class RolloutEngine(Protocol):
    stats: EngineStats

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]: ...

    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...


def token_ids(value) -> tuple[int, ...]:
    """An HF config's token-id field (None, an int or a list) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def hf_eos_ids(path) -> tuple[int, ...]:
    """An HF model directory's EOS ids: generation_config.json's (ERNIE lists several there),
    else config.json's, else none."""
    import json
    from pathlib import Path

    for file in (Path(path) / "generation_config.json", Path(path) / "config.json"):
        if file.exists():
            eos = token_ids(json.loads(file.read_text()).get("eos_token_id"))
            if eos:
                return eos
    return ()


OVERLONG = ("refuse", "truncate")


def per_request(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt. A single one with a seed gives request i the seed `seed + i`
    (distinct but reproducible streams)."""
    if isinstance(params, SamplingParams):
        if params.seed is None:
            return [params] * n
        return [replace(params, seed=params.seed + i) for i in range(n)]
    params = list(params)
    if len(params) != n:
        raise EngineInputError(f"{len(params)} sampling params for {n} prompts")
    return params


def check_prompts(prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], *, vocab_size: int,
                  max_model_len: int, overlong: str, stats: EngineStats) -> list[tuple[list[int], bool]]:
    """Validate prompts before anything runs: (ids, truncated) per prompt.

    Empty prompts and ids outside [0, vocab_size) are refused (naming the prompt and position).
    A prompt that leaves no room for one new token within `max_model_len` is refused, or with
    `overlong="truncate"` cut from the left (its end — the question and the assistant turn's
    opening — is what generation continues from) and counted."""
    if overlong not in OVERLONG:
        raise EngineInputError(f"overlong={overlong!r}: expected one of {OVERLONG}")
    out = []
    for i, (ids, p) in enumerate(zip(prompts, params)):
        ids = [int(t) for t in ids]
        if not ids:
            raise EngineInputError(f"prompt {i} is empty")
        bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise EngineInputError(f"prompt {i}, position {bad}: token id {ids[bad]} outside the vocabulary "
                                   f"[0, {vocab_size})")
        room = max_model_len - 1
        if len(ids) > room:
            if overlong == "refuse":
                stats.refused_prompts += 1
                raise EngineInputError(f"prompt {i} has {len(ids)} tokens; the engine's context is {max_model_len} "
                                       f"(max_model_len) and needs room for one new token (overlong=refuse)")
            stats.truncated_prompts += 1
            out.append((ids[-room:], True))
        else:
            out.append((ids, False))
    return out


# --- refit: the names and shapes a stream of HF tensors must have ------------------------------
_FUSED_GATE_UP = ".mlp.experts.gate_up_proj"
_FUSED_DOWN = ".mlp.experts.down_proj"
_BIAS_IN_MEMORY = ".mlp.gate.moe_statics."


def hf_checkpoint_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A stream of HF tensors in checkpoint naming (what `save_pretrained` writes and the trainer's
    export yields: one gate/up/down per expert, `mlp.moe_statics.e_score_correction_bias`).

    transformers>=5 holds a MoE layer's experts in memory as fused `[E, 2I, H]` / `[E, H, I]`
    tensors and the correction bias under `mlp.gate.`; a state dict in that form (e.g.
    `model.state_dict().items()`) is split here, lazily, so engines accept both."""
    for name, t in tensors:
        if name.endswith(_FUSED_GATE_UP) and t.dim() == 3:
            base = name[: -len("gate_up_proj")]
            for e, w in enumerate(t):
                gate, up = torch.chunk(w, 2, dim=0)
                yield f"{base}{e}.gate_proj.weight", gate
                yield f"{base}{e}.up_proj.weight", up
        elif name.endswith(_FUSED_DOWN) and t.dim() == 3:
            base = name[: -len("down_proj")]
            for e, w in enumerate(t):
                yield f"{base}{e}.down_proj.weight", w
        else:
            yield name.replace(_BIAS_IN_MEMORY, ".mlp.moe_statics."), t


class RefitCheck:
    """Checks one `update_weights` stream against the names and shapes an engine expects.

    `check(name, tensor)` raises `WeightError` naming an unknown, repeated or misshapen tensor
    and returns whether to load it (False for `lm_head.weight` of a model with tied embeddings:
    it must equal the embedding it is tied to, checked in `finish`); `finish()` names the
    expected tensors the stream did not contain."""

    TIED = ("lm_head.weight", "model.embed_tokens.weight")

    def __init__(self, expected: Mapping[str, tuple[int, ...]], *, tied: bool, engine: str):
        self.expected = {k: tuple(v) for k, v in expected.items()}
        self.tied = tied
        self.engine = engine
        self.seen: set[str] = set()
        self._tied_pair: dict[str, torch.Tensor] = {}

    def check(self, name: str, tensor: torch.Tensor) -> bool:
        if not isinstance(tensor, torch.Tensor):
            raise WeightError(f"{self.engine}.update_weights: {name!r} is a {type(tensor).__name__}, not a tensor")
        if self.tied and name in self.TIED:
            self._tied_pair[name] = tensor
            if name == self.TIED[0]:
                return False
        if name not in self.expected:
            near = sorted(self.expected)[:3]
            raise WeightError(f"{self.engine}.update_weights: unknown tensor {name!r} (the model has no such "
                              f"weight; expected HF checkpoint names such as {near})")
        if name in self.seen:
            raise WeightError(f"{self.engine}.update_weights: tensor {name!r} sent twice")
        shape = tuple(tensor.shape)
        if shape != self.expected[name]:
            raise WeightError(f"{self.engine}.update_weights: tensor {name!r} has shape {list(shape)}, "
                              f"the model's is {list(self.expected[name])}")
        self.seen.add(name)
        return True

    def finish(self) -> None:
        missing = sorted(set(self.expected) - self.seen)
        if missing:
            shown = ", ".join(repr(m) for m in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise WeightError(f"{self.engine}.update_weights: {len(missing)} of the model's {len(self.expected)} "
                              f"tensors missing from the stream: {shown}{more}")
        if len(self._tied_pair) == 2:
            head, emb = (self._tied_pair[k] for k in self.TIED)
            if head.shape != emb.shape or not torch.equal(head.to(emb.device, emb.dtype), emb):
                raise WeightError(f"{self.engine}.update_weights: 'lm_head.weight' differs from "
                                  "'model.embed_tokens.weight', but the model ties them (tie_word_embeddings)")
