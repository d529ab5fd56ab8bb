#!/usr/bin/env python
"""ERNIE 4.5 checkpoints: Hugging Face <-> Megatron-Core. See `--help` and docs/conversion.md."""
import sys

from megatron_ernie.conversion.cli import convert_main

if __name__ == "__main__":  # dist_checkpointing may start worker processes: keep the guard
    sys.exit(convert_main())
