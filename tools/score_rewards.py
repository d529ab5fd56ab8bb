#!/usr/bin/env python
"""Score a JSONL of responses with a reward-router config. See `--help` and docs/rewards.md."""
import sys

from megatron_ernie.rewards.cli import score_main

if __name__ == "__main__":
    sys.exit(score_main())
