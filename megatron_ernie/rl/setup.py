"""An RL algorithm's experience source from the run's config (`rl:`): the rollout engine, the
reward router and the prompts. RL algorithms (algorithms/) call `build_rollout_source(run)` in
their `build_source`.

The engine starts without the policy's weights: the source refits it from the policy before its
first rollout (after a resume too), so engine and trainer always hold the same weights.
"""
from __future__ import annotations

from pathlib import Path

from megatron_ernie.errors import ConfigError
from megatron_ernie.rl.engine import SamplingParams


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """What ends an assistant turn: the tokenizer's EOS (and ERNIE's end-of-sentence token when
    the built-in chat format is in use)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    from megatron_ernie.data.chat import uses_chat_template

    if not uses_chat_template(tokenizer):
        from megatron_ernie.data.chat import ernie_special_ids

        ids.add(ernie_special_ids(tokenizer)[1])
    return tuple(sorted(ids))


def chat_io(tokenizer, thinking: bool):
    """(render, decode): a conversation's prompt ids up to the assistant turn as RL renders it,
    and a completion's text."""
    from megatron_ernie.data.chat import prompt_ids

    return (lambda messages: prompt_ids(messages, tokenizer, thinking=thinking),
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


def build_engine(run):
    """The configured rollout engine for this rank (context: data.seq_length + 1 tokens)."""
    r = run.cfg.rl.rollout
    common = dict(max_model_len=run.cfg.data.seq_length + 1, overlong=r.overlong_prompt.value,
                  eos_token_ids=stop_token_ids(run.tokenizer))
    kind = r.engine.value
    if kind == "megatron":
        from megatron_ernie.rl.megatron_engine import MegatronEngine

        return MegatronEngine(run.args, run.layout, seed=run.cfg.train.seed, **common)
    if kind == "hf":
        from transformers import AutoConfig, AutoModelForCausalLM

        from megatron_ernie.models.ernie import to_hf_config
        from megatron_ernie.rl.hf_engine import HFEngine

        _single_model_rank(run, kind)
        hf = to_hf_config(run.args)
        config = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
        return HFEngine(AutoModelForCausalLM.from_config(config), **common)
    if kind == "vllm":
        from megatron_ernie.conversion.locate import locate
        from megatron_ernie.rl.vllm_engine import VLLMEngine

        _single_model_rank(run, kind)
        start = locate(run.cfg.model.init_from) if run.cfg.model.init_from else None
        if start is None or start.kind != "hf":
            raise ConfigError("rl.rollout.engine=vllm starts from an HF directory: set model.init_from to one "
                              "(export a checkpoint with megatron-ernie-convert)")
        replay = run.cfg.rl.router_replay.value == "rollout" and run.args.is_moe
        try:
            return VLLMEngine(Path(start.dir), seed=run.cfg.train.seed, return_routed_experts=replay, **common)
        except ConfigError as e:
            if replay:
                raise ConfigError(f"rl.router_replay=rollout with rl.rollout.engine=vllm: {e} "
                                  "(or set rl.router_replay=none: the mismatch is then measured, not removed)") from e
            raise
    raise ConfigError(f"rl.rollout.engine={kind!r}: unknown")


def _single_model_rank(run, kind: str) -> None:
    if run.layout.tp * run.layout.pp * run.layout.ep > 1:
        raise ConfigError(f"rl.rollout.engine={kind} runs one engine per DP rank: it needs parallel.tp=pp=ep=1 "
                          f"(use rl.rollout.engine=megatron for model-parallel rollouts)")


def build_router(run):
    if not run.cfg.rl.rewards:
        return None
    import yaml

    from megatron_ernie.rewards.router import RewardRouter

    return RewardRouter.from_config(yaml.safe_load(rewards_path(run.cfg.rl.rewards).read_text()))


def rewards_path(spec: str) -> Path:
    """A reward router YAML: as given, else relative to the repository (`recipes/rewards/...`
    from any working directory)."""
    from megatron_ernie.training.config import recipes_dir

    path = Path(spec)
    if not path.exists() and not path.is_absolute() and (recipes_dir().parent / path).exists():
        path = recipes_dir().parent / path
    if not path.exists():
        raise ConfigError(f"rl.rewards={spec}: file not found")
    return path


def build_rollout_source(run, policy_role: str = "policy", mini_batches: int = 1):
    from megatron.core import parallel_state as ps

    from megatron_ernie.rl.rollout import RolloutSource, load_prompts

    cfg, r = run.cfg, run.cfg.rl.rollout
    if not r.prompts:
        raise ConfigError("rl.rollout.prompts: a prompt JSONL file is required")
    # routed experts: replayed, or (without replay) compared with the trainer's to measure the mismatch —
    # except on an engine that cannot return them unless replay needs them (vLLM on CPU: it then refuses)
    replay = cfg.rl.router_replay.value == "rollout"
    routed = run.args.is_moe and (replay or r.engine.value != "vllm")
    sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, return_routed_experts=routed)
    render, decode = chat_io(run.tokenizer, r.thinking)
    prompts, router = load_prompts([p.strip() for p in r.prompts.split(",")]), build_router(run)
    if router is not None:  # a prompt no route scores is refused now, not trained on with reward 0
        from megatron_ernie.rl.evaluate import check_routes

        check_routes(prompts, router)
    return RolloutSource(
        prompts, build_engine(run), router,
        render=render, decode=decode,
        prompts_per_step=r.prompts_per_step, samples_per_prompt=r.samples_per_prompt, sampling=sampling,
        seed=cfg.train.seed, dp_size=run.dp_size, dp_rank=run.dp_rank,
        dp_group=ps.get_data_parallel_group() if run.dp_size > 1 else None,
        refit_bucket_mb=r.refit_bucket_mb, policy_role=policy_role, run=run, mini_batches=mini_batches)
