"""The unified reward system's front door: route each sample to its reward sources, combine.

Configuration (a dict, e.g. the `rewards:` block of an RL recipe; see recipes/rewards/):

    sources:                       # name -> {type: <registered type>, **options}
      math:  {type: math}
      code:  {type: sandbox, concurrency: 2}
      bt:    {type: drm, checkpoint: runs/reward_model}
    routes:                        # first match wins; patterns are fnmatch globs
      - {domain: math, combine: {math: 1.0}}
      - {domain: vl_stem, combine: {bt: 1.0, math: 1.0}}          # final = bt + verifier
      - {domain: vl_puzzle, mode: min, combine: {judge_a: 1, judge_b: 1}}  # both must agree
      - {domain: "*", task: "*", combine: {bt: 1.0}}
    normalize: {mode: zscore, ...} # optional: per (domain, source) running standardisation
    concurrency: 4                 # sources scored in parallel

Combination modes: `sum` (weighted sum), `min` (weighted minimum: every source must give a high
reward, e.g. two judges that must agree), `fallback` (the first source, in `combine` order, that
did not fail). Each source scores all of its samples of a batch in one call; sources run
concurrently. A source that fails on a sample (or raises, or returns the wrong number of results)
gives reward 0 with the reason recorded; with normalisation on, a failed reward is excluded from
the running statistics and enters the combination as 0 (the stratum's mean). Nothing a source
does can crash the batch; every failure is counted (`stats`, `metrics()`).
"""
from __future__ import annotations

import fnmatch
import math
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from megatron_ernie.errors import ConfigError
from megatron_ernie.rewards.registry import build_source
from megatron_ernie.rewards.types import RewardResult, RewardSample, RewardSource

MODES = ("sum", "min", "fallback")


class RewardConfigError(ConfigError):
    """A bad `rewards` configuration, with the key named."""


@dataclass(frozen=True)
class Route:
    domain: str
    task: str
    combine: tuple[tuple[str, float], ...]  # (source, weight) in order
    mode: str = "sum"

    def matches(self, sample: RewardSample) -> bool:
        return fnmatch.fnmatchcase(sample.domain, self.domain) and fnmatch.fnmatchcase(sample.task, self.task)

    @property
    def label(self) -> str:
        return f"{self.domain}/{self.task}"


@dataclass
class RoutedReward:
    """The final reward of one sample and how it was obtained."""
    reward: float
    route: str | None
    components: dict[str, RewardResult] = field(default_factory=dict)
    normalized: dict[str, float] = field(default_factory=dict)  # what entered the combination
    failed: list[str] = field(default_factory=list)  # sources that could not score the sample
    raw: float = 0.0  # the same combination of the sources' raw (un-normalised) rewards

    def record(self) -> dict[str, Any]:
        """JSON-ready record (for rollout logs)."""
        return {"reward": self.reward, "route": self.route, "failed": self.failed,
                "components": {k: {"reward": r.reward, "used": self.normalized.get(k), "reason": r.reason,
                                   "failed": r.failed} for k, r in self.components.items()}}


def _parse_route(i: int, raw: Mapping, sources: Mapping) -> Route:
    where = f"rewards.routes[{i}]"
    unknown = set(raw) - {"domain", "task", "combine", "mode"}
    if unknown:
        raise RewardConfigError(f"{where}: unknown keys {sorted(unknown)} (expected domain, task, combine, mode)")
    combine = raw.get("combine")
    if not isinstance(combine, Mapping) or not combine:
        raise RewardConfigError(f"{where}.combine: a non-empty mapping source -> weight is required")
    for name, w in combine.items():
        if name not in sources:
            raise RewardConfigError(f"{where}.combine.{name}: no such source (defined: {sorted(sources)})")
        if not isinstance(w, (int, float)) or isinstance(w, bool):
            raise RewardConfigError(f"{where}.combine.{name}: weight must be a number, got {w!r}")
    mode = raw.get("mode", "sum")
    if mode not in MODES:
        raise RewardConfigError(f"{where}.mode={mode!r}: expected one of {MODES}")
    return Route(str(raw.get("domain", "*")), str(raw.get("task", "*")),
                 tuple((str(k), float(v)) for k, v in combine.items()), mode)


