"""The one-command demo: ERNIE 4.5's post-training chain on the tiny MoE, on CPU.

    python -m megatron_ernie.demo                       # SFT -> offline UPO -> PPO stages 1-3 (~10 min, 2 cores)
    python -m megatron_ernie.demo --sft-only            # just the SFT stage on the bundled chat data
    python -m megatron_ernie.demo --steps 3 --out runs/smoke   # every stage 3 steps (a smoke run)
    torchrun --nproc-per-node 2 -m megatron_ernie.demo --ep 2  # expert parallel on 2 ranks

It runs the `chain` pipeline recipe (recipes/recipe/chain.yaml; `--sft-only`: `demo`) through the
same entry point as every run (`python -m megatron_ernie.train recipe=chain`); any further argument
is a Hydra override applied to every stage. At the end it prints each stage's held-out accuracy
(before -> after), the PPO stages' step-time breakdown, and where the curves and checkpoints are.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# where a PPO step goes (metrics.jsonl keys): rollout generation, reward scoring, the forward-only
# passes (old / reference log-probs, values), the updates, the refit of the rollout engine
BREAKDOWN = (("rollout", "rollout/generate_s"), ("reward", "rollout/reward_s"),
             ("ref/old log-probs + values", "time/prepare_s"), ("train", "time/train_s"), ("refit", "rollout/refit_s"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="training steps of every stage (recipe defaults otherwise)")
    p.add_argument("--out", default=None, help="output directory (default runs/chain, runs/demo with --sft-only)")
    p.add_argument("--sft-only", action="store_true", help="only the SFT stage (recipe=demo)")
    p.add_argument("--tp", type=int, help="tensor parallel size")
    p.add_argument("--pp", type=int, help="pipeline parallel size")
    p.add_argument("--ep", type=int, help="expert parallel size")
    a, extra = p.parse_known_args(argv)
    recipe = "demo" if a.sft_only else "chain"
    overrides = [f"recipe={recipe}", f"out_dir={a.out or 'runs/' + recipe}"]
    if a.steps:
        overrides.append(f"train.steps={a.steps}")
    overrides += [f"parallel.{k}={v}" for k, v in (("tp", a.tp), ("pp", a.pp), ("ep", a.ep)) if v]
    from megatron_ernie.train import _is_rank_zero, main as train_main

    results = train_main(overrides + extra)
    if results and _is_rank_zero():
        print(summary(results))
    return results


def summary(results) -> str:
    """Held-out accuracy per stage and the PPO step-time breakdown, as text."""
    lines = []
    for r in results:
        if r.evaluation:
            first, last = min(r.evaluation), max(r.evaluation)
            a, b = r.evaluation[first], r.evaluation[last]
            domains = sorted({k.split("/")[1] for k in b if k.count("/") == 2 and k.endswith("/accuracy")})
            per = ", ".join(f"{d} {a.get(f'eval/{d}/accuracy', math.nan):.2f} -> {b[f'eval/{d}/accuracy']:.2f}"
                            for d in domains)
            lines.append(f"{Path(r.out_dir).name}: held-out accuracy {a.get('eval/accuracy', math.nan):.2f} -> "
                         f"{b['eval/accuracy']:.2f} (steps {first} -> {last}; {per})")
    table = breakdown([Path(r.out_dir) / "metrics.jsonl" for r in results])
    if table:
        lines += ["PPO step time (mean seconds per step over the PPO stages):", table]
    return "\n".join(lines)


def breakdown(paths: list[Path]) -> str:
    sums, steps = {name: 0.0 for name, _ in BREAKDOWN}, 0
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "critic/loss" not in row:  # PPO training rows only (not evaluations or other stages)
                continue
            steps += 1
            for name, key in BREAKDOWN:
                sums[name] += float(row.get(key, 0.0))
    if not steps:
        return ""
    total = sum(sums.values())
    return "\n".join(f"  {name:<28}{s / steps:8.3f} s  {100 * s / max(total, 1e-12):5.1f} %" for name, s in sums.items())


if __name__ == "__main__":
    main()
