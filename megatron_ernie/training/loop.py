"""The one training loop every stage runs on.

A stage contributes a tokenizer, a dataset of samples, how samples become a micro-batch and a
forward step (its loss); everything else — parallel init, model and weights, Megatron DDP and
optimizer, LR schedule, the step on Megatron's schedules, checkpoints and resume, metrics and
curves — is here, once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_ernie.training.config import DType, RunConfig, to_yaml


@dataclass
class RunResult:
    out_dir: Path
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (this process's run)
    checkpoint: Path | None = None
    curves: Path | None = None
    metrics: dict[int, dict] = field(default_factory=dict)  # step -> the loss function's other reports
    evaluation: dict[int, dict] = field(default_factory=dict)  # step -> the stage's evaluation


def stage_module(name: str):
    """A stage: build_tokenizer, build_dataset, microbatch, forward_step; optionally HEAD
    ("lm" | "scalar"), ROWS_PER_ITEM (sequences per dataset item), KEEP_INIT (parameters an
    initial checkpoint may lack), REPORT_KEYS (what its loss reports) and evaluate()."""
    from megatron_ernie.algorithms import reward_model, sft

    return {"sft": sft, "reward_model": reward_model}[name]


def model_args(cfg: RunConfig):
    """The model shape: the HF dir or checkpoint we start from, else `model.hf_config`, else the preset."""
    from megatron_ernie.models.ernie import from_hf_config, preset

    src = _init_kind(cfg.model.init_from)
    if cfg.model.hf_config:
        args = from_hf_config(cfg.model.hf_config)
    elif src == "hf":
        args = from_hf_config(cfg.model.init_from)
    elif src == "mcore" and (Path(_mcore_dir(cfg.model.init_from)) / "hf" / "config.json").exists():
        args = from_hf_config(Path(_mcore_dir(cfg.model.init_from)) / "hf" / "config.json")
    else:
        args = preset(cfg.model.preset)
    knobs = {k: getattr(cfg.model, k) for k in ("moe_aux_loss_coeff", "moe_orthogonal_loss_coeff", "moe_bias_update_rate")
             if getattr(cfg.model, k) is not None}
    return args.replace(**knobs) if knobs else args


def _init_kind(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    if (p / "metadata.json").exists() or (p / "latest").exists():
        return "mcore"
    if (p / "config.json").exists():
        return "hf"
    raise FileNotFoundError(f"model.init_from={path}: neither an HF model directory nor a Megatron checkpoint")


def _mcore_dir(path: str) -> Path:
    """A checkpoint directory, or a training run's checkpoints root (its latest)."""
    from megatron_ernie.training.checkpoint import CheckpointManager

    p = Path(path)
    if (p / "metadata.json").exists():
        return p
    latest = CheckpointManager(p).latest()
    if latest is None:
        raise FileNotFoundError(f"{p}: no complete checkpoint")
    return latest


def _layout(cfg: RunConfig):
    from megatron_ernie.runtime import ParallelLayout

    p = cfg.parallel
    sp = p.sequence_parallel if p.sequence_parallel is not None else p.tp > 1
    return ParallelLayout(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, sequence_parallel=sp,
                          distributed_optimizer=p.distributed_optimizer)


def _dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.model.dtype == DType.auto:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if cfg.model.dtype == DType.bf16 else torch.float32


def _init_weights(model, cfg: RunConfig, args, keep_init: tuple[str, ...] = ()) -> str:
    from megatron_ernie.conversion.mcore_model import load_model_checkpoint
    from megatron_ernie.models.ernie.hf_adapter import load_hf_weights

    kind = _init_kind(cfg.model.init_from)
    if kind == "hf":
        load_hf_weights(model, cfg.model.init_from, args, keep_init=keep_init)
    elif kind == "mcore":
        load_model_checkpoint(model, _mcore_dir(cfg.model.init_from), keep_init=keep_init)
    return kind or "random"


def _scheduler(optimizer, cfg: RunConfig):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, steps = cfg.optim, cfg.train.steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(steps, o.warmup_steps + 1), lr_decay_style=o.decay.value,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=steps, wd_incr_style="constant",
    )


def _micro_batches(dataset, indices: list[int], micro_batch_size: int, make_batch) -> list[dict]:
    return [make_batch([dataset[i] for i in indices[k:k + micro_batch_size]])
            for k in range(0, len(indices), micro_batch_size)]


