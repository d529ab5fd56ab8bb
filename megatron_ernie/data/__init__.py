"""Data room: tokenizers, the chat format, SFT and preference datasets (see docs/architecture.md)."""
