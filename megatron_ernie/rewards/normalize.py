"""Per-stratum reward standardisation with running statistics.

Rewards from different domains and sources live on different scales (a 0/1 verifier, a GRM's
[0, 1] mean, a reward model's logits); `RewardNormalizer` keeps running statistics per key
(a `(domain, source)` tuple) and maps each reward with its own stratum's statistics.

Order: `normalizer(keys, rewards)` first *updates* the statistics with the batch, then
normalises the batch with the updated statistics - a batch is standardised against statistics
that include it, so the first batch of a stratum is centred on its own mean rather than on
nothing. `update` and `normalize` can also be called separately (e.g. normalise an eval batch
without updating).

Statistics: count, mean, population variance (ddof 0), min, max per key.
- `momentum=None`: exact over every reward seen (batches merged with Chan et al.'s parallel
  update), so two batches give the same statistics as their concatenation.
- `momentum=m` in (0, 1]: exponential moving average per update, PyTorch BatchNorm convention
  (new = (1 - m) * old + m * batch): mean' = mean + m * d with d = batch_mean - mean, and
  var' = (1 - m) * (var + m * d**2) + m * batch_var (the variance of the mixture). The first
  batch of a key initialises the statistics.
Modes: "zscore": (r - mean) / max(std, eps); "minmax": (r - min) / max(max - min, eps) (exact
min/max, not averaged); "none": rewards unchanged (statistics still tracked for metrics).
While a key has fewer than `min_count` rewards, `below_min` decides: "center" (r - mean) or
"pass" (r unchanged). `clip` bounds the normalised value to [-clip, clip].
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Hashable, Iterable, Sequence

from megatron_ernie.errors import CheckpointError, ConfigError

MODES = ("zscore", "minmax", "none")
BELOW_MIN = ("center", "pass")
STATE_VERSION = 1


@dataclass
class RunningStats:
    count: int = 0
    mean: float = 0.0
    var: float = 0.0          # population variance
    min: float = math.inf
    max: float = -math.inf

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    @staticmethod
    def of(values: Sequence[float]) -> "RunningStats":
        n = len(values)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / n
        return RunningStats(n, mean, var, min(values), max(values))

    def merge(self, batch: "RunningStats") -> None:
        """Exact merge (Chan et al.): the statistics of both sets of rewards together."""
        if self.count == 0:
            self._take(batch)
            return
        n = self.count + batch.count
        delta = batch.mean - self.mean
        m2 = self.var * self.count + batch.var * batch.count + delta * delta * self.count * batch.count / n
        self.mean += delta * batch.count / n
        self.var = m2 / n
        self._extend(batch, n)

    def blend(self, batch: "RunningStats", momentum: float) -> None:
        """EMA update: the statistics of the mixture (1 - momentum) * old + momentum * batch."""
        if self.count == 0:
            self._take(batch)
            return
        delta = batch.mean - self.mean
        self.var = (1 - momentum) * (self.var + momentum * delta * delta) + momentum * batch.var
        self.mean += momentum * delta
        self._extend(batch, self.count + batch.count)

    def _take(self, other: "RunningStats") -> None:
        self.count, self.mean, self.var, self.min, self.max = (
            other.count, other.mean, other.var, other.min, other.max)

    def _extend(self, batch: "RunningStats", count: int) -> None:
        self.count = count
        self.min, self.max = min(self.min, batch.min), max(self.max, batch.max)


class RewardNormalizer:
    def __init__(self, mode: str = "zscore", *, momentum: float | None = None, eps: float = 1e-6,
                 min_count: int = 2, below_min: str = "center", clip: float | None = None):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if below_min not in BELOW_MIN:
            raise ConfigError(f"below_min must be one of {', '.join(BELOW_MIN)}, got {below_min!r}")
        if momentum is not None and not 0 < momentum <= 1:
            raise ConfigError(f"momentum must be in (0, 1] or None (exact statistics), got {momentum}")
        if eps <= 0 or min_count < 1:
            raise ConfigError("eps must be > 0 and min_count >= 1")
        if clip is not None and clip <= 0:
            raise ConfigError(f"clip must be > 0 or None, got {clip}")
        self.mode, self.momentum, self.eps = mode, momentum, eps
        self.min_count, self.below_min, self.clip = min_count, below_min, clip
        self.stats: dict[Hashable, RunningStats] = {}

    # --- updating and normalising ---
    def update(self, keys: Sequence[Hashable], rewards: Sequence[float]) -> None:
        """Fold a batch into each key's statistics (one EMA step per key per call)."""
        for key, values in _by_key(keys, rewards).items():
            batch = RunningStats.of(values)
            stats = self.stats.setdefault(key, RunningStats())
            if self.momentum is None:
                stats.merge(batch)
            else:
                stats.blend(batch, self.momentum)

    def normalize(self, keys: Sequence[Hashable], rewards: Sequence[float]) -> list[float]:
        """Rewards mapped with their key's current statistics (unseen keys pass through)."""
        keys, rewards = _checked(keys, rewards)
        return [self._one(self.stats.get(_key_in(k)), r) for k, r in zip(keys, rewards)]

    def __call__(self, keys: Sequence[Hashable], rewards: Sequence[float]) -> list[float]:
        """Update with the batch, then normalise it (see the module docstring)."""
        self.update(keys, rewards)
        return self.normalize(keys, rewards)

    def _one(self, stats: RunningStats | None, r: float) -> float:
        if self.mode == "none" or stats is None or stats.count == 0:
            return r
        if stats.count < self.min_count:
            out = r - stats.mean if self.below_min == "center" else r
        elif self.mode == "zscore":
            out = (r - stats.mean) / max(stats.std, self.eps)
        else:
            out = (r - stats.min) / max(stats.max - stats.min, self.eps)
        return min(max(out, -self.clip), self.clip) if self.clip is not None else out

    # --- metrics and checkpoints ---
    def summary(self) -> dict[str, dict[str, float]]:
        """{"domain/source": {"count", "mean", "std", "min", "max"}} for logging."""
        return {_key_name(k): {"count": s.count, "mean": s.mean, "std": s.std, "min": s.min, "max": s.max}
                for k, s in self.stats.items()}

    def state_dict(self) -> dict:
        """JSON-serialisable statistics (keys as lists) plus the settings they were made under."""
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "momentum": self.momentum,
            "stats": [{"key": _key_out(k), **asdict(s)} for k, s in self.stats.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the statistics (they are valid under any mode or momentum: the recorded
        settings are for reference)."""
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"reward normalizer state version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        stats = {}
        for entry in state["stats"]:
            entry = dict(entry)
            key = _key_in(entry.pop("key"))
            stats[key] = RunningStats(**entry)
        self.stats = stats


def strata(samples: Sequence, results: Sequence) -> list[tuple[str, str]]:
    """The (domain, source) key of each scored sample."""
    return [(s.domain, r.source) for s, r in zip(samples, results, strict=True)]


def _checked(keys: Sequence[Hashable], rewards: Iterable[float]) -> tuple[list, list[float]]:
    keys, rewards = list(keys), [float(r) for r in rewards]
    if len(keys) != len(rewards):
        raise ValueError(f"{len(keys)} keys for {len(rewards)} rewards")
    for k, r in zip(keys, rewards):
        if not math.isfinite(r):
            # one NaN would poison the key's statistics for the rest of the run
            raise ValueError(f"reward {r} for {k!r} is not finite")
    return keys, rewards


def _by_key(keys, rewards) -> dict[Hashable, list[float]]:
    keys, rewards = _checked(keys, rewards)
    out: dict[Hashable, list[float]] = {}
    for k, r in zip(keys, rewards):
        out.setdefault(_key_in(k), []).append(r)
    return out


def _key_in(key) -> Hashable:
    return tuple(key) if isinstance(key, list) else key


def _key_out(key):
    return list(key) if isinstance(key, tuple) else key


def _key_name(key) -> str:
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)
