"""Model families: `ernie` (ERNIE 4.5 text, dense and MoE)."""
