"""The one training loop every stage runs on.

An algorithm (training/algorithm.py) contributes its roles, the experience source that produces
its batches, forward-only passes before the update, the updates a batch feeds and each role's
loss; everything else — parallel init, each role's model and weights, Megatron DDP and optimizer,
LR schedule, the step on Megatron's schedules, checkpoints and resume, metrics and curves — is
here, once. Per step: batch = source.next_batch → algorithm.prepare → the updates → source.after_update
(e.g. push weights to the rollout engine) → metrics, evaluation, checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_ernie.errors import ConfigError
from megatron_ernie.training.config import DType, RunConfig, to_yaml


@dataclass
class RunResult:
    out_dir: Path
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (this process's run)
    checkpoint: Path | None = None
    curves: Path | None = None
    metrics: dict[int, dict] = field(default_factory=dict)  # step -> the loss function's other reports
    evaluation: dict[int, dict] = field(default_factory=dict)  # step -> the stage's evaluation


def model_args(cfg: RunConfig):
    """The model shape: `model.hf_config`, else the HF dir or checkpoint we start from, else the preset."""
    from megatron_ernie.conversion.locate import locate
    from megatron_ernie.models.ernie import from_hf_config, preset

    start = locate(cfg.model.init_from) if cfg.model.init_from else None
    if cfg.model.hf_config:
        args = from_hf_config(cfg.model.hf_config)
    elif start is not None and start.config is not None:
        args = from_hf_config(start.config)
    else:
        args = preset(cfg.model.preset)
    knobs = {k: getattr(cfg.model, k) for k in ("moe_aux_loss_coeff", "moe_orthogonal_loss_coeff", "moe_bias_update_rate")
             if getattr(cfg.model, k) is not None}
    return args.replace(**knobs) if knobs else args


def _start_assets(cfg: RunConfig):
    """The HF files (config, tokenizer, generation config) of the model the run starts from."""
    from megatron_ernie.conversion.locate import locate

    return locate(cfg.model.init_from).assets if cfg.model.init_from else None


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


def _init_weights(model, init_from: str | None, args, keep_init: tuple[str, ...] = (), role: str | None = None) -> str:
    from megatron_ernie.conversion.locate import locate
    from megatron_ernie.conversion.mcore_model import load_model_checkpoint
    from megatron_ernie.models.ernie.hf_adapter import load_hf_weights

    if not init_from:
        return "random"
    start = locate(init_from)
    if start.kind == "hf":
        load_hf_weights(model, start.dir, args, keep_init=keep_init)
    else:
        load_model_checkpoint(model, start.dir, keep_init=keep_init, role=role)
    return start.kind


def _scheduler(optimizer, cfg: RunConfig):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, steps = cfg.optim, cfg.train.steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(steps, o.warmup_steps + 1), lr_decay_style=o.decay.value,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=steps, wd_incr_style="constant",
    )


def _build_role(role, cfg: RunConfig, args, layout):
    """A role's model (its head, its initial weights); trainable: DDP, optimizer and LR schedule."""
    from megatron_ernie.models.ernie.model import build_model
    from megatron_ernie.training.algorithm import RoleModel
    from megatron_ernie.training.step import attach_schedule_hooks, build_optimizer, wrap_ddp

    from megatron_ernie.runtime.distributed import seed_everything

    seed_everything(cfg.train.seed)  # every role from the same draw: a random start is one model for all roles
    model = build_model(args, layout, dtype=_dtype(cfg), head=role.head)
    init = _init_weights(model, role.init_from or cfg.model.init_from, args, keep_init=role.keep_init,
                         role=role.name if role.init_from else None)
    if not role.trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        return RoleModel(role, [model.eval()]), init
    ddp = wrap_ddp(model, layout)
    o = cfg.optim
    optimizer = build_optimizer([ddp], layout, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                clip_grad=o.clip_grad, betas=(o.beta1, o.beta2), eps=o.eps)
    attach_schedule_hooks([ddp], optimizer)
    return RoleModel(role, [ddp], optimizer, _scheduler(optimizer, cfg)), init


