"""Text generation for the reward system: what LLM judges and the prompt pre-filter call.

One small protocol, `GenerationBackend.generate(prompts, *, max_new_tokens, temperature, seed)`:
a batch of plain user messages in, one completion (new text only) per prompt out, greedy and
deterministic at temperature 0. Implementations here:
- `HFGenerationBackend`: a `transformers` causal LM + tokenizer in this process (tests, small
  judges); each prompt becomes an ERNIE chat user turn (the tokenizer's chat template when it has
  one, else `data/chat.py`'s built-in rendering), batched with left padding;
- `CallableBackend`: wraps a function, for fixed outputs in tests.
The RL engines (in-process, vLLM) implement the same protocol. `build_backend` turns a recipe's
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


class HFGenerationBackend:
    """A `transformers` causal LM generating in-process.

    `thinking=False` appends ERNIE's empty think block to each prompt (the non-thinking mode of a
    fused model); `batch_size` bounds how many prompts go through `model.generate` at once;
    `generation_kwargs` are passed to `generate` as is (e.g. top_p for sampling)."""

    def __init__(self, model, tokenizer, *, thinking: bool = True, batch_size: int | None = None,
                 generation_kwargs: Mapping[str, Any] | None = None):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.thinking = thinking
        self.batch_size = batch_size
        self.generation_kwargs = dict(generation_kwargs or {})
        self.pad_id = _pad_id(tokenizer)

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

    def prompt_ids(self, prompt: str) -> list[int]:
        from megatron_ernie.data.chat import prompt_ids

        return prompt_ids([{"role": "user", "content": prompt}], self.tokenizer, thinking=self.thinking)

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, seed=None):
        prompts = list(prompts)
        step = self.batch_size or max(len(prompts), 1)
        out: list[str] = []
        for start in range(0, len(prompts), step):
            chunk_seed = None if seed is None else seed + start
            out += self._generate_chunk(prompts[start:start + step], max_new_tokens, temperature, chunk_seed)
        return out

    def _generate_chunk(self, prompts: list[str], max_new_tokens: int, temperature: float,
                        seed: int | None) -> list[str]:
        import torch

        ids, mask = _left_pad([self.prompt_ids(p) for p in prompts], self.pad_id, self.model.device)
        sample = temperature > 0
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=self.pad_id,
                      eos_token_id=self.tokenizer.eos_token_id)
        if sample:
            kwargs["temperature"] = temperature
        kwargs.update(self.generation_kwargs)
        # A seed must not disturb the caller's global RNG (e.g. the trainer's).
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            generated = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new_tokens = generated[:, ids.shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; cannot batch prompts")
    return pad


def _left_pad(rows: list[list[int]], pad_id: int, device):
    """Left padding, so every row's last prompt token sits at the same position and generation
    continues all rows in step."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


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
