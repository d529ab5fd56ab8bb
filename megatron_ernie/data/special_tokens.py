"""ERNIE 4.5's special and think tokens, as text: what the chat format writes and the tokenizers
know. The bottom of the data room: it imports nothing, so both `chat.py` and `tokenizer.py`
(which trains the demo tokenizer on chat-rendered data) can depend on it."""
from __future__ import annotations

UNK = "<unk>"
BOS = "<|begin_of_sentence|>"
EOS = "<|end_of_sentence|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SPECIAL_TOKENS = (UNK, BOS, EOS)            # ids 0, 1, 2 (pad = unk = 0, as in ERNIE's configs)
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)    # ids 3, 4