def _apply_update(algorithm, run, update, on_main: bool):
    from megatron_ernie.models.ernie.router import expert_load_balance
    from megatron_ernie.training.step import train_step

    part = run.models[update.role]
    return train_step(part.chunks, part.optimizer, update.microbatches, num_microbatches=len(update.microbatches),
                      seq_length=update.seq_length, micro_batch_size=update.rows_per_microbatch,
                      forward_step=algorithm.forward_step(update.role),
                      on_before_bias_update=expert_load_balance if on_main else None,
                      report_keys=algorithm.report_keys(update.role))


def _step_metrics(results: dict[str, list], models: dict) -> dict[str, float]:
    """One row per step: each trained role's mean over its updates; the main role unprefixed."""
    from megatron_ernie.training.algorithm import MAIN

    row = {}
    for name, steps in results.items():
        key = "" if name == MAIN else f"{name}/"
        n = len(steps)
        row[key + "loss"] = sum(r.loss for r in steps) / n
        row[key + "lr"] = models[name].optimizer.param_groups[0]["lr"]
        row[key + "grad_norm"] = sum(r.grad_norm for r in steps) / n
        row[key + "loss_tokens"] = sum(r.num_tokens for r in steps)
        for m in steps[0].metrics:
            row[key + m] = sum(r.metrics[m] for r in steps) / n
        if n > 1:
            row[key + "updates"] = n
    return row


