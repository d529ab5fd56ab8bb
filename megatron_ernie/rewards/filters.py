"""Filters that keep RL batches and prompt sets informative.

- `filter_groups`: over prompt groups (samples sharing `group`), drop the groups that teach a
  group-relative method (GRPO, DAPO) nothing: all responses correct, all wrong, or rewards of
  (population) variance below `min_variance`. Each dropped group is counted under the first reason
  that applies, in that order, so the counts add up to the groups dropped.
- `prefilter_prompts`: before training, sample k responses per prompt with the current model,
  score them, and keep the prompts whose pass rate lies strictly between `low` and `high`
  (default: drop the ones never or always solved). Streams over batches with a progress bar and
  can write the kept prompts as JSONL, atomically: the file appears complete or not at all, and
  an existing file is left untouched when the pass fails.

Filters work on raw rewards (before any normalisation).
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from megatron_ernie.errors import ConfigError, DataError
from megatron_ernie.rewards.types import RewardResult, RewardSample
from megatron_ernie.runtime.atomic import atomic_file

DROP_REASONS = ("all_correct", "all_wrong", "low_variance")
Sampler = Callable[[list[str], int], list[list[str]]]


# --- group filter ----------------------------------------------------------------------------
@dataclass
class GroupFilterResult:
    kept_groups: list[str]           # in order of first appearance
    kept_indices: list[int]          # the kept samples, in input order
    dropped: dict[str, str]          # group -> reason
    counts: dict[str, int]           # groups: total, kept, and one count per DROP_REASONS entry


def _reward_of(value) -> float:
    return float(value.reward if isinstance(value, RewardResult) else value)


def _group_of(i: int, item) -> str:
    group = item if isinstance(item, str) else getattr(item, "group", None)
    if not isinstance(group, str) or not group:
        raise DataError(f"sample {i} has no group (filters work on prompt groups)")
    return group


def population_variance(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def filter_groups(items: Sequence[RewardSample | str], rewards: Sequence[float | RewardResult], *,
                  correct: Sequence[bool] | None = None, correct_threshold: float = 0.5,
                  drop_all_correct: bool = True, drop_all_wrong: bool = True,
                  min_variance: float | None = None) -> GroupFilterResult:
    """`items`: samples (their `group`) or group ids; `rewards`: floats or RewardResults.
    A sample is correct by the explicit `correct` flags when given, else when
    reward >= correct_threshold. `min_variance=None` disables the variance filter."""
    if len(items) != len(rewards) or (correct is not None and len(correct) != len(items)):
        raise ValueError("items, rewards (and correct) must have the same length")
    values = [_reward_of(r) for r in rewards]
    flags = [bool(c) for c in correct] if correct is not None else [v >= correct_threshold for v in values]
    members: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        members.setdefault(_group_of(i, item), []).append(i)
    dropped = {}
    for group, idx in members.items():
        reason = _drop_reason([values[i] for i in idx], [flags[i] for i in idx],
                              drop_all_correct, drop_all_wrong, min_variance)
        if reason:
            dropped[group] = reason
    kept_groups = [g for g in members if g not in dropped]
    kept = set(kept_groups)
    counts = {"total": len(members), "kept": len(kept_groups),
              **{r: sum(1 for v in dropped.values() if v == r) for r in DROP_REASONS}}
    return GroupFilterResult(kept_groups, [i for i, item in enumerate(items) if _group_of(i, item) in kept],
                             dropped, counts)


def _drop_reason(values, flags, drop_all_correct, drop_all_wrong, min_variance) -> str | None:
    if drop_all_correct and all(flags):
        return "all_correct"
    if drop_all_wrong and not any(flags):
        return "all_wrong"
    if min_variance is not None and population_variance(values) < min_variance:
        return "low_variance"
    return None


# --- prompt pre-filter -----------------------------------------------------------------------
@dataclass
class PrefilterResult:
    kept: list[Any]                  # the kept prompt records, in input order
    pass_rates: list[float]          # one per input prompt, in input order
    counts: dict[str, int] = field(default_factory=dict)  # total, kept, too_hard, too_easy, failed_scores


def backend_sampler(backend, *, max_new_tokens: int, temperature: float = 1.0,
                    seed: int | None = None) -> Sampler:
    """A sampler over a `GenerationBackend`: one `generate` call per batch (each prompt repeated
    k times). With a seed, call n uses seed + n, so a rerun samples the same responses."""
    calls = [0]

    def sample(prompts: list[str], k: int) -> list[list[str]]:
        flat = [p for p in prompts for _ in range(k)]
        call_seed = None if seed is None else seed + calls[0]
        calls[0] += 1
        out = list(backend.generate(flat, max_new_tokens=max_new_tokens, temperature=temperature, seed=call_seed))
        if len(out) != len(flat):
            raise ValueError(f"backend returned {len(out)} outputs for {len(flat)} prompts")
        return [out[i * k:(i + 1) * k] for i in range(len(prompts))]

    return sample


def prefilter_prompts(prompts: Iterable[RewardSample | Mapping | str], sampler: Sampler, scorer, *,
                      k: int = 8, low: float = 0.0, high: float = 1.0, pass_threshold: float = 0.5,
                      batch_size: int = 64, output: str | Path | None = None, progress: bool = True,
                      keep_in_memory: bool = True) -> PrefilterResult:
    """Keep prompts whose pass rate p satisfies low < p < high.

    `prompts`: RewardSamples (response ignored), dicts with a "prompt" key (other RewardSample
    fields - reference, domain, tests, ... - are used for scoring; the rest go to meta), or
    strings. `sampler(prompt_texts, k)` returns k responses per prompt (`backend_sampler` adapts
    a GenerationBackend). `scorer`: a reward source (`.score(samples)`) or a callable on a list
    of samples, returning RewardResults or floats; a response passes when its reward >=
    `pass_threshold` and it did not fail. `output`: write the kept records as JSONL (each with a
    "pass_rate" field), atomically. Exceptions from the sampler or scorer propagate."""
    _check_bounds(k, low, high, batch_size)
    result = PrefilterResult([], [], {"total": 0, "kept": 0, "too_hard": 0, "too_easy": 0, "failed_scores": 0})
    total = len(prompts) if hasattr(prompts, "__len__") else None
    with _progress(total, progress) as bar, _jsonl_writer(output) as write:
        for batch in _batches(prompts, batch_size):
            rates, failed = _pass_rates(batch, len(result.pass_rates), sampler, scorer, k, pass_threshold)
            result.counts["failed_scores"] += failed
            for record, rate in zip(batch, rates):
                result.pass_rates.append(rate)
                verdict = _verdict(rate, low, high)
                result.counts["total"] += 1
                result.counts[verdict] += 1
                if verdict == "kept":
                    write(_output_record(record, rate))
                    if keep_in_memory:
                        result.kept.append(record)
            bar.update(len(batch))
    return result


def _check_bounds(k: int, low: float, high: float, batch_size: int) -> None:
    if k < 1 or batch_size < 1:
        raise ConfigError("k and batch_size must be >= 1")
    if not 0.0 <= low < high <= 1.0:
        raise ConfigError(f"need 0 <= low < high <= 1, got low={low}, high={high}")


def _verdict(rate: float, low: float, high: float) -> str:
    if rate <= low:
        return "too_hard"
    if rate >= high:
        return "too_easy"
    return "kept"


def _batches(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _pass_rates(batch: list, offset: int, sampler: Sampler, scorer, k: int,
                pass_threshold: float) -> tuple[list[float], int]:
    """Pass rates of one batch (one sampler call, one scorer call) and its failed-score count."""
    templates = [_as_sample(record, offset + i) for i, record in enumerate(batch)]
    responses = sampler([t.prompt for t in templates], k)
    if len(responses) != len(batch) or any(len(r) != k for r in responses):
        raise ValueError(f"sampler must return {k} responses for each of {len(batch)} prompts")
    samples = [dataclasses.replace(t, response=resp, uid=f"{t.group}/{j}")
               for t, rs in zip(templates, responses) for j, resp in enumerate(rs)]
    scores = list(scorer.score(samples) if hasattr(scorer, "score") else scorer(samples))
    if len(scores) != len(samples):
        raise ValueError(f"scorer returned {len(scores)} results for {len(samples)} samples")
    failed = [isinstance(s, RewardResult) and s.failed for s in scores]
    passed = [not f and _reward_of(s) >= pass_threshold for s, f in zip(scores, failed)]
    rates = [sum(passed[i * k:(i + 1) * k]) / k for i in range(len(batch))]
    return rates, sum(failed)


_SAMPLE_FIELDS = {f.name for f in dataclasses.fields(RewardSample)} - {"response", "meta"}


def _as_sample(record, index: int) -> RewardSample:
    """A scoring template for a prompt record; its group defaults to the prompt's index."""
    if isinstance(record, RewardSample):
        sample = record
    elif isinstance(record, str):
        sample = RewardSample(prompt=record, response="")
    elif isinstance(record, Mapping) and isinstance(record.get("prompt"), str):
        known = {k: v for k, v in record.items() if k in _SAMPLE_FIELDS}
        meta = {**record.get("meta", {}), **{k: v for k, v in record.items() if k not in _SAMPLE_FIELDS | {"meta"}}}
        sample = RewardSample(response="", meta=meta, **known)
    else:
        raise DataError(f"prompt {index} must be a RewardSample, a string, or a mapping with a string 'prompt'")
    return sample if sample.group else dataclasses.replace(sample, group=str(index))


def _output_record(record, rate: float) -> dict:
    if isinstance(record, RewardSample):  # the input record again (a prompt file an RL stage reads)
        fields = dataclasses.asdict(record)
        out = {k: v for k, v in fields.items() if k not in ("response", "group", "meta") and v not in (None, "")}
        out.update(record.meta)
    elif isinstance(record, str):
        out = {"prompt": record}
    else:
        out = dict(record)
    return {**out, "pass_rate": rate}


@contextmanager
def _progress(total: int | None, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, disable=not enabled, unit="prompt", desc="prefilter")
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def _jsonl_writer(path: str | Path | None):
    """Yields write(record); the file appears complete or not at all (runtime/atomic.py)."""
    if path is None:
        yield lambda record: None
        return
    with atomic_file(path) as f:
        yield lambda record: f.write(json.dumps(record, ensure_ascii=False) + "\n")
