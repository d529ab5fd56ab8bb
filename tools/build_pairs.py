#!/usr/bin/env python
"""Offline UPO pairs: sample, score, keep (best, worst) per prompt. See `--help` and megatron_ernie/rl/pairs.py."""
import sys

from megatron_ernie.rl.pairs import main

if __name__ == "__main__":
    sys.exit(main())
