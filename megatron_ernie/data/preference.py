"""Preference pairs for reward models (DRM: Bradley-Terry; RDRM: reference-guided).

JSONL, one pair per line (blank lines skipped, line numbers from 1):

    {"prompt": str | "messages": [...ending with a user turn],
     "chosen": str | {"content": str, "reasoning": str?},
     "rejected": same as chosen,
     "reference": str   (optional: RDRM input — the reference answer the model compares against),
     "domain": str      (optional)}

A response is scored as the conversation (prompt turns + the response as the assistant turn)
rendered in the ERNIE chat format; the reward model's value is read at the last token (the
response's `<|end_of_sentence|>`). With a reference, the last user turn carries it under
`REFERENCE_HEADER`, so the model sees question, reference and response together.

Items: `PreferenceDataset[i]` = {"tokens": [2, seq_length] (chosen, rejected; right-padded),
"end_index": [2]}; `collate_pairs` stacks a micro-batch as rows 2k (chosen) and 2k+1 (rejected)
and adds position ids.
Too long: `truncate` keeps the last `seq_length` tokens (the response end and as much of the
prompt as fits), `drop` drops the pair; both are counted in `stats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from megatron_ernie.data.chat import ChatFormatError, render_messages, validate_messages
from megatron_ernie.data.sft import _as_paths, read_jsonl
from megatron_ernie.errors import ConfigError, DataError

BUNDLED_PAIRS = "preference_demo.jsonl"
BUNDLED_PAIRS_EVAL = "preference_demo_eval.jsonl"
REFERENCE_HEADER = "\n\n[Reference answer]\n"
PAD_ID = 0


def bundled_pairs_path(split: str = "train") -> Path:
    name = {"train": BUNDLED_PAIRS, "eval": BUNDLED_PAIRS_EVAL}[split]
    return Path(str(resources.files("megatron_ernie.data.bundled").joinpath(name)))


@dataclass(frozen=True)
class PreferencePair:
    messages: list[dict]      # the prompt: turns ending with a user turn
    chosen: dict              # an assistant message
    rejected: dict
    reference: str | None
    domain: str | None
    source: str               # "file:line"


def _response(value, key: str, where: str) -> dict:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return {"role": "assistant", **{k: v for k, v in value.items() if k != "role"}}
    raise DataError(f"{where}: '{key}' must be a string or an object with a string 'content'")


def _prompt_messages(obj: dict, where: str) -> list[dict]:
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
    elif isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise DataError(f"{where}: a pair needs 'prompt' (string) or 'messages' (list)")
    try:
        validate_messages(messages, final_assistant=False)
    except ChatFormatError as e:
        raise DataError(f"{where}: {e}") from None
    if messages[-1].get("role") != "user":
        raise DataError(f"{where}: the prompt must end with a user turn")
    return messages


def parse_pair(obj: dict, where: str) -> PreferencePair:
    messages = _prompt_messages(obj, where)
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError(f"{where}: missing '{key}'")
    reference, domain = obj.get("reference"), obj.get("domain")
    if reference is not None and not isinstance(reference, str):
        raise DataError(f"{where}: 'reference' must be a string")
    if domain is not None and not isinstance(domain, str):
        raise DataError(f"{where}: 'domain' must be a string")
    return PreferencePair(messages, _response(obj["chosen"], "chosen", where),
                          _response(obj["rejected"], "rejected", where), reference, domain, where)


def load_pairs(path_or_paths) -> list[PreferencePair]:
    pairs: list[PreferencePair] = []
    for path in _as_paths(path_or_paths):
        found = [parse_pair(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]
        if not found:
            raise DataError(f"{path}: no preference pairs (empty file)")
        pairs += found
    return pairs


def with_reference(messages: Sequence[dict], reference: str | None) -> list[dict]:
    """The prompt as the reward model reads it: the reference answer appended to the last user turn."""
    out = [dict(m) for m in messages]
    if reference is not None:
        out[-1]["content"] = out[-1]["content"] + REFERENCE_HEADER + reference
    return out


def reward_input_ids(messages: Sequence[dict], response: dict | str, tokenizer, *, reference: str | None = None,
                     empty_think: bool = True) -> list[int]:
    """Token ids a reward model scores: prompt (+ reference) and the response, ending with eos."""
    if isinstance(response, str):
        response = {"role": "assistant", "content": response}
    conversation = with_reference(messages, reference) + [{"role": "assistant", **response}]
    return list(render_messages(conversation, tokenizer, empty_think=empty_think, loss_on="last_assistant").input_ids)


def fit(ids: list[int], seq_length: int, overlong: str) -> list[int] | None:
    if len(ids) <= seq_length:
        return ids
    return None if overlong == "drop" else ids[-seq_length:]


class PreferenceDataset(torch.utils.data.Dataset):
    """Rendered pairs; `stats` counts pairs, truncations and drops."""

    def __init__(self, path_or_paths, tokenizer, seq_length: int, *, overlong: str = "truncate",
                 empty_think: bool = True, use_reference: bool = True):
        if overlong not in ("truncate", "drop"):
            raise ConfigError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        self.seq_length = seq_length
        self.pairs: list[PreferencePair] = []
        self.rows: list[tuple[list[int], list[int]]] = []
        self.stats = dict(pairs=0, truncated=0, dropped_overlong=0, with_reference=0)
        for pair in load_pairs(path_or_paths):
            ref = pair.reference if use_reference else None
            try:
                ids = [reward_input_ids(pair.messages, r, tokenizer, reference=ref, empty_think=empty_think)
                       for r in (pair.chosen, pair.rejected)]
            except ChatFormatError as e:
                raise DataError(f"{pair.source}: {e}") from None
            kept = [fit(x, seq_length, overlong) for x in ids]
            if any(k is None for k in kept):
                self.stats["dropped_overlong"] += 1
                continue
            self.stats["truncated"] += int(any(len(k) < len(x) for k, x in zip(kept, ids)))
            self.stats["with_reference"] += int(ref is not None)
            self.pairs.append(pair)
            self.rows.append((kept[0], kept[1]))
        self.stats["pairs"] = len(self.rows)
        if not self.rows:
            raise DataError(f"{path_or_paths}: every pair is longer than seq_length={seq_length} (overlong=drop)")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        batch = collate_sequences(self.rows[i], self.seq_length)
        return {"tokens": batch["tokens"], "end_index": batch["end_index"]}


def collate_sequences(seqs: Sequence[list[int]], seq_length: int) -> dict[str, torch.Tensor]:
    """Right-padded [n, seq_length] tokens, positions, and each row's last real token index."""
    n = len(seqs)
    tokens = torch.full((n, seq_length), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not 0 < len(s) <= seq_length:
            raise ValueError(f"sequence {i} has {len(s)} tokens; expected 1..{seq_length}")
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return {"tokens": tokens,
            "position_ids": torch.arange(seq_length, dtype=torch.long).expand(n, -1).contiguous(),
            "end_index": torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)}


