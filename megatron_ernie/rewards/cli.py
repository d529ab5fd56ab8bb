"""Command lines of the reward system.

    megatron-ernie-score --rewards recipes/rewards/ernie45_llm.yaml --samples s.jsonl --out scored.jsonl
    megatron-ernie-prefilter --rewards R.yaml --prompts p.jsonl --model <HF dir> --k 8 --out kept.jsonl

Sample / prompt JSONL: one object per line with `prompt` and the RewardSample fields the routes
need (`response` for scoring; `domain`, `task`, `reference`, `tests`, `checklist`, `group`;
anything else is kept in `meta`). Errors name the file and line; outputs are written atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from megatron_ernie.errors import UserError
from megatron_ernie.rewards.types import RewardSample

_FIELDS = {f.name for f in dataclasses.fields(RewardSample)} - {"meta"}


class InputError(UserError, ValueError):
    """A command-line input that cannot be used (samples / prompts file, --rewards config); the
    message names the file (and line)."""


def read_records(path: Path, need_response: bool) -> list[dict]:
    from megatron_ernie.data.sft import read_jsonl
    from megatron_ernie.errors import DataError

    records = []
    try:
        for lineno, obj in read_jsonl(path):
            if not isinstance(obj.get("prompt"), str):
                raise InputError(f"{path}:{lineno}: each line must be an object with a string 'prompt'")
            if need_response and not isinstance(obj.get("response"), str):
                raise InputError(f"{path}:{lineno}: missing string 'response'")
            records.append(obj)
    except DataError as e:  # malformed JSON, or the file missing (DataFileNotFoundError)
        raise InputError(str(e)) from None
    if not records:
        raise InputError(f"{path}: no records")
    return records


def to_sample(record: dict) -> RewardSample:
    known = {k: v for k, v in record.items() if k in _FIELDS}
    meta = {k: v for k, v in record.items() if k not in _FIELDS}
    return RewardSample(**{"response": "", **known}, meta=meta)


def load_router(path: str):
    import yaml
    from omegaconf import OmegaConf

    from megatron_ernie.rewards.router import RewardConfigError, RewardRouter

    if not Path(path).is_file():
        raise InputError(f"--rewards {path}: no such file")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    try:
        return RewardRouter.from_config(cfg)
    except RewardConfigError as e:
        raise InputError(f"{path}: {e}") from None


def _score_args(argv):
    p = argparse.ArgumentParser(prog="megatron-ernie-score", description="Score responses with a reward config.")
    p.add_argument("--rewards", required=True, help="router config YAML (see recipes/rewards/)")
    p.add_argument("--samples", required=True, type=Path, help="JSONL with prompt, response, domain, ...")
    p.add_argument("--out", required=True, type=Path, help="JSONL: each input record + its reward record")
    p.add_argument("--batch-size", type=int, default=64)
    return p.parse_args(argv)


def score_main(argv=None) -> int:
    from tqdm import tqdm

    from megatron_ernie.runtime.atomic import atomic_file

    args = _score_args(argv)
    try:
        records = read_records(args.samples, need_response=True)
        router = load_router(args.rewards)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with atomic_file(args.out) as f, tqdm(total=len(records), unit="sample", desc="score") as bar:
        for start in range(0, len(records), args.batch_size):
            batch = records[start:start + args.batch_size]
            for record, scored in zip(batch, router.score([to_sample(r) for r in batch])):
                f.write(json.dumps({**record, "reward": scored.record()}, ensure_ascii=False, default=str) + "\n")
            bar.update(len(batch))
    print(json.dumps(router.metrics()))
    return 0


def _prefilter_args(argv):
    p = argparse.ArgumentParser(prog="megatron-ernie-prefilter",
                                description="Drop prompts the current model always or never solves.")
    p.add_argument("--rewards", required=True, help="router config YAML scoring the sampled responses")
    p.add_argument("--prompts", required=True, type=Path)
    p.add_argument("--model", required=True, help="the current policy: an HF model directory, or a Megatron "
                   "checkpoint / training run (sampled with the in-process engine, prompts rendered as in RL)")
    p.add_argument("--no-thinking", dest="thinking", action="store_false", default=None,
                   help="engine sampling: prompts end with an empty think block (non-thinking mode)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's; 'demo': bundled)")
    p.add_argument("--out", required=True, type=Path, help="kept prompts, JSONL with pass_rate")
    p.add_argument("--k", type=int, default=8, help="responses per prompt")
    p.add_argument("--low", type=float, default=0.0, help="drop prompts with pass rate <= low")
    p.add_argument("--high", type=float, default=1.0, help="drop prompts with pass rate >= high")
    p.add_argument("--pass-threshold", type=float, default=0.5, help="a response passes at reward >= this")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call")
    return p.parse_args(argv)


def prefilter_main(argv=None, make_sampler=None) -> int:
    """`make_sampler(args)`: the model's sampler (default: an HF directory through transformers;
    the console script passes rl/cli's, which also samples Megatron checkpoints)."""
    from megatron_ernie.rewards.filters import prefilter_prompts

    args = _prefilter_args(argv)
    try:
        records = read_records(args.prompts, need_response=False)
        router = load_router(args.rewards)
        sampler = (make_sampler or hf_sampler)(args)
    except (UserError, OSError, ValueError) as e:  # the model: a missing directory, an unusable config
        print(f"error: {e}", file=sys.stderr)
        return 2
    scorer = lambda samples: [r.reward for r in router.score(samples)]  # noqa: E731 - combined rewards
    result = prefilter_prompts([to_sample(r) for r in records], sampler, scorer, k=args.k, low=args.low,
                               high=args.high, pass_threshold=args.pass_threshold, batch_size=args.batch_size,
                               output=args.out, keep_in_memory=False)
    summary = {**result.counts, **router.metrics(), "pass_rate_histogram": _histogram(result.pass_rates, args.k)}
    write_summary(args.out, summary, result.pass_rates, args)
    print(json.dumps({k: v for k, v in summary.items() if k != "pass_rate_histogram"}))
    return 0


def hf_sampler(args):
    """Sampling an HF directory through transformers (its chat template)."""
    from megatron_ernie.rewards.filters import backend_sampler
    from megatron_ernie.rewards.generation import HFGenerationBackend

    backend = HFGenerationBackend.from_pretrained(args.model, tokenizer=args.tokenizer)
    return backend_sampler(backend, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)


def _histogram(rates: list[float], k: int) -> dict[str, int]:
    """Prompts per number of solved samples (0..k): what the pre-filter saw."""
    counts = {f"{j}/{k}": 0 for j in range(k + 1)}
    for r in rates:
        counts[f"{round(r * k)}/{k}"] += 1
    return counts


def write_summary(out: Path, summary: dict, rates: list[float], args) -> None:
    """`<out>.summary.json` and `<out>.pass_rates.png` (the pass-rate histogram, kept band shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_ernie.runtime.atomic import atomic_file

    with atomic_file(out.with_name(out.name + ".summary.json")) as f:
        json.dump(summary, f, indent=1)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(rates, bins=[(j - 0.5) / args.k for j in range(args.k + 2)], color="tab:blue", alpha=0.8)
    ax.axvspan(args.low, args.high, color="tab:green", alpha=0.12, label="kept (strictly inside)")
    ax.set_xlabel(f"pass rate over k={args.k} samples")
    ax.set_ylabel("prompts")
    ax.legend(loc="upper center")
    fig.tight_layout()
    png = out.with_name(out.name + ".pass_rates.png")
    tmp = png.with_name("." + png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
