"""The one-command demo: train the tiny ERNIE 4.5 MoE on bundled text, on CPU, and show it learn.

    python -m megatron_ernie.demo                       # 1 process
    torchrun --nproc-per-node 2 -m megatron_ernie.demo --ep 2

Writes metrics.jsonl, TensorBoard scalars and curves.png under --out.
"""
from __future__ import annotations

import argparse
import time

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ernie.data.text import ByteTokenizer, lm_batches, read_text
from megatron_ernie.models.ernie import preset
from megatron_ernie.models.ernie.model import build_model
from megatron_ernie.runtime import ParallelLayout, initialize, shutdown
from megatron_ernie.training.metrics import MetricsWriter
from megatron_ernie.training.step import attach_schedule_hooks, build_optimizer, train_step, wrap_ddp


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ernie45_tiny_moe")
    p.add_argument("--text", default=None, help="a UTF-8 text file (default: the bundled corpus)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default="runs/demo")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    from tqdm import tqdm

    tokenizer = ByteTokenizer()
    args = preset(a.model)
    if args.vocab_size < tokenizer.vocab_size:
        raise SystemExit(f"--model {a.model}: vocab_size {args.vocab_size} < tokenizer's {tokenizer.vocab_size}")
    layout = ParallelLayout(tp=a.tp, pp=a.pp, ep=a.ep, sequence_parallel=a.tp > 1)
    env = initialize(layout, args, seed=a.seed)
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if a.global_batch % (a.micro_batch * dp):
        raise SystemExit(f"--global-batch {a.global_batch} is not a multiple of micro-batch×DP = {a.micro_batch * dp}")
    num_micro = a.global_batch // (a.micro_batch * dp)

    model = build_model(args, layout)
    ddp = wrap_ddp(model, layout)
    optimizer = build_optimizer([ddp], layout, lr=a.lr, min_lr=a.lr / 10, weight_decay=0.01)
    attach_schedule_hooks([ddp], optimizer)
    warmup = max(1, a.steps // 10)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=a.lr, min_lr=a.lr / 10, lr_warmup_steps=warmup,
        lr_decay_steps=a.steps, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
        wd_incr_steps=a.steps, wd_incr_style="constant",
    )

    batches = lm_batches(read_text(a.text), tokenizer, a.seq_length, a.global_batch, seed=a.seed)
    is_logger = env.rank == env.world_size - 1  # last rank: holds the loss under PP
    metrics = MetricsWriter(a.out, enabled=is_logger)
    bar = tqdm(range(1, a.steps + 1), disable=not is_logger, desc=f"{args.name} tp={a.tp} pp={a.pp} ep={a.ep}")
    first = last = None
    for step in bar:
        batch = next(batches)
        mine = {k: v[dp_rank * a.micro_batch * num_micro:(dp_rank + 1) * a.micro_batch * num_micro] for k, v in batch.items()}
        micro = [{k: v[i * a.micro_batch:(i + 1) * a.micro_batch] for k, v in mine.items()} for i in range(num_micro)]
        t0 = time.perf_counter()
        result = train_step([ddp], optimizer, micro, num_microbatches=num_micro,
                            seq_length=a.seq_length, micro_batch_size=a.micro_batch)
        dt = time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(increment=1)
        first = result.loss if first is None else first
        last = result.loss
        metrics.log(step, loss=result.loss, grad_norm=result.grad_norm, lr=lr, tokens_per_s=result.num_tokens / dt)
        bar.set_postfix(loss=f"{result.loss:.3f}")
        if is_logger and (step % 25 == 0 or step == 1):
            tqdm.write(f"step {step:4d}  loss {result.loss:.4f}  grad_norm {result.grad_norm:.3f}")
    curves = metrics.close(("loss", "grad_norm", "lr", "tokens_per_s"))
    if is_logger:
        print(f"loss {first:.3f} -> {last:.3f} over {a.steps} steps")
        print(f"metrics: {a.out}/metrics.jsonl, TensorBoard: {a.out}/tensorboard, curves: {curves}")
    shutdown()
    return {"first_loss": first, "last_loss": last}


if __name__ == "__main__":
    main()