def collate_pairs(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Rows 2k = chosen, 2k+1 = rejected of pair k."""
    tokens = torch.cat([item["tokens"] for item in items])
    return {"tokens": tokens, "end_index": torch.cat([item["end_index"] for item in items]),
            "position_ids": torch.arange(tokens.shape[1], dtype=torch.long).expand(tokens.shape[0], -1).contiguous()}


class PolicyPairDataset(torch.utils.data.Dataset):
    """Pairs as a policy trains on them (offline UPO / DPO): per pair two rows — chosen, rejected —
    of next-token inputs, labels and the loss mask of the response's tokens, the prompt rendered
    as a rollout renders it (a response without reasoning gets the masked empty think block, as
    the non-thinking mode's prompt ends with it). Errors name the file and line."""

    def __init__(self, path_or_paths, tokenizer, seq_length: int, *, overlong: str = "truncate",
                 empty_think: bool = True):
        if overlong not in ("truncate", "drop"):
            raise ConfigError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        self.seq_length = seq_length
        self.rows: list[tuple[tuple[list[int], list[int]], ...]] = []
        self.stats = dict(pairs=0, truncated=0, dropped_overlong=0)
        for pair in load_pairs(path_or_paths):
            try:
                rendered = [render_messages([*pair.messages, r], tokenizer, empty_think=empty_think,
                                            loss_on="last_assistant") for r in (pair.chosen, pair.rejected)]
            except ChatFormatError as e:
                raise DataError(f"{pair.source}: {e}") from None
            # seq_length inputs predict seq_length + 1 tokens; truncation keeps the end (the response)
            kept = [(r.input_ids, r.loss_mask) if len(r) <= seq_length + 1 or overlong == "truncate" else None
                    for r in rendered]
            if any(k is None for k in kept):
                self.stats["dropped_overlong"] += 1
                continue
            self.stats["truncated"] += int(any(len(r) > seq_length + 1 for r in rendered))
            kept = [(ids[-(seq_length + 1):], mask[-(seq_length + 1):]) for ids, mask in kept]
            if not all(sum(mask[1:]) for _, mask in kept):
                raise DataError(f"{pair.source}: a response has no trained token (empty, or cut by seq_length="
                                f"{seq_length})")
            self.rows.append(tuple(kept))
        self.stats["pairs"] = len(self.rows)
        if not self.rows:
            raise DataError(f"{path_or_paths}: every pair is longer than seq_length={seq_length} (overlong=drop)")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return collate_policy_rows(self.rows[i], self.seq_length)


def collate_policy_rows(rows: Sequence[tuple[list[int], list[int]]], seq_length: int) -> dict[str, torch.Tensor]:
    """[n, seq_length] inputs = ids[:-1], labels = ids[1:], loss mask = the token mask of the labels."""
    n = len(rows)
    tokens = torch.full((n, seq_length), PAD_ID, dtype=torch.long)
    labels = torch.full((n, seq_length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(n, seq_length)
    for i, (ids, token_mask) in enumerate(rows):
        k = len(ids) - 1
        tokens[i, :k] = torch.tensor(ids[:-1])
        labels[i, :k] = torch.tensor(ids[1:])
        mask[i, :k] = torch.tensor(token_mask[1:], dtype=torch.float32)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask,
            "position_ids": torch.arange(seq_length).expand(n, -1).contiguous()}


def stack_rows(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Items of collated rows (each [2, s]: a pair) as one micro-batch: rows 2k, 2k+1 = pair k."""
    return {k: torch.cat([item[k] for item in items]) for k in items[0]}
