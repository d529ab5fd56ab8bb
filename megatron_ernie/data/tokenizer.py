"""Tokenizers: a model directory's own, or a tiny byte-level BPE trained here for demos and tests.

No model hub is reachable, so the demo model (vocab 512) gets a tokenizer trained in about a
second from the bundled SFT demo data. It carries ERNIE 4.5's special ids (pad/unk 0, bos 1,
eos 2) so that batches look like the real model's, plus `<think>` (3) and `</think>` (4).

`<think>`/`</think>` are *added, non-special* tokens: always matched whole (never split by BPE),
but kept by `decode(skip_special_tokens=True)`, so decoded generations still show where the
reasoning ends (a reasoning parser needs the markers; bos/eos/pad are what gets stripped).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Iterable

from megatron_ernie.data.special_tokens import (  # noqa: F401 - re-exported: the tokens' usual home
    BOS,
    EOS,
    SPECIAL_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
    THINK_TOKENS,
    UNK,
)
from megatron_ernie.errors import ConfigError


def load_tokenizer(path: str | Path | None):
    """The tokenizer of a model directory (`AutoTokenizer`); None gives the demo tokenizer."""
    if path is None:
        return demo_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _marker_free_pieces(texts) -> list[str]:
    """Training text without the special/think markers: they are whole tokens already, and
    left in they would spend merges on pieces like `<|` and `begin`."""
    pattern = "|".join(re.escape(t) for t in (*SPECIAL_TOKENS, *THINK_TOKENS))
    return [piece for text in texts for piece in re.split(pattern, text) if piece]


def _train_bpe_json(texts: tuple[str, ...], vocab_size: int) -> str:
    """Train a byte-level BPE (deterministic for the same texts) and return its JSON."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The trainer gives its special tokens the first ids in order; it marks them all special.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *THINK_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_marker_free_pieces(texts), trainer)
    # Re-adding the think markers keeps their ids (3, 4) but clears the `special` flag.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok.to_str()


def _wrap(tokenizer_json: str):
    """A fresh `PreTrainedTokenizerFast` (callers may mutate it, e.g. set a chat template)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        unk_token=UNK, pad_token=UNK, bos_token=BOS, eos_token=EOS,
    )


def build_demo_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE of at most `vocab_size` ids trained on `texts`, with ERNIE's special ids."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS):
        raise ConfigError(f"vocab_size {vocab_size} cannot hold the 256 bytes and the special tokens")
    tokenizer = _wrap(_train_bpe_json(tuple(texts), vocab_size))
    assert len(tokenizer) <= vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


@functools.lru_cache(maxsize=None)
def _demo_tokenizer_json(vocab_size: int) -> str:
    from megatron_ernie.data.chat import render_text
    from megatron_ernie.data.sft import bundled_sft_path, conversation_texts

    return _train_bpe_json(tuple(render_text(m) for m in conversation_texts(bundled_sft_path())), vocab_size)


def demo_tokenizer(vocab_size: int = 512):
    """The demo tokenizer, trained once per process on the bundled SFT demo data.

    Each call returns a new tokenizer object (training is cached), so `save_pretrained` or a
    chat template set by one caller does not leak into another's."""
    return _wrap(_demo_tokenizer_json(vocab_size))
