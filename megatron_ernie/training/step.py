"""One optimizer step on Megatron-Core: DDP wrapping, the optimizer, and the step itself.

The step is stage-agnostic: it runs `get_forward_backward_func` (no pipelining, or 1F1B when
PP > 1) with a forward function and a loss function, then finalises gradients (DP/TP/PP
reductions, per-token scaling), clips, steps the optimizer and moves the ERNIE routers'
correction bias. Stages differ only by the loss function and by what produces the batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ernie.models.ernie.router import update_expert_bias
from megatron_ernie.runtime.layout import ParallelLayout


def wrap_ddp(model: torch.nn.Module, layout: ParallelLayout) -> DistributedDataParallel:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=layout.distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks: list, layout: ParallelLayout, *, lr: float = 1e-4, min_lr: float = 0.0,
                    weight_decay: float = 0.0,
                    clip_grad: float = 1.0, optimizer: str = "adam", betas=(0.9, 0.95), eps: float = 1e-8):
    config = model_chunks[0].config
    opt_config = OptimizerConfig(
        optimizer=optimizer,
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=betas[0],
        adam_beta2=betas[1],
        adam_eps=eps,
        clip_grad=clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=layout.distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, model_chunks)


def attach_schedule_hooks(model_chunks: list, optimizer) -> None:
    """What Megatron's schedules call back into: grad finalisation, no-sync, loss scaling."""
    config = model_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model_chunks[0].no_sync if len(model_chunks) == 1 else [m.no_sync for m in model_chunks]


@dataclass
class StepResult:
    loss: float  # token-mean (or pair-mean, per the loss's count) over the global batch
    grad_norm: float
    num_tokens: int
    update_successful: bool
    extra: dict | None = None  # what `on_before_bias_update` returned (e.g. expert loads)
    metrics: dict = field(default_factory=dict)  # the loss function's other reports, batch means


LOSS_KEY = "lm loss"  # the loss functions' report key for the loss itself (algorithms/losses.py)


def reduce_reports(reports: list[dict], keys: tuple[str, ...] = (LOSS_KEY,)) -> dict[str, tuple[float, float]]:
    """Sum the last stage's report pairs `[sum, count]` over microbatches and DP; share them
    with every pipeline stage. `keys`: what the stage's loss function reports (known on every
    stage, so no object exchange is needed). Returns {key: (sum, count)} on every rank."""
    total = torch.zeros(len(keys), 2, dtype=torch.float64)
    for item in reports:
        for i, k in enumerate(keys):
            if k in item:
                total[i] += item[k].double()
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return {k: (float(total[i, 0]), float(total[i, 1])) for i, k in enumerate(keys)}


def report_means(reduced: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Report means by key, loss excluded (e.g. `pair_accuracy`)."""
    return {k.replace(" ", "_"): s / c for k, (s, c) in reduced.items() if k != LOSS_KEY and c}


def forward_only(model_chunks: list, microbatches: list[dict], *, forward_step: Callable, seq_length: int,
                 micro_batch_size: int, collect_data: bool = False, report_keys: tuple[str, ...] = (LOSS_KEY,)):
    """Run the forward pass of every microbatch (no grad). `collect_data=False`: the reduced
    reports {key: (sum, count)}; True: the loss functions' non-loss outputs of this rank's
    last pipeline stage (a list, one entry per microbatch; empty on other stages)."""
    for chunk in model_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(microbatches), model=model_chunks,
                num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
                forward_only=True, collect_non_loss_data=collect_data,
            )
    finally:
        for chunk in model_chunks:
            chunk.train()
    return list(out) if collect_data else reduce_reports(out, report_keys)


def train_step(model_chunks: list, optimizer, microbatches: Iterable[dict], *, num_microbatches: int,
               seq_length: int, micro_batch_size: int, forward_step: Callable,
               on_before_bias_update: Callable | None = None, report_keys: tuple[str, ...] = (LOSS_KEY,)) -> StepResult:
    """One global-batch step: forward/backward over this rank's microbatches, then update.

    `on_before_bias_update(model_chunks)` runs after the optimizer step while the routers'
    expert-load counts of this batch are still there; its result is `StepResult.extra`."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    success, grad_norm, _ = optimizer.step()
    extra = on_before_bias_update(model_chunks) if on_before_bias_update else None
    update_expert_bias(model_chunks)
    reduced = reduce_reports(losses, report_keys)
    loss_sum, count = reduced[LOSS_KEY]
    return StepResult(loss=loss_sum / count, grad_norm=float(grad_norm or 0.0), num_tokens=int(count),
                      update_successful=bool(success), extra=extra, metrics=report_means(reduced))
