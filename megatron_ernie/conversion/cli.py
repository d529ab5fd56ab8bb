"""Command lines of the conversion tools (`tools/convert_checkpoint.py`, `tools/merge_experts.py`)."""
from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _run(fn) -> int:
    """Run fn(); what the user can fix (a `UserError`: a bad checkpoint, config or layout, an existing
    output) prints one clear line instead of a traceback and exits 2."""
    from megatron_ernie.errors import UserError

    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def convert_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint",
        description="ERNIE 4.5 checkpoints: Hugging Face <-> Megatron-Core dist_checkpointing (torch_dist). "
        "Megatron checkpoints are layout-independent: one written at any TP/PP/EP loads at any other, "
        "so no separate reshard step is needed.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hf-to-mcore", help="HF safetensors directory -> Megatron checkpoint")
    h.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    h.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
    for flag in ("--tp", "--pp", "--ep"):
        h.add_argument(flag, type=int, default=1, help="layout to check the model against (recorded)")
    h.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating tensors (default: keep)")
    m = sub.add_parser("mcore-to-hf", help="Megatron checkpoint (any layout) -> HF safetensors directory")
    m.add_argument("--mcore", required=True,
                   help="Megatron checkpoint directory, or a training run (its latest complete checkpoint)")
    m.add_argument("--out", required=True, help="output HF directory (must not exist unless --overwrite)")
    m.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating tensors (default: keep)")
    m.add_argument("--config", help="HF config.json or preset name, when the checkpoint has no hf/config.json")
    m.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), help="default 5GB")
    for q in (h, m):
        q.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")
        q.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from megatron_ernie.conversion.convert import hf_to_mcore, mcore_to_hf

    def go():
        if a.command == "hf-to-mcore":
            r = hf_to_mcore(a.hf, a.out, tp=a.tp, pp=a.pp, ep=a.ep, dtype=a.dtype, overwrite=a.overwrite,
                            progress=not a.no_progress)
        else:
            r = mcore_to_hf(a.mcore, a.out, dtype=a.dtype, config=a.config, overwrite=a.overwrite,
                            progress=not a.no_progress, max_shard_bytes=a.max_shard_size)
        print(f"wrote {a.out}: {r.tensors} tensors, {r.bytes / 1e9:.3f} GB in {r.files} files")

    return _run(go)


def merge_main(argv: list[str] | None = None) -> int:
    from megatron_ernie.conversion.merge import EXPERT_POOLS, GROUPS

    p = argparse.ArgumentParser(
        prog="merge_experts",
        description="Take parameter groups of checkpoint A into checkpoint B (or interpolate B + alpha(A - B)). "
        "Both HF directories or both Megatron checkpoints; B's other tensors are copied unchanged.",
    )
    p.add_argument("--a", required=True, help="checkpoint the chosen groups come from (HF dir, Megatron "
                   "checkpoint or training run)")
    p.add_argument("--b", required=True, help="base checkpoint (the same kind as --a)")
    p.add_argument("--out", required=True)
    p.add_argument("--groups", default="experts", help=f"comma list of {sorted(GROUPS)} (default: experts)")
    p.add_argument("--layers", help="decoder layer range, e.g. 3-27 (default: all)")
    p.add_argument("--experts", help="routed expert indices, e.g. 0-15,32 (router/bias rows follow)")
    p.add_argument("--expert-pool", default="all", choices=list(EXPERT_POOLS) + ["vision"])
    p.add_argument("--alpha", type=float, help="interpolate B + alpha(A - B) instead of taking A")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from megatron_ernie.conversion.merge import MergeSpec, merge_checkpoints, parse_indices, parse_range

    def go():
        spec = MergeSpec(groups=tuple(g.strip() for g in a.groups.split(",") if g.strip()),
                         layers=parse_range(a.layers), experts=parse_indices(a.experts),
                         expert_pool=a.expert_pool, alpha=a.alpha)
        report = merge_checkpoints(a.a, a.b, a.out, spec, overwrite=a.overwrite, progress=not a.no_progress)
        print(report.table())
        print(f"wrote {a.out}")

    return _run(go)
