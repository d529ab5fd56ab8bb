"""Expert-parameter merging (thinking/non-thinking fusion, DeepSeek-R1T-Chimera style).

Output = checkpoint B, except chosen parameter groups, which are taken from checkpoint A
(`alpha=None`) or interpolated `B + α(A − B)` (`torch.lerp` in fp32, so α=1 gives A and α=0
gives B exactly, then cast to B's dtype). Groups are selected by kind, by layer range and, for
routed experts and their router rows, by expert indices / expert pool. Works on HF directories
and Megatron-Core checkpoints (both inputs of the same kind); the output is written atomically
and streamed one tensor (HF) or one layer (Megatron) at a time.
"""
from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_ernie.conversion.convert import (
    INFO,
    _hf_assets,
    _layer_of,
    _mtp_layout,
    check_hf_checkpoint,
    mcore_args,
    mcore_chunks,
)
from megatron_ernie.conversion.locate import ASSETS, locate
from megatron_ernie.conversion.mcore_format import McoreCheckpoint, write_checkpoint
from megatron_ernie.conversion.safetensors_io import (
    CheckpointError,
    PlannedTensor,
    SafetensorsCheckpoint,
    StreamingSafetensorsWriter,
)
from megatron_ernie.models.ernie.args import ErnieArgs, from_hf_config
from megatron_ernie.models.ernie.hf_adapter import (
    canonical_names,
    canonical_to_hf_names,
    is_moe_layer_name,
    sharded_key,
)
from megatron_ernie.runtime.atomic import atomic_directory, check_target

# group -> canonical-name pattern (layer-local part)
GROUPS = {
    "experts": r"mlp\.experts\.local_experts\.\d+\.linear_fc[12]\.weight",
    "router": r"mlp\.router\.weight",
    "bias": r"mlp\.router\.e_score_correction_bias",
    "shared_experts": r"mlp\.shared_experts\.linear_fc[12]\.weight",
    "dense_mlp": r"mlp\.linear_fc[12]\.weight",
    "attention": r"self_attention\.linear_(qkv|proj)\.weight",
    "norms": r"(input_layernorm|pre_mlp_layernorm)\.weight",
}
EXPERT_POOLS = ("all", "text")  # VL models add "vision" once they exist
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class MergeSpec:
    groups: tuple[str, ...] = ("experts",)
    layers: tuple[int, int] | None = None  # inclusive range of decoder layers; None = all
    experts: tuple[int, ...] | None = None  # routed expert indices; None = the whole pool
    expert_pool: str = "all"
    alpha: float | None = None  # None: take A; else B + alpha * (A - B)

    def __post_init__(self):
        bad = [g for g in self.groups if g not in GROUPS]
        if bad or not self.groups:
            raise CheckpointError(f"unknown parameter groups {bad} (choose from {sorted(GROUPS)})")
        if self.expert_pool not in EXPERT_POOLS:
            raise CheckpointError(
                f"expert pool {self.expert_pool!r} does not exist in ERNIE 4.5 text models (pools: {EXPERT_POOLS})"
            )


@dataclass
class MergeReport:
    decisions: dict[str, str] = field(default_factory=dict)  # HF or canonical name -> "A" / "B" / "lerp" / "A rows"

    def table(self) -> str:
        """Counts per (group, source, layer range): what was taken from where."""
        rows: dict[tuple[str, str], list[int]] = defaultdict(list)
        for name, source in self.decisions.items():
            m = re.search(r"layers\.(\d+)\.", name)
            rows[(_group_of_any(name), source)].append(int(m.group(1)) if m else -1)
        lines = [f"{'group':<16}{'source':<22}{'tensors':>8}  layers"]
        for (group, source), layers in sorted(rows.items()):
            ls = sorted({x for x in layers if x >= 0})
            span = f"{ls[0]}-{ls[-1]}" if ls else "-"
            lines.append(f"{group:<16}{source:<22}{len(layers):>8}  {span}")
        return "\n".join(lines)


def _group_of(canonical: str) -> str | None:
    m = _LAYER.match(canonical)
    if not m:
        return None
    for group, pattern in GROUPS.items():
        if re.fullmatch(pattern, m.group(2)):
            return group
    return None


def _group_of_any(name: str) -> str:
    """Group of a canonical or HF name, for the report."""
    hf_to_group = [("mlp.experts.", "experts"), ("mlp.gate.", "router"), ("moe_statics", "bias"),
                   ("shared_experts", "shared_experts"), ("self_attn", "attention"), ("layernorm", "norms"),
                   ("mlp.", "dense_mlp")]
    group = _group_of(name)
    if group:
        return group
    for needle, g in hf_to_group:
        if needle in name and "layers." in name:
            return g
    return "other"


