"""SFT data: JSONL conversations -> rendered samples -> fixed-length (packed) training rows.

JSONL format, one sample per line (blank lines are skipped; line numbers count from 1):

    {"messages": [{"role": "system" | "user" | "assistant", "content": str,
                   "reasoning": str  (optional, assistant only: rendered inside <think>...</think>)}],
     "responses": [{"content": str, "reasoning": str?} | str, ...]   (optional),
     "thinking": bool   (optional),
     "domain": str      (optional)}

- `messages`: an optional system message first (a persona for role-play), then user and
  assistant turns alternating, starting with user; the last turn is an assistant turn, or a
  user turn when `responses` is given.
- `responses`: several responses to the same conversation; each one becomes a separate sample,
  appended as the final assistant turn.
- `thinking`: per-sample override of the dataset's `empty_think_for_non_thinking`: false = a
  non-thinking sample, its assistant turns without reasoning get the empty think block
  `<think>\\n\\n</think>\\n\\n` (input only, loss 0); true = they are rendered bare.
- `domain`: carried through to `SFTDataset.documents[i].domain` (e.g. for per-domain stats).
Errors name `file:line` (`errors.DataError`); a missing file raises `DataFileNotFoundError` (a
DataError and a FileNotFoundError).

Rows (`SFTDataset[i]`, all 1-D tensors of length `seq_length`):
    tokens       int64  input ids
    labels       int64  next-token targets: labels[t] = the sample's token after tokens[t]
    loss_mask    float32  loss_mask[t] = 1 iff predicting labels[t] counts (aligned to labels)
    position_ids int64  0, 1, ... restarting for every document
    doc_ids      int64  document index inside the row (0, 1, ...); padding is -1
Padding: tokens = labels = pad id (0), loss 0, position 0. A document of n tokens takes n - 1
positions (its tokens[:-1] / labels[1:]), so a sample fits a row when n <= seq_length + 1.
With packing, documents must only attend within themselves: `block_causal_mask(doc_ids)`.

Packing is greedy first-fit over the documents in a seeded shuffled order (deterministic for a
seed); unpacked mode keeps file order, one document per row.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megatron_ernie.data.chat import ChatFormatError, RenderedSample, render_messages, validate_messages
from megatron_ernie.errors import ConfigError, DataError, DataFileNotFoundError

BUNDLED_SFT = "sft_demo.jsonl"
OVERLONG = ("truncate", "drop")
PAD_DOC = -1


def bundled_sft_path() -> Path:
    return Path(str(resources.files("megatron_ernie.data.bundled").joinpath(BUNDLED_SFT)))


# --- reading and validating ------------------------------------------------------------------
@dataclass(frozen=True)
class RawSample:
    messages: list[dict]
    source: str                  # "file:line"
    domain: str | None = None
    thinking: bool | None = None


BUNDLED_SCHEME = "bundled:"


def data_path(path: str | Path) -> Path:
    """A data file; `bundled:NAME` names a file shipped in megatron_ernie/data/bundled (works
    from any directory and from an installed package)."""
    text = str(path)
    if text.startswith(BUNDLED_SCHEME):
        return Path(str(resources.files("megatron_ernie.data.bundled").joinpath(text[len(BUNDLED_SCHEME):])))
    return Path(path)


def _as_paths(path_or_paths) -> list[Path]:
    if isinstance(path_or_paths, (str, Path)):
        return [data_path(path_or_paths)]
    return [data_path(p) for p in path_or_paths]


def read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    if not path.is_file():
        raise DataFileNotFoundError(f"{path}: data file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: a line must be a JSON object")
            yield lineno, obj


def _response_message(response, where: str) -> dict:
    if isinstance(response, str):
        return {"role": "assistant", "content": response}
    if not isinstance(response, dict):
        raise DataError(f"{where}: each response must be an object or a string")
    return {"role": "assistant", **{k: v for k, v in response.items() if k != "role"}}


def parse_record(obj: dict, where: str) -> list[RawSample]:
    """One JSONL object -> its samples (one per response), validated."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    thinking, domain = obj.get("thinking"), obj.get("domain")
    if thinking is not None and not isinstance(thinking, bool):
        raise DataError(f"{where}: 'thinking' must be true or false")
    if domain is not None and not isinstance(domain, str):
        raise DataError(f"{where}: 'domain' must be a string")
    responses = obj.get("responses")
    if responses is None:
        conversations = [messages]
    elif not isinstance(responses, list) or not responses:
        raise DataError(f"{where}: 'responses' must be a non-empty list")
    else:
        if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            raise DataError(f"{where}: with 'responses', messages must end with a user turn")
        conversations = [messages + [_response_message(r, where)] for r in responses]
    for conversation in conversations:
        try:
            validate_messages(conversation)
        except ChatFormatError as e:
            raise DataError(f"{where}: {e}") from None
    return [RawSample(c, where, domain, thinking) for c in conversations]


