"""Run a producer ahead of its consumer in a background thread, bounded in bytes.

Conversion is read → transform → write; file I/O and torch copies release the GIL, so running
the reading side in a thread overlaps it with the writing side. The bound keeps memory at
`max_bytes` of produced-but-unwritten tensors.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], size_of: Callable[[T], int], max_bytes: int = 256 * 2**20) -> Iterator[T]:
    """Yield `items` in order while a thread produces them up to `max_bytes` ahead.

    An exception in the producer is re-raised in the consumer; closing the generator stops the
    producer at its next item.
    """
    q: queue.Queue = queue.Queue()
    budget = threading.Condition()
    state = {"bytes": 0, "stop": False}

    def produce():
        try:
            for item in items:
                n = size_of(item)
                with budget:
                    budget.wait_for(lambda: state["stop"] or state["bytes"] == 0 or state["bytes"] + n <= max_bytes)
                    if state["stop"]:
                        return
                    state["bytes"] += n
                q.put((item, n))
            q.put((_DONE, 0))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((e, -1))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, n = q.get()
            if item is _DONE:
                return
            if n == -1:
                raise item
            with budget:
                state["bytes"] -= n
                budget.notify_all()
            yield item
    finally:
        with budget:
            state["stop"] = True
            budget.notify_all()
        thread.join(timeout=60)