def _selection(name: str, spec: MergeSpec, args: ErnieArgs) -> torch.Tensor | bool:
    """True (whole tensor), False, or a boolean row mask (router rows of the chosen experts)."""
    group = _group_of(name)
    if group not in spec.groups:
        return False
    layer = int(_LAYER.match(name).group(1))
    if spec.layers and not spec.layers[0] <= layer <= spec.layers[1]:
        return False
    if spec.experts is None:
        return True
    if group == "experts":
        return int(_EXPERT.search(name).group(1)) in spec.experts
    if group in ("router", "bias"):
        mask = torch.zeros(args.num_experts, dtype=torch.bool)
        mask[list(spec.experts)] = True
        return mask
    return True


def _combine(a: torch.Tensor, b: torch.Tensor, sel: torch.Tensor | bool, alpha: float | None, name: str) -> torch.Tensor:
    if a.shape != b.shape:
        raise CheckpointError(f"tensor {name!r}: shape {tuple(a.shape)} in A, {tuple(b.shape)} in B")
    picked = a.to(b.dtype) if alpha is None else torch.lerp(b.float(), a.float(), alpha).to(b.dtype)
    if isinstance(sel, torch.Tensor):
        out = b.clone()
        out[sel] = picked[sel]
        return out
    return picked


def _source(sel, alpha) -> str:
    what = "A" if alpha is None else f"B+{alpha:g}(A-B)"
    return what + (" (expert rows)" if isinstance(sel, torch.Tensor) else "")


def check_compatible(a: ErnieArgs, b: ErnieArgs, where: str) -> None:
    fields = [f for f in a.__dataclass_fields__ if f != "name" and getattr(a, f) != getattr(b, f)]
    if fields:
        raise CheckpointError(
            f"{where}: A and B are different models, refusing to merge: "
            + ", ".join(f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in fields)
        )


def merge_checkpoints(a_dir: str | Path, b_dir: str | Path, out_dir: str | Path, spec: MergeSpec,
                      overwrite: bool = False, progress: bool = True) -> MergeReport:
    """Write B with `spec`'s parameter groups taken from (or interpolated towards) A. A and B are
    both HF directories or both Megatron checkpoints (a training run: its latest complete one)."""
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    a, b = locate(a_dir), locate(b_dir)
    if a.kind != b.kind:
        raise CheckpointError(f"{a.dir} ({a.kind}) and {b.dir} ({b.kind}) are different checkpoint formats; "
                              "convert one first")
    merge = _merge_hf if a.kind == "hf" else _merge_mcore
    return merge(a.dir, b.dir, out_dir, spec, overwrite, progress)


def _check_selection(selections: dict, spec: MergeSpec, args: ErnieArgs, where: Path) -> None:
    """Refuse, before writing anything, a selection that picks nothing or names absent experts."""
    if spec.experts and max(spec.experts) >= args.num_experts:
        raise CheckpointError(f"expert {max(spec.experts)} does not exist ({args.num_experts} experts)")
    if all(sel is False for sel in selections.values()):
        raise CheckpointError(f"the selection {spec} matched no tensor of {where}")


def _merge_hf(a_dir, b_dir, out_dir, spec, overwrite, progress) -> MergeReport:
    args_a, args_b = from_hf_config(a_dir / "config.json"), from_hf_config(b_dir / "config.json")
    check_compatible(args_a, args_b, f"{a_dir} vs {b_dir}")
    a, b = SafetensorsCheckpoint(a_dir), SafetensorsCheckpoint(b_dir)
    names_b = check_hf_checkpoint(b, args_b)[0]
    check_hf_checkpoint(a, args_a)
    report = MergeReport()
    # which HF tensors change, and how (a canonical tensor's HF parts share its selection)
    selections = {n: _selection(n, spec, args_b) for n in names_b}
    _check_selection(selections, spec, args_b, b_dir)
    plan: dict[str, tuple[str, torch.Tensor | bool]] = {}
    for name, sel in selections.items():
        for hf_name in canonical_to_hf_names(name)[0]:
            plan[hf_name] = (name, sel)
    planned = [PlannedTensor(n, e.dtype, e.shape) for n, e in b.entries.items()]
    bar = _bar(sum(p.nbytes for p in planned), progress)
    with atomic_directory(out_dir, overwrite) as tmp:
        writer = StreamingSafetensorsWriter(tmp, planned, max_shard_bytes=_largest_shard(b))
        try:
            for p in planned:
                canonical, sel = plan.get(p.name, (None, False))
                tb = b.get(p.name)
                if sel is False or (isinstance(sel, torch.Tensor) and not sel.any()):
                    report.decisions[p.name] = "B"
                    out = tb
                else:
                    hf_sel = sel.reshape(1, -1) if isinstance(sel, torch.Tensor) and p.name.endswith("e_score_correction_bias") else sel
                    out = _combine(a.get(p.name), tb, hf_sel, spec.alpha, p.name)
                    report.decisions[p.name] = _source(sel, spec.alpha)
                writer.write(p.name, out)
                bar.update(p.nbytes)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        for f in _hf_assets(b_dir):
            shutil.copy2(f, tmp / f.name)
    bar.close()
    return report


