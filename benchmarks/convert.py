"""Conversion throughput and memory: HF → Megatron → HF on a synthetic multi-GB checkpoint.

The checkpoint has ERNIE-4.5-21B-A3B's shapes (hidden 2560, 64 experts of 1536, 2 shared
experts, vocab 103424, bf16) with fewer layers (default 3: one dense, two MoE ≈ 3.9 GB), in
HF-style shards. Every phase runs in its own process, so each peak RSS (ru_maxrss) is that
phase's alone, interpreter and imports included.

Baseline (same invocation): a plain read of the same files, every tensor read into memory.
Before the baseline and before each conversion, its input files are evicted from the page cache
(posix_fadvise DONTNEED), so every phase reads from storage as a conversion of a checkpoint larger
than RAM does, and the disk gets 20 s to finish the previous phase's writes (this VM's disk stays
slow for a while after a multi-GB write, even once fsync returned). Conversions fsync what they
write (the atomic rename needs durable files); the plain read writes nothing.

Last line: ratio_convert_over_read=<slower direction's time / plain read> peak_rss_over_shard=
<largest peak RSS of the two conversions / largest shard>. Targets: ≤ 3 and ≤ 1.5.

Times exclude interpreter start and imports; peak RSS includes them.

    python benchmarks/convert.py [--layers 3] [--shard-size 2GB] [--repeats 3] [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _phase_generate(workdir: Path, layers: int, shard_bytes: int) -> dict:
    import torch

    from megatron_ernie.conversion.safetensors_io import PlannedTensor, StreamingSafetensorsWriter
    from megatron_ernie.models.ernie import preset, to_hf_config
    from megatron_ernie.models.ernie.hf_adapter import canonical_names, hf_shapes

    args = preset("ernie45_21b_a3b").replace(num_layers=layers, moe_layer_end_index=layers - 1)
    out = workdir / "hf"
    out.mkdir(parents=True)
    planned = []
    for name in canonical_names(args):
        for hf_name, shape in hf_shapes(name, args).items():
            fp32 = "e_score_correction_bias" in hf_name  # ERNIE keeps router statistics in fp32
            planned.append(PlannedTensor(hf_name, torch.float32 if fp32 else torch.bfloat16, shape))
    writer = StreamingSafetensorsWriter(out, planned, shard_bytes)
    g = torch.Generator().manual_seed(0)
    for p in planned:
        writer.write(p.name, (torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    writer.close()
    cfg = to_hf_config(args)
    cfg["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"bytes": sum(p.nbytes for p in planned)}


def _phase_read(workdir: Path) -> dict:
    """Every tensor of every shard read into its own memory (one positional read each)."""
    from megatron_ernie.conversion.safetensors_io import SafetensorsCheckpoint, read_tensor

    n = 0
    for entry in SafetensorsCheckpoint(workdir / "hf").entries.values():
        n += read_tensor(entry).nbytes
    return {"bytes_read": n}


def _phase_to_mcore(workdir: Path) -> dict:
    from megatron_ernie.conversion.convert import hf_to_mcore

    r = hf_to_mcore(workdir / "hf", workdir / "mcore", overwrite=True, progress=True)
    return {"bytes": r.bytes}


def _phase_to_hf(workdir: Path, shard_bytes: int) -> dict:
    from megatron_ernie.conversion.convert import mcore_to_hf

    r = mcore_to_hf(workdir / "mcore", workdir / "hf_back", overwrite=True, progress=True, max_shard_bytes=shard_bytes)
    return {"bytes": r.bytes}


def _phase_verify(workdir: Path) -> dict:
    import torch

    from megatron_ernie.conversion.safetensors_io import SafetensorsCheckpoint

    a, b = SafetensorsCheckpoint(workdir / "hf"), SafetensorsCheckpoint(workdir / "hf_back")
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k
    return {"tensors": len(a.keys())}


def evict(paths, settle_s: float = 20.0) -> None:
    """Drop files from the page cache (flushing them first), so that the next read hits storage,
    then let the disk settle, so that each phase is timed on a quiet disk."""
    import os

    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    time.sleep(settle_s)


def run_phase(name: str, workdir: Path, extra: list[str]) -> dict:
    """Run one phase in a fresh interpreter; returns its result, seconds and peak RSS."""
    cmd = [sys.executable, __file__, "--phase", name, "--workdir", str(workdir), *extra]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _child(args) -> None:
    import torch

    import megatron_ernie.conversion.convert  # noqa: F401 - imports are not conversion time

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    phases = {
        "generate": lambda: _phase_generate(args.workdir, args.layers, args.shard_size),
        "read": lambda: _phase_read(args.workdir),
        "to_mcore": lambda: _phase_to_mcore(args.workdir),
        "to_hf": lambda: _phase_to_hf(args.workdir, args.shard_size),
        "verify": lambda: _phase_verify(args.workdir),
    }
    result = phases[args.phase]()
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))


def main() -> None:
    from megatron_ernie.conversion.cli import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--shard-size", type=parse_size, default=parse_size("2GB"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/convert_bench"))
    p.add_argument("--repeats", type=int, default=3, help="rounds of read/convert/convert; medians reported")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        return _child(args)

    extra = ["--layers", str(args.layers), "--shard-size", str(args.shard_size)]
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    gen = run_phase("generate", args.workdir, extra)
    shards = [f.stat().st_size for f in (args.workdir / "hf").glob("*.safetensors")]
    gb = gen["bytes"] / 1e9
    print(f"synthetic 21B-A3B-shaped checkpoint: {args.layers} layers, {gb:.2f} GB in {len(shards)} shards "
          f"(largest {max(shards) / 1e9:.2f} GB)")
    hf_files = sorted((args.workdir / "hf").iterdir())
    rounds = []
    for _ in range(args.repeats):  # this machine's disk is noisy: medians of a few rounds
        for d in ("mcore", "hf_back"):
            shutil.rmtree(args.workdir / d, ignore_errors=True)
        evict(hf_files)
        read = run_phase("read", args.workdir, extra)
        evict(hf_files)
        to_mcore = run_phase("to_mcore", args.workdir, extra)
        evict(p for p in (args.workdir / "mcore").rglob("*") if p.is_file())
        to_hf = run_phase("to_hf", args.workdir, extra)
        rounds.append((read, to_mcore, to_hf))
        print(f"round {len(rounds)}: read {read['seconds']:.2f} s, hf->mcore {to_mcore['seconds']:.2f} s, "
              f"mcore->hf {to_hf['seconds']:.2f} s")
    verify = run_phase("verify", args.workdir, extra)
    print(f"round trip bit-exact: {verify['tensors']} tensors")
    med = [{k: statistics.median(r[i][k] for r in rounds) for k in ("seconds", "peak_rss")} for i in range(3)]
    read, to_mcore, to_hf = med
    for name, r in (("plain read (baseline)", read), ("hf -> mcore", to_mcore), ("mcore -> hf", to_hf)):
        print(f"{name:<22} {r['seconds']:7.2f} s  {gb * 1e3 / r['seconds']:8.0f} MB/s  peak RSS {r['peak_rss'] / 1e9:5.2f} GB"
              f"  ({r['seconds'] / read['seconds']:.2f}x read)")
    ratio = max(to_mcore["seconds"], to_hf["seconds"]) / read["seconds"]
    rss = max(max(r[1]["peak_rss"], r[2]["peak_rss"]) for r in rounds) / max(shards)
    if not args.keep:
        shutil.rmtree(args.workdir)
    print(f"ratio_convert_over_read={ratio:.2f} peak_rss_over_shard={rss:.2f}")


if __name__ == "__main__":
    main()
