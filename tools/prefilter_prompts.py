#!/usr/bin/env python
"""Drop prompts the current model always or never solves (RL data filtering). See `--help`."""
import sys

from megatron_ernie.rl.cli import prefilter_main

if __name__ == "__main__":
    sys.exit(prefilter_main())