def load_samples(path_or_paths) -> list[RawSample]:
    samples: list[RawSample] = []
    for path in _as_paths(path_or_paths):
        found = [s for lineno, obj in read_jsonl(path) for s in parse_record(obj, f"{path}:{lineno}")]
        if not found:
            raise DataError(f"{path}: no samples (empty SFT data file)")
        samples += found
    return samples


def conversation_texts(path_or_paths) -> list[list[dict]]:
    """The message lists of a dataset (e.g. to train a demo tokenizer on)."""
    return [s.messages for s in load_samples(path_or_paths)]


# --- rendering -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    source: str
    domain: str | None
    num_tokens: int        # rendered tokens kept (positions in a row = num_tokens - 1)
    num_loss_tokens: int
    truncated: bool


def new_stats() -> dict[str, int]:
    return dict(samples=0, dropped_overlong=0, truncated=0, tokens=0, loss_tokens=0,
                packed_sequences=0, padding_tokens=0)


def render_sample(sample: RawSample, tokenizer, *, empty_think: bool, loss_on: str) -> RenderedSample:
    use_empty = empty_think if sample.thinking is None else not sample.thinking
    try:
        return render_messages(sample.messages, tokenizer, empty_think=use_empty, loss_on=loss_on)
    except ChatFormatError as e:
        raise DataError(f"{sample.source}: {e}") from None


def fit_length(rendered: RenderedSample, max_tokens: int, overlong: str) -> RenderedSample | None:
    """The sample within `max_tokens`, or None when it is dropped (policy `drop`, or nothing
    left to learn after truncation)."""
    if len(rendered) <= max_tokens:
        return rendered
    if overlong == "drop":
        return None
    cut = rendered.truncate(max_tokens)
    return cut if cut.num_loss_tokens > 0 else None


def render_all(samples: Sequence[RawSample], tokenizer, seq_length: int, *, overlong: str, empty_think: bool,
               loss_on: str, stats: dict) -> tuple[list[RenderedSample], list[Document]]:
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    rendered, documents = [], []
    for sample in samples:
        full = render_sample(sample, tokenizer, empty_think=empty_think, loss_on=loss_on)
        kept = fit_length(full, seq_length + 1, overlong)
        if kept is None:
            stats["dropped_overlong"] += 1
            continue
        truncated = len(kept) < len(full)
        stats["truncated"] += int(truncated)
        rendered.append(kept)
        documents.append(Document(sample.source, sample.domain, len(kept), kept.num_loss_tokens, truncated))
    stats["samples"] = len(rendered)
    stats["tokens"] = sum(len(r) - 1 for r in rendered)
    stats["loss_tokens"] = sum(r.num_loss_tokens for r in rendered)
    return rendered, documents