def _shared_backends(raw: Mapping) -> dict[str, Any]:
    """Judges configured with the same backend mapping share one backend (one model in memory)."""
    import json

    from megatron_ernie.rewards.generation import build_backend

    built: dict[str, Any] = {}
    out = {}
    for name, spec in raw.items():
        backend = spec.get("backend") if isinstance(spec, Mapping) else None
        if isinstance(backend, Mapping):
            key = json.dumps(backend, sort_keys=True, default=str)
            if key not in built:
                try:
                    built[key] = build_backend(backend)
                except (KeyError, TypeError, ValueError, OSError) as e:
                    raise RewardConfigError(f"rewards.sources.{name}.backend: {e}") from None
            out[name] = built[key]
    return out


def _build_sources(raw: Mapping) -> dict[str, RewardSource]:
    out = {}
    backends = _shared_backends(raw)
    for name, spec in raw.items():
        if isinstance(spec, RewardSource):  # an already-built source object (API use, tests)
            spec.name = name
            out[name] = spec
            continue
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise RewardConfigError(f"rewards.sources.{name}: needs a 'type' (see megatron_ernie.rewards.registry)")
        options = {k: v for k, v in spec.items() if k != "type"}
        if name in backends:
            options["backend"] = backends[name]
        try:
            out[name] = build_source(name, spec["type"], **options)
        except (KeyError, TypeError, ValueError) as e:
            message = str(e).strip("'\"")
            where = f"rewards.sources.{name}"
            raise RewardConfigError(message if message.startswith(where) else f"{where}: {message}") from None
    return out


def _checked_result(name: str, r) -> RewardResult:
    """A result that can enter statistics: a RewardResult with a finite reward (else a failure)."""
    if not isinstance(r, RewardResult):
        return RewardResult.failure(name, f"source returned {type(r).__name__}, not a RewardResult")
    try:
        finite = math.isfinite(float(r.reward))
    except (TypeError, ValueError):
        finite = False
    if not finite:
        return RewardResult.failure(name, f"non-finite reward {r.reward!r}", **r.details)
    return r


def _combine(mode: str, weighted: list[tuple[float, float]]) -> float:
    if mode == "sum":
        return sum(w * r for w, r in weighted)
    if mode == "min":
        return min(w * r for w, r in weighted)
    return weighted[0][0] * weighted[0][1] if weighted else 0.0  # fallback: the first usable source


