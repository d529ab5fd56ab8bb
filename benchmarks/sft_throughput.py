"""SFT throughput: our training loop vs a plain PyTorch loop over transformers' model.

Same invocation, same weights (one random HF checkpoint), same data (the bundled chat set,
packed to --seq tokens, the same global batches in the same order, block-causal masks and
restarted positions), same optimizer (AdamW, constant LR, clipping 1.0), fp32 on CPU.

- ours: `megatron_ernie.training.loop.run` (Megatron-Core GPTModel, DDP, optimizer, schedules);
  its per-iteration time includes building the batch.
- baseline: `Ernie4_5_MoeForCausalLM` + `torch.optim.AdamW`, micro-batches accumulated, per-token
  mean loss over the global batch (what ours optimises), batch building included.

The model is the foundation benchmark's MoE (hidden 256, 4 layers, 16 experts top-4, 2 shared).
Median iteration time after --warmup iterations. Last line: ratio_ours_over_hf=<our time / HF time>
(target <= 1.0).

    python benchmarks/sft_throughput.py [--steps 12] [--seq 512] [--global-batch 8] [--micro-batch 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.train_step_vs_hf import BENCH_MOE  # noqa: E402
from tests.helpers import free_port, hf_model  # noqa: E402

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.95), 1e-8, 0.0


def ours(hf_dir: Path, out: Path, a) -> tuple[list[float], list[float]]:
    from megatron_ernie.training.config import compose
    from megatron_ernie.train import run

    cfg = compose([
        "recipe=sft", f"model.init_from={hf_dir}", f"out_dir={out}", f"data.seq_length={a.seq}",
        f"train.steps={a.steps}", f"train.global_batch_size={a.global_batch}", f"train.micro_batch_size={a.micro_batch}",
        f"optim.lr={LR}", f"optim.min_lr={LR}", "optim.warmup_steps=0", "optim.decay=constant",
        f"optim.weight_decay={WD}", f"optim.eps={EPS}", f"checkpoint.interval={a.steps + 1}", "checkpoint.resume=false",
    ])
    result = run(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = a.global_batch * a.seq
    return [tokens / r["tokens_per_s"] for r in rows], [result.losses[s] for s in sorted(result.losses)]


def baseline(hf_dir: Path, a) -> tuple[list[float], list[float]]:
    from transformers import AutoModelForCausalLM

    from megatron_ernie.data.sft import GlobalBatches, SFTDataset, block_causal_mask, bundled_sft_path, collate
    from megatron_ernie.data.tokenizer import demo_tokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    data = SFTDataset(bundled_sft_path(), demo_tokenizer(), seq_length=a.seq, pack=True, seed=1234)
    batches = GlobalBatches(data, a.global_batch, seed=1234)
    times, losses = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        indices = next(batches)
        micro = [collate([data[i] for i in indices[k:k + a.micro_batch]]) for k in range(0, len(indices), a.micro_batch)]
        total_tokens = sum(float(m["loss_mask"].sum()) for m in micro)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in micro:
            logits = model(input_ids=m["tokens"], position_ids=m["position_ids"],
                           attention_mask=~block_causal_mask(m["doc_ids"])).logits
            tok = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), m["labels"].flatten(), reduction="none")
            loss = (tok * m["loss_mask"].flatten()).sum() / total_tokens
            loss.backward()
            loss_sum += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss_sum)
    return times, losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    import os

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        hf_model(BENCH_MOE, seed=0, bias_std=0.0).save_pretrained(hf_dir)
        our_times, our_losses = ours(hf_dir, Path(tmp) / "ours", a)
        torch.set_num_threads(a.threads)
        hf_times, hf_losses = baseline(hf_dir, a)
    ours_t = statistics.median(our_times[a.warmup:])
    hf_t = statistics.median(hf_times[a.warmup:])
    tokens = a.global_batch * a.seq
    print(f"model: {BENCH_MOE.name} (hidden {BENCH_MOE.hidden_size}, {BENCH_MOE.num_layers} layers, "
          f"{BENCH_MOE.num_experts} experts top-{BENCH_MOE.moe_k}); global batch {a.global_batch} x {a.seq} tokens, "
          f"micro-batch {a.micro_batch}, {a.threads} CPU threads")
    print(f"loss step 1: ours {our_losses[0]:.5f}  hf {hf_losses[0]:.5f};  step {a.steps}: ours {our_losses[-1]:.5f}  "
          f"hf {hf_losses[-1]:.5f}")
    print(f"ours: {ours_t * 1e3:.0f} ms/step, {tokens / ours_t:.0f} tokens/s")
    print(f"hf:   {hf_t * 1e3:.0f} ms/step, {tokens / hf_t:.0f} tokens/s")
    print(f"ratio_ours_over_hf={ours_t / hf_t:.3f}")


if __name__ == "__main__":
    main()
