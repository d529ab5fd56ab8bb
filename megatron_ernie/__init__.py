"""megatron-ernie: ERNIE 4.5 post-training on Megatron-Core."""
__version__ = "0.1.0"
