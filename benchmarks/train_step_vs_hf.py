"""Forward+backward step time: our Megatron-Core ERNIE MoE vs transformers' Ernie4_5_MoeForCausalLM.

Same weights (loaded through our HF adapter), same batch, fp32, CPU, same process.
Baseline: transformers' model with its default attention implementation.
Last line: ratio_ours_over_hf=<median ours / median HF>  (target <= 1.0)

    python benchmarks/train_step_vs_hf.py [--reps 7] [--seq 512] [--batch 4] [--profile]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_ernie.models.ernie import ErnieArgs  # noqa: E402
from megatron_ernie.models.ernie.hf_adapter import load_hf_weights  # noqa: E402
from megatron_ernie.models.ernie.model import build_model  # noqa: E402
from megatron_ernie.runtime import ParallelLayout, initialize, shutdown  # noqa: E402
from tests.helpers import free_port, hf_model  # noqa: E402

BENCH_MOE = ErnieArgs(
    name="bench_moe", vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4,
    num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
    num_experts=16, moe_k=4, moe_intermediate_size=256, moe_num_shared_experts=2,
    moe_layer_start_index=1,
)


def time_steps(step, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="print where our step spends its time")
    a = p.parse_args(argv)

    initialize(ParallelLayout(), BENCH_MOE, environ={"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(free_port())})
    hf = hf_model(BENCH_MOE, seed=0).train()
    ours = build_model(BENCH_MOE).train()
    load_hf_weights(ours, hf.state_dict(), BENCH_MOE)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, BENCH_MOE.vocab_size, (a.batch, a.seq + 1), generator=g)
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pos = torch.arange(a.seq).unsqueeze(0).expand(a.batch, -1)

    def step_ours():
        ours.zero_grad(set_to_none=True)
        ours(tokens, pos, None, labels=labels).mean().backward()

    def step_hf():
        hf.zero_grad(set_to_none=True)
        logits = hf(tokens).logits
        torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1)).backward()

    with torch.no_grad():  # same numbers before timing anything
        l_ours = ours(tokens, pos, None, labels=labels).mean().item()
        logits = hf(tokens).logits
        l_hf = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1)).item()
    print(f"model: {BENCH_MOE.name} hidden={BENCH_MOE.hidden_size} layers={BENCH_MOE.num_layers} "
          f"experts={BENCH_MOE.num_experts} top{BENCH_MOE.moe_k} shared={BENCH_MOE.moe_num_shared_experts}; "
          f"batch {a.batch} x seq {a.seq}; threads {torch.get_num_threads()}; "
          f"hf attention={hf.config._attn_implementation}")
    print(f"loss ours={l_ours:.6f} hf={l_hf:.6f}")

    t_hf, t_ours = [], []
    for _ in range(a.reps):  # interleave so that machine noise hits both alike
        t_hf += time_steps(step_hf, 1, warmup=0 if t_hf else 2)
        t_ours += time_steps(step_ours, 1, warmup=0 if t_ours else 2)
    m_hf, m_ours = statistics.median(t_hf), statistics.median(t_ours)
    print(f"hf   fwd+bwd median {m_hf * 1e3:8.1f} ms  (min {min(t_hf) * 1e3:.1f})")
    print(f"ours fwd+bwd median {m_ours * 1e3:8.1f} ms  (min {min(t_ours) * 1e3:.1f})")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step_ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    shutdown()
    print(f"ratio_ours_over_hf={m_ours / m_hf:.3f}")


if __name__ == "__main__":
    main()
