"""Text generation for the reward system: what LLM judges and the prompt pre-filter call.

One small protocol, `GenerationBackend.generate(prompts, *, max_new_tokens, temperature, seed)`:
a batch of plain user messages in, one completion (new text only) per prompt out, greedy and
deterministic at temperature 0. Implementations here:
- `EngineBackend`: a thin adapter over a token-level rollout engine (`rl.engine`: the
  transformers, vLLM or in-process Megatron engine): each prompt becomes an ERNIE chat user turn
  (the tokenizer's chat template when it has one, else `data/chat.py`'s built-in rendering), the
  engine generates token ids, the new tokens are decoded;
- `HFGenerationBackend`: that adapter over `rl.hf_engine.HFEngine`, a `transformers` causal LM +
  tokenizer in this process (tests, small judges), batched with left padding;
- `CallableBackend`: wraps a function, for fixed outputs in tests. `build_backend` turns a recipe's
`backend:` option (an object, or `{type: hf, path: ...}`) into a backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

_DTYPES = ("float32", "bfloat16", "float16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@runtime_checkable
class GenerationBackend(Protocol):
    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]: ...


def check_outputs(prompts: Sequence[str], outputs) -> list[str]:
    """A backend's outputs, validated: one string per prompt."""
    outputs = list(outputs)
    if len(outputs) != len(prompts):
        raise ValueError(f"backend returned {len(outputs)} outputs for {len(prompts)} prompts")
    bad = [i for i, o in enumerate(outputs) if not isinstance(o, str)]
    if bad:
        raise TypeError(f"backend output {bad[0]} is {type(outputs[bad[0]]).__name__}, not str")
    return outputs


class CallableBackend:
    """`fn(prompts) -> list[str]` as a backend. Records every call in `calls` (prompts and
    generation arguments), so tests can count backend round trips."""

    def __init__(self, fn: Callable[[list[str]], Sequence[str]]):
        self.fn = fn
        self.calls: list[dict[str, Any]] = []

    @classmethod
    def fixed(cls, outputs: Sequence[str]) -> "CallableBackend":
        """Answers the i-th prompt of every call with outputs[i % len(outputs)]."""
        outputs = list(outputs)
        return cls(lambda prompts: [outputs[i % len(outputs)] for i in range(len(prompts))])

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, seed=None):
        prompts = list(prompts)
        self.calls.append(dict(prompts=prompts, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed))
        return check_outputs(prompts, self.fn(prompts))


class EngineBackend:
    """Text generation over a token-level rollout engine (`rl.engine.RolloutEngine`: HFEngine,
    VLLMEngine, the Megatron engine), so judges and the pre-filter run on any of them.

    Each prompt becomes an ERNIE chat user turn (the tokenizer's chat template when it has one, else
    `data/chat.py`'s built-in rendering); `thinking=False` appends ERNIE's empty think block (the
    non-thinking mode of a fused model). The tokenizer's EOS stops generation besides the engine's
    own; the new tokens are decoded without the stop token and special tokens. `batch_size` bounds
    the prompts per engine call (chunk k gets `seed + k * batch_size`: the same seeds whatever
    the chunking). `sampling`: further SamplingParams fields for every call (top_p, top_k,
    stop_token_ids)."""

    def __init__(self, engine, tokenizer, *, thinking: bool = True, batch_size: int | None = None,
                 sampling: Mapping[str, Any] | None = None):
        from megatron_ernie.rl.engine import SamplingParams

        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.thinking = thinking
        self.batch_size = batch_size
        self.sampling = dict(sampling or {})
        fields = set(SamplingParams.__dataclass_fields__) - {"max_new_tokens", "temperature", "seed",
                                                             "return_routed_experts"}
        unknown = sorted(set(self.sampling) - fields)
        if unknown:
            raise ValueError(f"sampling option(s) {', '.join(unknown)}: not one of {', '.join(sorted(fields))}")
        stops = tuple(self.sampling.pop("stop_token_ids", ()))
        eos = tokenizer.eos_token_id
        self.stop_token_ids = stops + ((int(eos),) if eos is not None and eos not in stops else ())

    def prompt_ids(self, prompt: str) -> list[int]:
        from megatron_ernie.data.chat import prompt_ids

        return prompt_ids([{"role": "user", "content": prompt}], self.tokenizer, thinking=self.thinking)

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, seed=None):
        from megatron_ernie.rl.engine import FINISH_STOP, SamplingParams

        prompts = list(prompts)
        step = self.batch_size or max(len(prompts), 1)
        out: list[str] = []
        for start in range(0, len(prompts), step):
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                    seed=None if seed is None else seed + start,
                                    stop_token_ids=self.stop_token_ids, **self.sampling)
            ids = [self.prompt_ids(p) for p in prompts[start:start + step]]
            for c in self.engine.generate(ids, params):
                tokens = c.token_ids[:-1] if c.finish_reason == FINISH_STOP else c.token_ids
                out.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return check_outputs(prompts, out)


