"""One entry point for every stage and pipeline:

    python -m megatron_ernie.train recipe=sft model=ernie45_tiny_moe parallel.tp=2 train.steps=200
    torchrun --nproc-per-node 2 -m megatron_ernie.train recipe=sft parallel.tp=2
    python -m megatron_ernie.train recipe=demo          # a pipeline recipe: its stages in order
    python -m megatron_ernie.train --show recipe=sft    # print the composed, validated config; run nothing

Arguments are Hydra overrides of `recipes/` (see recipes/README.md); unknown keys and wrong
types are refused with the key named. A pipeline runs its stages in order, each starting from the
previous stage's final checkpoint (a PPO stage after a PPO stage: actor and critic), each in
`<out_dir>/<NN>_<name>`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from megatron_ernie.errors import UserError
from megatron_ernie.training.config import RunConfig, compose


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) in ("0", "")


def run(cfg: RunConfig, progress: bool = True):
    """One stage: the algorithm its `stage:` names, on the one training loop."""
    from megatron_ernie import algorithms
    from megatron_ernie.training import loop

    return loop.run(cfg, algorithms.build(cfg.stage.value), progress=progress)


def run_pipeline(cfg: RunConfig, cli: list[str], progress: bool = True) -> list:
    """Stages of a pipeline recipe; CLI overrides apply to every stage (and win)."""
    results, previous, previous_stage = [], None, None
    passthrough = [o for o in cli if not o.startswith("recipe=")]
    for i, step in enumerate(cfg.pipeline):
        overrides = [f"recipe={step.recipe}", *step.overrides, *passthrough]
        stage_cfg = compose(overrides)
        stage_cfg.out_dir = str(Path(cfg.out_dir) / f"{i:02d}_{stage_cfg.name}")
        if previous is not None and not any(o.startswith("model.init_from=") for o in passthrough):
            stage_cfg.model.init_from = str(previous)
            if stage_cfg.stage.value == "ppo" and previous_stage == "ppo" and stage_cfg.rl.ppo.critic_init is None:
                stage_cfg.rl.ppo.critic_init = str(previous)  # PPO after PPO: the critic carries on too
        result = run(stage_cfg, progress=progress)
        results.append(result)
        previous, previous_stage = result.checkpoint, stage_cfg.stage.value
    return results


def main(argv: list[str] | None = None, progress: bool = True) -> list:
    from megatron_ernie.runtime import shutdown

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return []
    show = "--show" in argv
    argv = [a for a in argv if a != "--show"]
    try:
        cfg = compose(argv)
        if show:
            from megatron_ernie.training.config import to_yaml

            print(to_yaml(cfg), end="")
            return []
        results = run_pipeline(cfg, argv, progress) if cfg.pipeline else [run(cfg, progress=progress)]
    except UserError as e:  # bad recipe, data, layout, checkpoint or weights: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if _is_rank_zero():
        for r in results:
            losses = list(r.losses.values())
            trend = f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; " if losses else ""
            print(f"{r.out_dir}: {trend}checkpoint {r.checkpoint}; curves {r.curves or '(written by the last rank)'}")
    shutdown()
    return results


if __name__ == "__main__":
    main()
