"""What goes into the reward system and what comes out.

Every reward source — verifier, sandbox, judge, reward model, checklist — takes a batch of
`RewardSample`s and returns one `RewardResult` per sample. A source never raises for a bad sample:
it returns reward 0 with `failed=True` and a `reason`, and the router counts it. A source type is
made buildable by name (`type:` in a recipe) with `@register_source`; `registry.py` builds them.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class RewardSample:
    """One response to score.

    `tests` (code): a list of {"input": str, "output": str} stdin/stdout cases, or
    {"code": str} assertion snippets run after the response's code.
    `checklist`: a list of criteria dicts (see rewards/checklist.py).
    `group`: the prompt group the sample belongs to (filters work on groups).
    """
    prompt: str
    response: str
    domain: str = "general"
    task: str = "default"
    reference: str | None = None
    tests: tuple | list | None = None
    checklist: tuple | list | None = None
    group: str = ""
    uid: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class RewardResult:
    """One source's verdict on one sample. `failed`: the source could not score it (the reward is
    then 0 and `reason` says why); a wrong answer is not a failure, it is reward 0 with failed=False."""
    reward: float
    source: str
    reason: str = ""
    failed: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def failure(source: str, reason: str, **details) -> "RewardResult":
        return RewardResult(0.0, source, reason=reason, failed=True, details=details)


@runtime_checkable
class RewardSource(Protocol):
    name: str

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]: ...


class PerSampleSource:
    """Base for sources that score samples one at a time: batching over a bounded thread pool,
    and an exception in `score_one` becomes a failed result (reward 0 + reason), never a crash."""

    name = "source"
    concurrency = 1

    def score_one(self, sample: RewardSample) -> RewardResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def _safe(self, sample: RewardSample) -> RewardResult:
        t0 = time.perf_counter()
        try:
            res = self.score_one(sample)
        except Exception as e:  # noqa: BLE001 - a bad sample must not take down the batch
            res = RewardResult.failure(self.name, f"{type(e).__name__}: {e}")
        res.details.setdefault("seconds", round(time.perf_counter() - t0, 6))
        return res

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        if self.concurrency <= 1 or len(samples) <= 1:
            return [self._safe(s) for s in samples]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(samples))) as pool:
            return list(pool.map(self._safe, samples))


# --- source types by name: the table `registry.build_source` reads --------------------------
FACTORIES: dict[str, Callable[..., RewardSource]] = {}


def register_source(type_name: str):
    """Class or function decorator: `@register_source("math")` makes `type: math` buildable."""
    def deco(factory):
        if type_name in FACTORIES and FACTORIES[type_name] is not factory:
            raise ValueError(f"reward source type {type_name!r} registered twice")
        FACTORIES[type_name] = factory
        return factory
    return deco