class HFGenerationBackend(EngineBackend):
    """A `transformers` causal LM generating in-process: `EngineBackend` over `rl.hf_engine.HFEngine`.

    `thinking=False` appends ERNIE's empty think block to each prompt (the non-thinking mode of a
    fused model); `batch_size` bounds how many prompts go through `model.generate` at once;
    `generation_kwargs`: top_p / top_k / stop_token_ids become SamplingParams, anything else is a
    transformers GenerationConfig field passed to every `generate` (e.g. repetition_penalty)."""

    def __init__(self, model, tokenizer, *, thinking: bool = True, batch_size: int | None = None,
                 generation_kwargs: Mapping[str, Any] | None = None):
        from megatron_ernie.rl.hf_engine import HFEngine

        kwargs = dict(generation_kwargs or {})
        sampling = {k: kwargs.pop(k) for k in ("top_p", "top_k", "stop_token_ids") if k in kwargs}
        self.pad_id = _pad_id(tokenizer)
        engine = HFEngine(model, pad_token_id=self.pad_id, generate_kwargs=kwargs)
        super().__init__(engine, tokenizer, thinking=thinking, batch_size=batch_size, sampling=sampling)
        self.model = engine.model
        self.generation_kwargs = dict(generation_kwargs or {})

    @classmethod
    def from_pretrained(cls, path: str | Path, *, tokenizer: str | Path | None = None,
                        dtype: str = "float32", device: str = "cpu", **kwargs) -> "HFGenerationBackend":
        """Load an HF model directory. `tokenizer`: a directory (default: the model's own),
        or "demo" for the bundled demo tokenizer (tiny test models ship none)."""
        import torch
        from transformers import AutoModelForCausalLM

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(device)
        return cls(model, _load_backend_tokenizer(path, tokenizer), **kwargs)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; cannot batch prompts")
    return pad


def _load_backend_tokenizer(model_path, tokenizer):
    from megatron_ernie.data.tokenizer import demo_tokenizer, load_tokenizer

    if tokenizer == "demo":
        return demo_tokenizer()
    path = Path(tokenizer if tokenizer is not None else model_path)
    if path.is_dir() and not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer files; pass `tokenizer: <dir>` "
                                "(or `tokenizer: demo` for the demo tokenizer)")
    return load_tokenizer(path)


_BACKEND_TYPES: dict[str, Callable[..., GenerationBackend]] = {
    "hf": lambda path, **kw: HFGenerationBackend.from_pretrained(path, **kw),
}


def build_backend(spec) -> GenerationBackend:
    """A backend from a recipe option: an object with `generate` is used as is; a mapping
    `{type: hf, path: <model dir>, dtype: ..., device: ..., tokenizer: ...}` is built."""
    if isinstance(spec, GenerationBackend):
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(f"backend must be a generation backend or a mapping with `type`, "
                        f"got {type(spec).__name__}")
    opts = dict(spec)
    kind = opts.pop("type", None)
    if kind not in _BACKEND_TYPES:
        raise ValueError(f"backend.type={kind!r}: unknown; known: {', '.join(sorted(_BACKEND_TYPES))}")
    if kind == "hf" and "path" not in opts:
        raise ValueError("backend {type: hf} needs a `path` (an HF model directory)")
    try:
        return _BACKEND_TYPES[kind](**opts)
    except TypeError as e:
        raise TypeError(f"backend {{type: {kind}}}: {e}") from None
