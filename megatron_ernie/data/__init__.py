"""Data room: tokenizers and batch producers (plain text now; chat/SFT, pairs and prompts next)."""
