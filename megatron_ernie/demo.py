"""The one-command demo: SFT of the tiny ERNIE 4.5 MoE on the bundled chat data, on CPU.

    python -m megatron_ernie.demo                               # ~2 minutes on 2 CPU cores
    python -m megatron_ernie.demo --steps 40 --out runs/quick   # shorter
    torchrun --nproc-per-node 2 -m megatron_ernie.demo --ep 2   # expert parallel on 2 ranks

It runs the `demo` pipeline recipe (recipes/recipe/demo.yaml) through the same entry point as
every run (`python -m megatron_ernie.train recipe=demo`); any further argument is a Hydra
override (e.g. `parallel.tp=2`). Prints where the metrics, curves and checkpoints are.
"""
from __future__ import annotations

import argparse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="training steps (recipe default 150)")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--tp", type=int, help="tensor parallel size")
    p.add_argument("--pp", type=int, help="pipeline parallel size")
    p.add_argument("--ep", type=int, help="expert parallel size")
    a, extra = p.parse_known_args(argv)
    overrides = ["recipe=demo", f"out_dir={a.out}"]
    if a.steps:
        overrides.append(f"train.steps={a.steps}")
    overrides += [f"parallel.{k}={v}" for k, v in (("tp", a.tp), ("pp", a.pp), ("ep", a.ep)) if v]
    from megatron_ernie.train import main as train_main

    return train_main(overrides + extra)


if __name__ == "__main__":
    main()