def _largest_shard(ck: SafetensorsCheckpoint) -> int:
    sizes: dict[Path, int] = defaultdict(int)
    for e in ck.entries.values():
        sizes[e.file] += e.nbytes
    return max(sizes.values())


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="merge", unit="B", unit_scale=True, disable=not enabled, leave=False)


def _merge_mcore(a_dir, b_dir, out_dir, spec, overwrite, progress) -> MergeReport:
    args_a, args_b = mcore_args(a_dir), mcore_args(b_dir)
    check_compatible(args_a, args_b, f"{a_dir} vs {b_dir}")
    a, b = McoreCheckpoint(a_dir), McoreCheckpoint(b_dir)
    with_mtp, mtp_moe = _mtp_layout(b.tensors, args_b, "mtp.", "mtp.layers.{k}.transformer_layer.mlp.router.weight")
    names = canonical_names(args_b, with_mtp, mtp_moe)
    report = MergeReport()
    where = {n: sharded_key(n, is_moe_layer_name(n, args_b, mtp_moe)) for n in names}  # -> (key, expert)
    selections = {n: _selection(n, spec, args_b) for n in names}
    _check_selection(selections, spec, args_b, b_dir)
    layer_keys: dict[str, dict[str, set[str]]] = defaultdict(lambda: {"A": set(), "B": set()})
    for n, (key, _) in where.items():
        layer_keys[_layer_of(key)]["B"].add(key)
        if selections[n] is not False:
            layer_keys[_layer_of(key)]["A"].add(key)
    current: dict = {"layer": None}

    def tensors_of(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        key, expert = where[name]
        layer = _layer_of(key)
        if current["layer"] != layer:  # one layer of A and of B in memory at a time
            current.update(layer=layer, B=b.load(sorted(layer_keys[layer]["B"])),
                           A=a.load(sorted(layer_keys[layer]["A"])) if layer_keys[layer]["A"] else {})
        pick = (lambda t: t) if expert is None else (lambda t: t[expert])
        return pick(current["B"][key]), (pick(current["A"][key]) if key in current["A"] else None)

    def get(name: str) -> torch.Tensor:
        tb, ta = tensors_of(name)
        sel = selections[name]
        if sel is False:
            report.decisions[name] = "B"
            return tb
        report.decisions[name] = _source(sel, spec.alpha)
        return _combine(ta, tb, sel, spec.alpha, where[name][0])

    def dtype_of(name: str) -> torch.dtype:
        return b.dtype(where[name][0])

    chunks = mcore_chunks(names, args_b, get, dtype_of, mtp_moe)
    bar = _bar(sum(c.nbytes for c in chunks), progress)
    with atomic_directory(out_dir, overwrite) as tmp:
        write_checkpoint(tmp, chunks, on_item=lambda c: bar.update(c.nbytes) if c else None)
        if (b_dir / ASSETS).is_dir():
            shutil.copytree(b_dir / ASSETS, tmp / ASSETS)
        info = {"format": "megatron-core dist_checkpointing (torch_dist)", "model": args_b.name,
                "merged_from": {"A": str(a_dir.resolve()), "B": str(b_dir.resolve())}, "spec": repr(spec)}
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    bar.close()
    return report


def parse_range(text: str | None) -> tuple[int, int] | None:
    """'3-27' -> (3, 27); '5' -> (5, 5); None -> None."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise CheckpointError(f"bad range {text!r} (expected N or N-M)")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo:
        raise CheckpointError(f"bad range {text!r}: end before start")
    return lo, hi


def parse_indices(text: str | None) -> tuple[int, ...] | None:
    """'0-3,8' -> (0, 1, 2, 3, 8)."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        lo, hi = parse_range(part)
        out.extend(range(lo, hi + 1))
    return tuple(sorted(set(out)))


__all__ = ["GROUPS", "MergeReport", "MergeSpec", "check_compatible", "merge_checkpoints", "parse_indices", "parse_range"]