def run(cfg: RunConfig, progress: bool = True) -> RunResult:
    """Train one stage as configured; resumes from the latest checkpoint in `out_dir` if any."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from megatron_ernie.data.sft import GlobalBatches
    from megatron_ernie.models.ernie import to_hf_config
    from megatron_ernie.models.ernie.model import build_model
    from megatron_ernie.models.ernie.router import expert_load_balance
    from megatron_ernie.runtime import initialize
    from megatron_ernie.runtime.faults import maybe_fail
    from megatron_ernie.training.checkpoint import CheckpointManager, TrainerState
    from megatron_ernie.training.metrics import MetricsWriter
    from megatron_ernie.training.step import attach_schedule_hooks, build_optimizer, train_step, wrap_ddp

    stage = stage_module(cfg.stage.value)
    _check_packing_support(cfg)
    args = model_args(cfg)
    layout = _layout(cfg)
    env = initialize(layout, args, seed=cfg.train.seed)
    out = Path(cfg.out_dir)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if gbs % (mbs * dp):
        raise ValueError(f"train.global_batch_size={gbs} is not a multiple of micro_batch_size×DP = {mbs}×{dp}")

    tokenizer = stage.build_tokenizer(cfg)
    if len(tokenizer) > args.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, model {args.name} only {args.vocab_size}")
    dataset = stage.build_dataset(cfg, tokenizer)

    model = build_model(args, layout, dtype=_dtype(cfg), head=getattr(stage, "HEAD", "lm"))
    init = _init_weights(model, cfg, args, keep_init=getattr(stage, "KEEP_INIT", ()))
    rows = getattr(stage, "ROWS_PER_ITEM", 1)
    report_keys = getattr(stage, "REPORT_KEYS", ("lm loss",))
    ddp = wrap_ddp(model, layout)
    o = cfg.optim
    optimizer = build_optimizer([ddp], layout, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                clip_grad=o.clip_grad, betas=(o.beta1, o.beta2), eps=o.eps)
    attach_schedule_hooks([ddp], optimizer)
    scheduler = _scheduler(optimizer, cfg)

    manager = CheckpointManager(out / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.optim_format.value)
    state = TrainerState(step=0, consumed_samples=0)
    resume_from = manager.latest() if cfg.checkpoint.resume else None
    if resume_from is not None:
        state = manager.load(resume_from, ddp, optimizer, scheduler)
    batches = GlobalBatches(dataset, gbs, seed=cfg.train.seed, consumed_samples=state.consumed_samples)

    is_logger = env.rank == env.world_size - 1  # holds the loss under PP
    metrics = MetricsWriter(out, enabled=is_logger, resume_step=state.step if resume_from else None)
    if is_logger:
        (out / "run_config.yaml").write_text(to_yaml(cfg))
        where = f"resumed at step {state.step} from {resume_from}" if resume_from else f"weights: {init}"
        print(f"[{cfg.name}] {args.name} tp={layout.tp} pp={layout.pp} ep={layout.ep} dp={dp}; {len(dataset)} "
              f"sequences ({_stats_line(dataset)}); {where}", flush=True)
    result = RunResult(out_dir=out)
    bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not (is_logger and progress), desc=cfg.name)
    per_rank = gbs // dp
    for step in range(state.step + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()  # the whole iteration: batch building included
        indices = next(batches)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        micro = _micro_batches(dataset, indices, mbs, stage.microbatch)
        step_result = train_step([ddp], optimizer, micro, num_microbatches=len(micro),
                                 seq_length=cfg.data.seq_length, micro_batch_size=mbs * rows,
                                 forward_step=stage.forward_step, on_before_bias_update=expert_load_balance,
                                 report_keys=report_keys)
        dt = time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(increment=1)
        result.losses[step] = step_result.loss
        result.metrics[step] = step_result.metrics
        loads = {f"moe_load_max_over_mean/layer{i}": v for i, v in (step_result.extra or {}).items()}
        metrics.log(step, loss=step_result.loss, lr=lr, grad_norm=step_result.grad_norm,
                    tokens_per_s=gbs * rows * cfg.data.seq_length / dt, loss_tokens=step_result.num_tokens,
                    **step_result.metrics, **loads)
        if _evaluation_due(stage, cfg, step):
            result.evaluation[step] = stage.evaluate([ddp], cfg, tokenizer)
            metrics.log(step, **result.evaluation[step])
            bar.write(f"[{cfg.name}] step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.evaluation[step].items()))
        bar.update(1)
        bar.set_postfix(loss=f"{step_result.loss:.4f}")
        if step % cfg.checkpoint.interval == 0 or step == cfg.train.steps:
            result.checkpoint = manager.save(step, ddp, optimizer, scheduler, batches.consumed_samples,
                                             hf_config=to_hf_config(args), run_config=to_yaml(cfg),
                                             tokenizer=tokenizer)
        maybe_fail(f"after_step:{step}")  # crash tests: a kill -9 between steps
    bar.close()
    result.curves = metrics.close(("loss", "lr", "tokens_per_s", "grad_norm", *getattr(stage, "CURVES", ())))
    result.checkpoint = result.checkpoint or manager.latest()
    return result


def _evaluation_due(stage, cfg: RunConfig, step: int) -> bool:
    if not hasattr(stage, "evaluate"):
        return False
    every = cfg.train.eval_interval
    return step == cfg.train.steps or (every > 0 and step % every == 0)


def _check_packing_support(cfg: RunConfig) -> None:
    """Packed sequences are isolated per document by an explicit attention mask, which the local
    spec's attention honours. Transformer Engine's causal attention ignores explicit masks; it
    needs THD-format PackedSeqParams (cu_seqlens), not implemented yet: refuse rather than let
    documents attend to each other."""
    from megatron_ernie.models.ernie.spec import te_available
    from megatron_ernie.training.config import ConfigError

    if cfg.data.pack and te_available():
        raise ConfigError("data.pack=true is not supported on the Transformer Engine spec yet "
                          "(needs PackedSeqParams); run with data.pack=false")


def _stats_line(dataset) -> str:
    stats = getattr(dataset, "stats", {})
    keys = [k for k in ("samples", "pairs", "dropped_overlong", "truncated", "loss_tokens") if k in stats]
    return ", ".join(f"{k} {stats[k]}" for k in keys) or "no stats"
