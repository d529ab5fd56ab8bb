"""Hugging Face ⇄ Megatron-Core checkpoint conversion, streamed, atomic, validated first.

hf → mcore: every HF tensor is checked against config.json (names, shapes; unknown names
listed) before anything is written; then canonical Megatron tensors are built one at a time
(`hf_adapter.canonical_from_hf`) as the DCP writer reaches them. Routed experts are stored one
chunk per expert of the stacked `experts.experts.*` tensor, as Megatron-Core stores them.

mcore → hf: one layer's tensors are read at a time (whatever layout wrote the chunks), split
back into HF tensors and streamed into safetensors shards.

The Megatron checkpoint carries the HF source's non-weight files (config.json, tokenizer,
generation config, chat template) under `hf/`, so the way back needs no other input.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from megatron_ernie.conversion.locate import ASSETS, locate
from megatron_ernie.conversion.mcore_format import Chunk, McoreCheckpoint, write_checkpoint
from megatron_ernie.conversion.prefetch import prefetch
from megatron_ernie.conversion.safetensors_io import (
    INDEX_NAME,
    CheckpointError,
    PlannedTensor,
    SafetensorsCheckpoint,
    StreamingSafetensorsWriter,
    nbytes,
)
from megatron_ernie.models.ernie.args import ErnieArgs, from_hf_config
from megatron_ernie.models.ernie.hf_adapter import (
    canonical_from_hf,
    canonical_names,
    canonical_shape,
    canonical_to_hf_names,
    hf_from_canonical,
    hf_shapes,
    is_moe_layer_name,
    REWARD_HEAD,
    sharded_key,
)
from megatron_ernie.runtime.atomic import atomic_directory, check_target

INFO = "megatron_ernie.json"
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.msgpack|\.h5|\.gguf|\.safetensors\.index\.json|\.bin\.index\.json)$")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Report:
    tensors: int = 0
    bytes: int = 0
    files: int = 0


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (choose from {sorted(DTYPES)})")
    return DTYPES[dtype]


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def _layer_of(key: str) -> str:
    m = re.match(r"^((?:decoder|mtp)\.layers\.\d+)\.", key)
    return m.group(1) if m else "embedding/output"


# --- HF -> Megatron ---------------------------------------------------------------------------
def _mtp_layout(names: Iterable[str], args: ErnieArgs, prefix: str, moe_probe: str) -> tuple[bool, list[bool] | None]:
    """Whether a checkpoint carries the MTP layers, and which of them are MoE (from the tensors)."""
    names = set(names)
    if not args.num_mtp_layers or not any(n.startswith(prefix) for n in names):
        return False, None
    return True, [moe_probe.format(k=k) in names for k in range(args.num_mtp_layers)]


def check_hf_checkpoint(ckpt: SafetensorsCheckpoint, args: ErnieArgs) -> tuple[list[str], bool, list[bool] | None]:
    """Canonical names to build; raises naming every unknown or missing tensor and bad shape."""
    with_mtp, mtp_moe = _mtp_layout(ckpt.keys(), args, "model.mtp_", "model.mtp_block.{k}.mlp.gate.weight")
    names = canonical_names(args, with_mtp, mtp_moe)
    expected: dict[str, tuple[int, ...]] = {}
    for name in names:
        expected.update(hf_shapes(name, args))
    present = set(ckpt.keys())
    ignorable = {"lm_head.weight"} if args.tie_word_embeddings else set()  # a tied copy of the embedding
    unknown = sorted(present - set(expected) - ignorable)
    if unknown:
        raise CheckpointError(f"{ckpt.root}: {len(unknown)} tensors are not part of {args.name}: {unknown[:20]}")
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(f"{ckpt.root}: {len(missing)} tensors of {args.name} are missing: {missing[:20]}")
    for hf_name, shape in expected.items():
        entry = ckpt.entries[hf_name]
        if entry.shape != shape:
            raise CheckpointError(
                f"{entry.file}: tensor {hf_name!r} has shape {entry.shape}, config.json implies {shape}"
            )
    return names, with_mtp, mtp_moe


def _hf_assets(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and not _WEIGHT_FILE.search(p.name))


def mcore_chunks(names: list[str], args: ErnieArgs, get: Callable[[str], torch.Tensor],
                 dtype_of: Callable[[str], torch.dtype], mtp_moe: list[bool] | None = None) -> list[Chunk]:
    """The checkpoint chunks of canonical tensors `names` (one per expert for routed experts)."""
    chunks = []
    for name in names:
        key, expert = sharded_key(name, is_moe_layer_name(name, args, mtp_moe))
        shape = canonical_shape(name, args)
        dt = dtype_of(name)
        fetch = (lambda n=name: get(n).to(dtype_of(n)))
        if expert is None:
            chunks.append(Chunk(key, shape, (0,) * len(shape), shape, dt, fetch))
        else:
            chunks.append(Chunk(key, (args.num_experts, *shape), (expert,) + (0,) * len(shape), (1, *shape), dt,
                                lambda f=fetch: f().unsqueeze(0)))
    return chunks


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, ep: int = 1,
                dtype: str | torch.dtype | None = None, overwrite: bool = False, progress: bool = True,
                max_file_bytes: int = 4 * 1024**3) -> Report:
    """Convert an HF ERNIE 4.5 directory into a Megatron-Core torch_dist checkpoint at `out_dir`.

    The stored tensors are global, so the checkpoint loads at any layout; `tp/pp/ep` are checked
    against the model (heads, experts, layers divisible) and recorded as the intended layout.
    """
    from megatron_ernie.runtime.layout import ParallelLayout

    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    hf_dir = locate(hf_dir, kind="hf").dir
    dtype = parse_dtype(dtype)
    args = from_hf_config(hf_dir / "config.json")
    layout = ParallelLayout(tp=tp, pp=pp, ep=ep, sequence_parallel=tp > 1)  # SP never changes storage
    layout.validate(args, world_size=tp * pp * ep)
    ckpt = SafetensorsCheckpoint(hf_dir)
    names, with_mtp, mtp_moe = check_hf_checkpoint(ckpt, args)

    def source_dtype(name: str) -> torch.dtype:
        if dtype is not None:
            return dtype
        dts = {ckpt.entries[h].dtype for h in canonical_to_hf_names(name)[0]}
        if len(dts) != 1:
            raise CheckpointError(f"{hf_dir}: the HF tensors of {name!r} have different dtypes {sorted(map(str, dts))}")
        return dts.pop()

    chunks = mcore_chunks(names, args, lambda n: canonical_from_hf(n, ckpt.get, args), source_dtype, mtp_moe)
    report = Report(tensors=len(chunks), bytes=sum(c.nbytes for c in chunks))
    bar = _progress(report.bytes, f"hf→mcore {args.name}", progress)

    def on_item(chunk: Chunk | None) -> None:
        if chunk is not None:
            bar.set_postfix_str(_layer_of(chunk.key), refresh=False)
            bar.update(chunk.nbytes)

    with atomic_directory(out_dir, overwrite) as tmp:
        write_checkpoint(tmp, chunks, max_file_bytes=max_file_bytes, on_item=on_item)
        (tmp / ASSETS).mkdir()
        for f in _hf_assets(hf_dir):
            shutil.copy2(f, tmp / ASSETS / f.name)
        info = {"format": "megatron-core dist_checkpointing (torch_dist)", "model": args.name,
                "source": str(hf_dir.resolve()), "layout_checked": {"tp": tp, "pp": pp, "ep": ep},
                "dtype": str(dtype).replace("torch.", "") if dtype else "as source", "mtp_layers": len(mtp_moe or [])}
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        report.files = len(list(tmp.glob("*.distcp")))
    bar.close()
    return report


# --- Megatron -> HF ---------------------------------------------------------------------------
def mcore_args(ckpt_dir: Path, config: str | Path | None = None) -> ErnieArgs:
    """The model a Megatron checkpoint holds: its `hf/config.json`, or an explicit config/preset."""
    if config is not None:
        from megatron_ernie.models.ernie.args import PRESETS

        return PRESETS[str(config)] if str(config) in PRESETS else from_hf_config(config)
    cfg = ckpt_dir / ASSETS / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{ckpt_dir}: no {ASSETS}/config.json; say which model it holds (config=... / --config)")
    return from_hf_config(cfg)


def _expected_key_shape(name: str, args: ErnieArgs, mtp_moe) -> tuple[str, int | None, tuple[int, ...]]:
    key, expert = sharded_key(name, is_moe_layer_name(name, args, mtp_moe))
    shape = canonical_shape(name, args)
    return key, expert, ((args.num_experts, *shape) if expert is not None else shape)


def mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                config: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                max_shard_bytes: int = 5 * 1024**3) -> Report:
    """Convert a Megatron-Core torch_dist checkpoint (any layout; or a training run: its latest
    complete checkpoint) into an HF directory."""
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    mcore_dir = locate(mcore_dir, kind="mcore").dir
    dtype = parse_dtype(dtype)
    ck = McoreCheckpoint(mcore_dir)
    if REWARD_HEAD in ck.tensors:  # a causal-LM export would silently drop the head
        raise CheckpointError(f"{mcore_dir}: a reward-model checkpoint ({REWARD_HEAD}); Hugging Face has no ERNIE "
                              f"reward-model class to export it to — score it with rewards.reward_model")
    args = mcore_args(mcore_dir, config)
    with_mtp, mtp_moe = _mtp_layout(ck.tensors, args, "mtp.", "mtp.layers.{k}.transformer_layer.mlp.router.weight")
    names = canonical_names(args, with_mtp, mtp_moe)

    located = {n: _locate(n, args, mtp_moe, ck) for n in names}
    missing = sorted({loc.key for loc in located.values() if loc.key not in ck.tensors})
    if missing:
        raise CheckpointError(f"{mcore_dir}: {len(missing)} tensors of {args.name} are missing from the checkpoint: {missing[:10]}")
    planned = []
    for name, loc in located.items():
        if ck.shape(loc.key) != loc.stored_shape:
            raise CheckpointError(f"{mcore_dir}: tensor {loc.key!r} has shape {ck.shape(loc.key)}, the config implies {loc.stored_shape}")
        dt = dtype if dtype is not None and ck.dtype(loc.key).is_floating_point else ck.dtype(loc.key)
        planned += [PlannedTensor(n, dt, s) for n, s in hf_shapes(name, args).items()]

    def hf_tensors():
        """(HF name, tensor) in plan order: boxes read in batches of ~128 MB (an expert is one box)."""
        batch: list[str] = []
        size = 0
        for i, name in enumerate(names):
            batch.append(name)
            size += nbytes(located[name].sizes, ck.dtype(located[name].key))
            if size < _READ_BATCH and i + 1 < len(names):
                continue
            for n, t in zip(batch, ck.load_regions([located[n].box for n in batch])):
                full = t.reshape(t.shape[located[n].lead:])  # drop the layer / expert axes
                for hf_name, part in hf_from_canonical(n, full, args).items():
                    yield hf_name, _cast(part, dtype)
            batch, size = [], 0

    report = Report(tensors=len(planned), bytes=sum(p.nbytes for p in planned))
    bar = _progress(report.bytes, f"mcore→hf {args.name}", progress)
    with atomic_directory(out_dir, overwrite) as tmp:
        writer = StreamingSafetensorsWriter(tmp, planned, max_shard_bytes)
        try:
            for hf_name, t in prefetch(hf_tensors(), size_of=lambda pair: pair[1].nbytes):  # reads overlap writes
                writer.write(hf_name, t)
                bar.set_postfix_str(_hf_layer(hf_name), refresh=False)
                bar.update(t.nbytes)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        _write_hf_assets(mcore_dir, tmp, args, dtype)
        report.files = len(writer.file_names)
    bar.close()
    return report


_READ_BATCH = 128 * 2**20


@dataclass(frozen=True)
class _Located:
    """Where a canonical tensor sits in a Megatron checkpoint: a box of a stored global tensor."""
    key: str
    stored_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    lead: int  # leading axes of size 1 in the box (layer and/or expert) to drop

    @property
    def box(self):
        return self.key, self.offsets, self.sizes


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _locate(name: str, args: ErnieArgs, mtp_moe, ck: McoreCheckpoint) -> _Located:
    """Per-layer keys (ours, and Megatron's for MoE models); else Megatron's format for models
    of identical layers (dense), where every layer's tensor is one slice of a leading layer axis."""
    key, expert, _ = _expected_key_shape(name, args, mtp_moe)
    shape = canonical_shape(name, args)
    index, size = ((expert,), (args.num_experts,)) if expert is not None else ((), ())
    m = _LAYER_KEY.match(key)
    if key not in ck.tensors and m and f"decoder.layers.{m.group(2)}" in ck.tensors:
        key = f"decoder.layers.{m.group(2)}"
        index, size = (int(m.group(1)), *index), (args.num_layers, *size)
    zeros = (0,) * len(shape)
    return _Located(key, (*size, *shape), (*index, *zeros), (*(1,) * len(index), *shape), len(index))


def _hf_layer(name: str) -> str:
    m = re.match(r"^model\.(layers|mtp_block)\.(\d+)\.", name)
    return f"{m.group(1)}.{m.group(2)}" if m else "embedding/output"


def _write_hf_assets(mcore_dir: Path, out: Path, args: ErnieArgs, dtype: torch.dtype | None) -> None:
    """config.json (the source's own, else ours) and every other non-weight file the source had."""
    from megatron_ernie.models.ernie.args import to_hf_config

    assets = mcore_dir / ASSETS
    if assets.is_dir():
        for f in _hf_assets(assets):
            shutil.copy2(f, out / f.name)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else to_hf_config(args)
    if dtype is not None:
        cfg["dtype"] = str(dtype).replace("torch.", "")
        cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


__all__ = ["ASSETS", "CheckpointError", "INDEX_NAME", "Report", "check_hf_checkpoint", "hf_to_mcore",
           "mcore_args", "mcore_chunks", "mcore_to_hf", "parse_dtype"]
