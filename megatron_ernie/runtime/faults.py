"""Crash-test hooks: `MEGATRON_ERNIE_FAULT=<point>` makes this process kill itself with SIGKILL
when it reaches `<point>` (e.g. `checkpoint_written:4`: a save whose shards are all written but
not yet published). Used by the resume tests; a no-op unless the variable names the point."""
from __future__ import annotations

import os
import signal


def maybe_fail(point: str) -> None:
    if os.environ.get("MEGATRON_ERNIE_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