def run(cfg: RunConfig, algorithm, progress: bool = True) -> RunResult:
    """Train `algorithm` as configured; resumes from the latest checkpoint in `out_dir` if any."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from megatron_ernie.models.ernie import to_hf_config
    from megatron_ernie.runtime import initialize
    from megatron_ernie.runtime.faults import maybe_fail
    from megatron_ernie.training.algorithm import MAIN, Run
    from megatron_ernie.training.checkpoint import CheckpointManager
    from megatron_ernie.training.metrics import MetricsWriter

    _check_packing_support(cfg)
    args = model_args(cfg)
    layout = _layout(cfg)
    env = initialize(layout, args, seed=cfg.train.seed)
    out = Path(cfg.out_dir)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    tokenizer = algorithm.build_tokenizer(cfg)
    if len(tokenizer) > args.vocab_size:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens, model {args.name} only {args.vocab_size}")
    run_ = Run(cfg, args, layout, tokenizer, models={}, dp_size=dp, dp_rank=dp_rank)
    source = algorithm.build_source(run_)
    inits = {}
    for role in algorithm.roles:
        run_.models[role.name], inits[role.name] = _build_role(role, cfg, args, layout)
    states = {"source": source, **algorithm.states()}

    manager = CheckpointManager(out / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.optim_format.value)
    assets = _start_assets(cfg)
    resume_from = manager.latest() if cfg.checkpoint.resume else None
    start = manager.load(resume_from, run_.models, states) if resume_from is not None else 0

    is_logger = env.rank == env.world_size - 1  # holds the loss under PP
    metrics = MetricsWriter(out, enabled=is_logger, resume_step=start if resume_from else None)
    if is_logger:
        (out / "run_config.yaml").write_text(to_yaml(cfg))
        where = (f"resumed at step {start} from {resume_from}" if resume_from
                 else "weights: " + ", ".join(f"{k} {v}" if len(inits) > 1 else v for k, v in inits.items()))
        print(f"[{cfg.name}] {args.name} tp={layout.tp} pp={layout.pp} ep={layout.ep} dp={dp}; "
              f"{algorithm.source_stats(source)}; {where}", flush=True)
    result = RunResult(out_dir=out)
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (is_logger and progress), desc=cfg.name)
    trainable = {name: part for name, part in run_.models.items() if part.trainable}
    if start == 0 and cfg.train.eval_at_start:  # the baseline: where the stage starts from
        _evaluate(algorithm, run_, 0, result, metrics, bar, cfg)
    for step in range(start + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()  # the whole iteration: batch building included
        run_.step = step
        run_.metrics.clear()
        raw = source.next_batch(step)
        t1 = time.perf_counter()
        batch = algorithm.prepare(raw, run_)
        t2 = time.perf_counter()
        results: dict[str, list] = {}
        sequences = 0
        for update in algorithm.updates(batch, run_):
            out_ = _apply_update(algorithm, run_, update, on_main=update.role == MAIN)
            results.setdefault(update.role, []).append(out_)
            sequences += len(update.microbatches) * update.rows_per_microbatch * dp
        t3 = time.perf_counter()
        source.after_update(step, run_)
        dt = time.perf_counter() - t0
        # where the step went: batch (RL: rollout + rewards), prepare (forward-only passes), the
        # updates, after_update (RL: the refit)
        timing = {"time/batch_s": t1 - t0, "time/prepare_s": t2 - t1, "time/train_s": t3 - t2,
                  "time/after_update_s": t0 + dt - t3}
        row = _step_metrics(results, run_.models)
        row.update(algorithm.step_metrics(row))
        for part in trainable.values():
            part.scheduler.step(increment=1)
        main = results.get(MAIN)  # None: the main role did not train this step (e.g. a critic warm-up)
        result.losses[step] = float("nan") if main is None else main[-1].loss if len(main) == 1 else row["loss"]
        head = {k: row.pop(k) for k in ("loss", "lr", "grad_norm", "loss_tokens") if k in row}
        result.metrics[step] = dict(row)
        loads = {f"moe_load_max_over_mean/layer{i}": v for i, v in ((main[-1].extra if main else None) or {}).items()}
        metrics.log(step, **head, tokens_per_s=sequences * cfg.data.seq_length / dt,
                    **row, **loads, **getattr(source, "last_metrics", {}), **run_.metrics, **timing)
        if _evaluation_due(cfg, step):
            _evaluate(algorithm, run_, step, result, metrics, bar, cfg)
        bar.update(1)
        bar.set_postfix(loss=f"{result.losses[step]:.4f}")
        if step % cfg.checkpoint.interval == 0 or step == cfg.train.steps:
            result.checkpoint = manager.save(step, run_.models, states, hf_config=to_hf_config(args),
                                             assets_from=assets, run_config=to_yaml(cfg), tokenizer=tokenizer)
        maybe_fail(f"after_step:{step}")  # crash tests: a kill -9 between steps
    bar.close()
    result.curves = metrics.close(("loss", "lr", "tokens_per_s", "grad_norm", *algorithm.curves))
    result.checkpoint = result.checkpoint or manager.latest()
    return result


def _evaluate(algorithm, run_, step: int, result, metrics, bar, cfg: RunConfig) -> None:
    evaluation = algorithm.evaluate(run_)
    if evaluation is not None:
        result.evaluation[step] = evaluation
        metrics.log(step, **evaluation)
        bar.write(f"[{cfg.name}] step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items()))


def _evaluation_due(cfg: RunConfig, step: int) -> bool:
    every = cfg.train.eval_interval
    return step == cfg.train.steps or (every > 0 and step % every == 0)


def _check_packing_support(cfg: RunConfig) -> None:
    """Packed sequences are isolated per document by an explicit attention mask, which the local
    spec's attention honours. Transformer Engine's causal attention ignores explicit masks; it
    needs THD-format PackedSeqParams (cu_seqlens), not implemented yet: refuse rather than let
    documents attend to each other."""
    from megatron_ernie.models.ernie.spec import te_available

    if cfg.data.pack and te_available():
        raise ConfigError("data.pack=true is not supported on the Transformer Engine spec yet "
                          "(needs PackedSeqParams); run with data.pack=false")