# --- packing ---------------------------------------------------------------------------------
def first_fit(lengths: Sequence[int], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """Greedy first-fit bins (lists of item indices) visiting items in `order`."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_rows(rendered: Sequence[RenderedSample], seq_length: int, *, pack: bool, seed: int) -> list[list[int]]:
    """Rows as lists of document indices."""
    if not pack:
        return [[i] for i in range(len(rendered))]
    order = list(range(len(rendered)))
    random.Random(seed).shuffle(order)
    return first_fit([len(r) - 1 for r in rendered], seq_length, order)


def build_rows(rendered: Sequence[RenderedSample], rows: list[list[int]], seq_length: int,
               pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The row tensors [num_rows, seq_length] (fields in the module docstring)."""
    n = len(rows)
    out = {
        "tokens": torch.full((n, seq_length), pad_id, dtype=torch.long),
        "labels": torch.full((n, seq_length), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros(n, seq_length, dtype=torch.float32),
        "position_ids": torch.zeros(n, seq_length, dtype=torch.long),
        "doc_ids": torch.full((n, seq_length), PAD_DOC, dtype=torch.long),
    }
    for r, docs in enumerate(rows):
        start = 0
        for d, i in enumerate(docs):
            sample = rendered[i]
            end = start + len(sample) - 1
            out["tokens"][r, start:end] = torch.tensor(sample.tokens)
            out["labels"][r, start:end] = torch.tensor(sample.labels)
            out["loss_mask"][r, start:end] = torch.tensor(sample.label_mask, dtype=torch.float32)
            out["position_ids"][r, start:end] = torch.arange(end - start)
            out["doc_ids"][r, start:end] = d
            start = end
    return out


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask [b, 1, s, s] from doc ids [b, s] (or [s]), Megatron's convention:
    True = masked out. A token sees earlier-or-equal positions of its own document; padding
    (doc id -1) sees only itself, so no row is fully masked (softmax stays finite)."""
    if doc_ids.dim() == 1:
        doc_ids = doc_ids.unsqueeze(0)
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    real = (doc_ids != PAD_DOC).unsqueeze(-1)
    diagonal = torch.eye(s, dtype=torch.bool, device=doc_ids.device)
    allowed = (same_doc & causal & real) | diagonal
    return (~allowed).unsqueeze(1)


# --- the dataset -----------------------------------------------------------------------------
class SFTDataset(torch.utils.data.Dataset):
    """Rendered, length-checked and (optionally) packed SFT rows, built eagerly.

    `stats`: samples, dropped_overlong, truncated, tokens (non-padding positions), loss_tokens,
    packed_sequences (rows), padding_tokens. `documents[j]` / `rows[i]` say which sample each
    document is and which documents row i holds (in doc_id order)."""

    def __init__(self, path_or_paths, tokenizer, seq_length: int, pack: bool = True, overlong: str = "truncate",
                 empty_think_for_non_thinking: bool = True, seed: int = 0, loss_on: str = "all_assistant",
                 pad_id: int | None = None):
        self.seq_length = seq_length
        self.stats = new_stats()
        samples = load_samples(path_or_paths)
        rendered, self.documents = render_all(samples, tokenizer, seq_length, overlong=overlong,
                                              empty_think=empty_think_for_non_thinking, loss_on=loss_on,
                                              stats=self.stats)
        if not rendered:
            raise DataError(f"{', '.join(map(str, _as_paths(path_or_paths)))}: no samples left "
                            f"after dropping {self.stats['dropped_overlong']} overlong ones")
        self.rows = pack_rows(rendered, seq_length, pack=pack, seed=seed)
        pad = pad_id if pad_id is not None else (getattr(tokenizer, "pad_token_id", None) or 0)
        self._data = build_rows(rendered, self.rows, seq_length, pad)
        self.stats["packed_sequences"] = len(self.rows)
        self.stats["padding_tokens"] = len(self.rows) * seq_length - self.stats["tokens"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self._data.items()}

    def batch(self, indices: Sequence[int], attention_mask: bool = False) -> dict[str, torch.Tensor]:
        return collate([self[i] for i in indices], attention_mask=attention_mask)


def collate(items: Sequence[dict], attention_mask: bool = False) -> dict[str, torch.Tensor]:
    """Stack rows into [b, s] tensors; `attention_mask=True` adds `block_causal_mask` [b, 1, s, s]."""
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    if attention_mask:
        batch["attention_mask"] = block_causal_mask(batch["doc_ids"])
    return batch


class GlobalBatches:
    """Endless, deterministic, resumable global batches of dataset indices.

    Epoch e visits the rows in `randperm(n, seed + e)`; a batch may span two epochs. The data
    position is `consumed_samples` (store it in checkpoints); the same seed and
    consumed_samples resume exactly where an uninterrupted run would be."""

    def __init__(self, dataset, global_batch_size: int, seed: int = 0, consumed_samples: int = 0):
        self.num_rows = dataset if isinstance(dataset, int) else len(dataset)
        if self.num_rows < 1 or global_batch_size < 1:
            raise ValueError("need at least one row and a positive global batch size")
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self._perm_epoch, self._perm = -1, None

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_rows

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_rows, generator=g).tolist(), epoch
        return self._perm

    def _index(self, k: int) -> int:
        epoch, pos = divmod(k, self.num_rows)
        return self._permutation(epoch)[pos]

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        start = self.consumed_samples
        batch = [self._index(k) for k in range(start, start + self.global_batch_size)]
        self.consumed_samples += self.global_batch_size
        return batch