class RewardRouter:
    def __init__(self, sources: Mapping[str, RewardSource], routes: Sequence[Route], normalizer=None,
                 concurrency: int = 4):
        self.sources = dict(sources)
        self.routes = list(routes)
        self.normalizer = normalizer
        self.concurrency = max(1, int(concurrency))
        self.stats: dict[str, Counter] = defaultdict(Counter)  # source -> scored / failed
        self.reasons: dict[str, Counter] = defaultdict(Counter)  # source -> failure reason -> count
        self.unrouted = 0

    @classmethod
    def from_config(cls, cfg: Mapping) -> "RewardRouter":
        cfg = _plain(cfg)
        unknown = set(cfg) - {"sources", "routes", "normalize", "concurrency"}
        if unknown:
            raise RewardConfigError(f"rewards: unknown keys {sorted(unknown)}")
        if not cfg.get("sources"):
            raise RewardConfigError("rewards.sources: at least one source is required")
        if not cfg.get("routes"):
            raise RewardConfigError("rewards.routes: at least one route is required")
        sources = _build_sources(cfg["sources"])
        routes = [_parse_route(i, r, sources) for i, r in enumerate(cfg["routes"])]
        normalizer = _build_normalizer(cfg.get("normalize"))
        return cls(sources, routes, normalizer, cfg.get("concurrency", 4))

    def route_for(self, sample: RewardSample) -> Route | None:
        return next((r for r in self.routes if r.matches(sample)), None)

    # --- scoring ------------------------------------------------------------------------------
    def score(self, samples: Sequence[RewardSample]) -> list[RoutedReward]:
        routes = [self.route_for(s) for s in samples]
        wanted: dict[str, list[int]] = defaultdict(list)  # source -> sample indices
        for i, route in enumerate(routes):
            for name, _ in (route.combine if route else ()):
                wanted[name].append(i)
        results = self._run_sources(samples, wanted)
        normalized = self._normalize(samples, results)
        return [self._finish(i, route, results, normalized) for i, route in enumerate(routes)]

    def _run_sources(self, samples, wanted) -> dict[str, dict[int, RewardResult]]:
        def run(name: str) -> tuple[str, dict[int, RewardResult]]:
            idx = wanted[name]
            return name, dict(zip(idx, self._safe_score(name, [samples[i] for i in idx])))

        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(wanted)))) as pool:
            return dict(pool.map(run, list(wanted)))

    def _safe_score(self, name: str, batch: list[RewardSample]) -> list[RewardResult]:
        try:
            out = list(self.sources[name].score(batch))
            if len(out) != len(batch):
                raise RuntimeError(f"returned {len(out)} results for {len(batch)} samples")
        except Exception as e:  # noqa: BLE001 - a broken source fails its samples, not the batch
            out = [RewardResult.failure(name, f"source error: {type(e).__name__}: {e}") for _ in batch]
        out = [_checked_result(name, r) for r in out]
        for r in out:
            self.stats[name]["failed" if r.failed else "scored"] += 1
            if r.failed:
                self.reasons[name][r.reason[:120]] += 1
        return out

    def _normalize(self, samples, results) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, by_index in results.items():
            ok = [i for i, r in by_index.items() if not r.failed]
            values = {i: 0.0 for i in by_index}
            if self.normalizer is None:
                values.update({i: by_index[i].reward for i in ok})
            elif ok:
                keys = [(samples[i].domain, name) for i in ok]
                normed = self.normalizer(keys, [by_index[i].reward for i in ok])
                values.update(dict(zip(ok, (float(v) for v in normed))))
            out[name] = values
        return out

    def _finish(self, i: int, route: Route | None, results, normalized) -> RoutedReward:
        if route is None:
            self.unrouted += 1
            return RoutedReward(0.0, None, failed=["<no route>"])
        comps = {name: results[name][i] for name, _ in route.combine}
        failed = [name for name, r in comps.items() if r.failed]
        usable = [(w, normalized[name][i]) for name, w in route.combine
                  if not (route.mode == "fallback" and comps[name].failed)]
        reward = _combine(route.mode, usable) if usable else 0.0
        raw = [(w, 0.0 if comps[name].failed else comps[name].reward) for name, w in route.combine
               if not (route.mode == "fallback" and comps[name].failed)]
        return RoutedReward(reward, route.label, comps, {n: normalized[n][i] for n in comps}, failed,
                            _combine(route.mode, raw) if raw else 0.0)

    def metrics(self) -> dict[str, float]:
        """Counters for the run's metrics: per source scored / failed, unrouted samples."""
        out = {"reward/unrouted": float(self.unrouted)}
        for name, c in sorted(self.stats.items()):
            out[f"reward/{name}/scored"] = float(c["scored"])
            out[f"reward/{name}/failed"] = float(c["failed"])
        return out


    def state_dict(self) -> dict:
        """What a resumed RL run needs to continue exactly: the running reward statistics and
        the failure counters."""
        return {"normalizer": self.normalizer.state_dict() if self.normalizer else None,
                "stats": {k: dict(v) for k, v in self.stats.items()},
                "reasons": {k: dict(v) for k, v in self.reasons.items()}, "unrouted": self.unrouted}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("normalizer") is None) != (self.normalizer is None):
            raise RewardConfigError("reward router state: normalisation on/off differs from this configuration "
                                    "(rewards.normalize)")
        if self.normalizer is not None:
            self.normalizer.load_state_dict(state["normalizer"])
        self.stats = defaultdict(Counter, {k: Counter(v) for k, v in state.get("stats", {}).items()})
        self.reasons = defaultdict(Counter, {k: Counter(v) for k, v in state.get("reasons", {}).items()})
        self.unrouted = int(state.get("unrouted", 0))


def _build_normalizer(spec):
    if not spec:
        return None
    from megatron_ernie.rewards.normalize import RewardNormalizer

    try:
        return RewardNormalizer(**dict(spec))
    except (TypeError, ValueError) as e:
        raise RewardConfigError(f"rewards.normalize: {e}") from None


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)
