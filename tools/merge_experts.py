#!/usr/bin/env python
"""Expert-parameter merging (thinking/non-thinking fusion). See `--help` and docs/conversion.md."""
import sys

from megatron_ernie.conversion.cli import merge_main

if __name__ == "__main__":
    sys.exit(merge_main())
