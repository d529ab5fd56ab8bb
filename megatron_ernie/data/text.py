"""Plain-text language-modelling batches (the demo's data until the SFT pipeline lands)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

BUNDLED_CORPUS = "tiny_corpus.txt"


class ByteTokenizer:
    """UTF-8 bytes shifted past ERNIE's special ids (pad 0, bos 1, eos 2): vocab 259."""

    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


def bundled_text() -> str:
    return resources.files("megatron_ernie.data.bundled").joinpath(BUNDLED_CORPUS).read_text()


def lm_batches(text: str, tokenizer, seq_length: int, batch_size: int, *, eos_id: int = 2, seed: int = 0):
    """Endless shuffled batches of `batch_size` windows of `seq_length` next-token pairs
    cut from the token stream (one eos between lines)."""
    ids = []
    for line in text.splitlines():
        if line.strip():
            ids += tokenizer.encode(line) + [eos_id]
    stream = torch.tensor(ids, dtype=torch.long)
    n = (len(stream) - 1) // seq_length
    if n < 1:
        raise ValueError(f"text of {len(stream)} tokens is shorter than one sequence of {seq_length}")
    windows = stream[: n * seq_length + 1]
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1).contiguous()
    while True:
        for start in range(0, n - batch_size + 1, batch_size):
            order = torch.randperm(n, generator=g)[:batch_size] * seq_length
            idx = order[:, None] + torch.arange(seq_length + 1)
            chunk = windows[idx]
            yield {
                "tokens": chunk[:, :-1].contiguous(),
                "labels": chunk[:, 1:].contiguous(),
                "loss_mask": torch.ones(batch_size, seq_length),
                "position_ids": positions,
            }


def read_text(path: str | Path | None) -> str:
    return bundled_text() if path is None else Path(path).read_text()
