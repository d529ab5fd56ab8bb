"""`megatron-ernie-eval`: held-out evaluation of a policy (rl/evaluate.py) from the command line.

    megatron-ernie-eval --model runs/grpo --prompts held_out.jsonl --rewards recipes/rewards/ernie45_llm.yaml \
        --samples 8 --max-new-tokens 512 --out eval.json

`--model`: an HF model directory, a Megatron checkpoint (a `step_NNNNNNNN/` of a
`python -m megatron_ernie.train` run, or a converted one) or a run directory (its latest
checkpoint) — `conversion/locate.py` decides. One process (TP=PP=EP=1); a Megatron checkpoint is
loaded as the training loop loads `model.init_from` and pushed into the engine with the RL refit.

Defaults taken from a training checkpoint's `run_config.yaml`: the reward config (`rl.rewards`),
the thinking mode (`rl.rollout.thinking`). Tokenizer: `--tokenizer`, else the model's own (an HF
dir's, a checkpoint's `hf/`), else the run's `data.tokenizer`, else the bundled demo tokenizer.
Without any reward config, a rules-only one scores the `math` domain (math verifier; multiple
choice for task `multiple_choice`); other domains then need `--rewards`.

Prints the JSON result and writes it to `--out` (atomically). Errors a user can fix (a missing
file, a bad JSONL line `file:line`, a prompt without a reward route, a bad checkpoint) print one
line and exit with 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_ernie.errors import CheckpointError, ConfigError, UserError

DEFAULT_REWARDS = {  # rules only: nothing to load
    "sources": {"math": {"type": "math"}, "choice": {"type": "multiple_choice"}},
    "routes": [{"domain": "math", "task": "multiple_choice", "combine": {"choice": 1.0}},
               {"domain": "math", "combine": {"math": 1.0}}],
}


def _args(argv):
    from megatron_ernie.rl.evaluate import CORRECT

    p = argparse.ArgumentParser(prog="megatron-ernie-eval", description="Held-out accuracy / pass@k of a policy.")
    p.add_argument("--model", required=True, help="HF model dir, Megatron checkpoint or training run directory")
    p.add_argument("--prompts", required=True, help="prompt JSONL file(s), comma separated (rl.rollout.prompts format)")
    p.add_argument("--rewards", default=None, help="reward router YAML (default: the run's rl.rewards, else rules only)")
    p.add_argument("--samples", type=int, default=1, help="k > 1: also pass@k over k samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="of the pass@k samples (accuracy is greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--threshold", type=float, default=CORRECT,
                   help="correct when the raw combined reward >= this (default 1 - 1e-6: fully correct)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("megatron", "hf", "vllm"), default="megatron")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir, or 'demo' for the bundled one")
    thinking = p.add_mutually_exclusive_group()
    thinking.add_argument("--thinking", dest="thinking", action="store_true", default=None)
    thinking.add_argument("--no-thinking", dest="thinking", action="store_false",
                          help="prompts end with an empty think block (non-thinking mode)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def _run_config(start) -> dict:
    """A training checkpoint's run_config.yaml as a plain dict ({} when there is none)."""
    import yaml

    path = Path(start.dir) / "run_config.yaml"
    if start.kind != "mcore" or not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML ({e})") from None


def _get(cfg: dict, dotted: str):
    for key in dotted.split("."):
        cfg = cfg.get(key) if isinstance(cfg, dict) else None
    return cfg


def _tokenizer(choice: str | None, start, run_cfg: dict):
    from megatron_ernie.data.tokenizer import demo_tokenizer, load_tokenizer

    if choice == "demo":
        return demo_tokenizer()
    path = choice or start.tokenizer or _get(run_cfg, "data.tokenizer")
    if path is None:
        return demo_tokenizer()
    if not Path(path).is_dir():
        raise ConfigError(f"tokenizer {path}: no such directory")
    return load_tokenizer(path)


def _router(path: str | None, run_cfg: dict):
    from megatron_ernie.rewards.cli import load_router
    from megatron_ernie.rewards.router import RewardRouter

    path = path or _get(run_cfg, "rl.rewards")
    if path is None:
        return RewardRouter.from_config(DEFAULT_REWARDS), "rules-only default"
    return load_router(str(path)), str(path)


def _dtype():
    import torch

    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _init_megatron(args, seed: int):
    """One-process parallel state (TP=PP=EP=1), on a free local port."""
    from megatron_ernie.runtime import ParallelLayout, initialize
    from megatron_ernie.runtime.distributed import free_port

    layout = ParallelLayout()
    initialize(layout, args, seed=seed, environ={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    return layout


def _megatron_model(start, args, layout):
    """The checkpoint's weights in a Megatron model, loaded as the training loop loads model.init_from."""
    from megatron_ernie.models.ernie.model import build_model
    from megatron_ernie.training.loop import _init_weights

    model = build_model(args, layout, dtype=_dtype())
    _init_weights(model, str(start.dir), args)
    return model.eval()


def build_engine(kind: str, start, args, eos: tuple[int, ...], seed: int):
    """The rollout engine holding the model's weights (Megatron's one-process parallel state is
    brought up when a Megatron model or engine is needed)."""
    import torch

    from megatron_ernie.rl.refit import refit

    if kind == "vllm":
        if start.kind != "hf":
            raise CheckpointError(f"{start.dir}: --engine vllm needs an HF model directory "
                                  "(export the checkpoint with megatron-ernie-convert, or use --engine megatron)")
        from megatron_ernie.rl.vllm_engine import VLLMEngine

        return VLLMEngine(Path(start.dir), seed=seed, eos_token_ids=eos)
    if kind == "hf" and start.kind == "hf":
        from megatron_ernie.rl.hf_engine import HFEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return HFEngine.from_pretrained(start.dir, dtype=_dtype(), device=device, eos_token_ids=eos)
    layout = _init_megatron(args, seed)
    if kind == "megatron":
        from megatron_ernie.rl.megatron_engine import MegatronEngine

        if start.kind == "hf":
            return MegatronEngine(args, layout, dtype=_dtype(), eos_token_ids=eos, seed=seed, init_from=start.dir)
        engine = MegatronEngine(args, layout, dtype=_dtype(), eos_token_ids=eos, seed=seed)
    else:  # an HF engine on a Megatron checkpoint: the model built from its config, weights refit
        from transformers import AutoConfig, AutoModelForCausalLM

        from megatron_ernie.models.ernie import to_hf_config
        from megatron_ernie.rl.hf_engine import HFEngine

        hf = to_hf_config(args)
        config = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
        model = AutoModelForCausalLM.from_config(config).to(_dtype())
        engine = HFEngine(model.to("cuda" if torch.cuda.is_available() else "cpu"), eos_token_ids=eos)
    model = _megatron_model(start, args, layout)
    refit(engine, [model], args)
    del model
    return engine


@dataclass
class OpenedModel:
    """A model to evaluate or sample, before its weights load (`engine()` loads them)."""

    start: Any  # conversion.locate.Located
    run_cfg: dict  # the training run's config ({} for an HF dir)
    tokenizer: Any
    args: Any  # ErnieArgs
    thinking: bool
    eos: tuple[int, ...]
    router: Any = None  # RewardRouter when prompts were checked against a reward config
    rewards: str | None = None  # where that config came from

    def chat(self):
        """(render, decode) as the RL stage renders prompts (rl/setup.chat_io)."""
        from megatron_ernie.rl.setup import chat_io

        return chat_io(self.tokenizer, self.thinking)

    def engine(self, kind: str, seed: int):
        return build_engine(kind, self.start, self.args, self.eos, seed)


def open_model(model: str, *, tokenizer: str | None = None, thinking: bool | None = None, prompts=None,
               rewards: str | None = None) -> OpenedModel:
    """Locate `model`, read its run config, tokenizer, shape, thinking mode (the flag, else the
    run's rl.rollout.thinking) and stop ids. With `prompts`: the reward router (`rewards`, else the
    run's rl.rewards) and the check that every prompt has a route — before the tokenizer or any
    weights load, so that a data mistake is reported first."""
    from megatron_ernie.conversion.locate import locate
    from megatron_ernie.models.ernie import from_hf_config
    from megatron_ernie.rl.engine import hf_eos_ids
    from megatron_ernie.rl.evaluate import check_routes, raw_router
    from megatron_ernie.rl.setup import stop_token_ids

    start = locate(model)
    if start.config is None:
        raise CheckpointError(f"{start.dir}: no config.json (a Megatron checkpoint needs its hf/ directory "
                              "with the model's config)")
    run_cfg = _run_config(start)
    router = source = None
    if prompts is not None:
        router, source = _router(rewards, run_cfg)
        check_routes(prompts, raw_router(router))
    tok = _tokenizer(tokenizer, start, run_cfg)
    args = from_hf_config(start.config)
    if len(tok) > args.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens, the model only {args.vocab_size}")
    think = thinking if thinking is not None else _get(run_cfg, "rl.rollout.thinking") is not False
    eos = tuple(sorted(set(stop_token_ids(tok)) | set(hf_eos_ids(start.assets) if start.assets else ())))
    return OpenedModel(start, run_cfg, tok, args, think, eos, router, source)


def guarded(body) -> int:
    """A command's body: a UserError prints one line and gives exit code 2 (no traceback); a
    process group the body brings up is taken down after."""
    import torch

    from megatron_ernie.runtime import shutdown

    ours = not torch.distributed.is_initialized()
    try:
        return body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if ours and torch.distributed.is_initialized():
            shutdown()


def main(argv=None) -> int:
    from megatron_ernie.rl.evaluate import evaluate
    from megatron_ernie.rl.rollout import load_prompts
    from megatron_ernie.runtime.atomic import atomic_file

    a = _args(argv)

    def body() -> int:
        if a.samples < 1 or a.max_new_tokens < 1 or a.batch_size < 1:
            raise ConfigError("--samples, --max-new-tokens and --batch-size must be >= 1")
        prompts = load_prompts([p.strip() for p in a.prompts.split(",")])
        m = open_model(a.model, tokenizer=a.tokenizer, thinking=a.thinking, prompts=prompts, rewards=a.rewards)
        metrics = evaluate(m.engine(a.engine, a.seed), prompts, m.router, *m.chat(), samples=a.samples,
                           max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                           seed=a.seed, threshold=a.threshold, batch_size=a.batch_size, progress=a.progress)
        result = {"model": str(m.start.dir), "kind": m.start.kind, "engine": a.engine, "prompts": a.prompts,
                  "rewards": m.rewards, "samples": a.samples, "max_new_tokens": a.max_new_tokens,
                  "temperature": a.temperature, "threshold": a.threshold, "seed": a.seed, "thinking": m.thinking,
                  "metrics": metrics}
        text = json.dumps(result, indent=1)
        if a.out is not None:
            with atomic_file(a.out) as f:
                f.write(text + "\n")
        print(text)
        return 0

    return guarded(body)


def engine_sampler(model: str, *, max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
                   tokenizer: str | None = None, thinking: bool | None = None, engine: str = "megatron"):
    """A prompt pre-filter's sampler (`rewards.filters.Sampler`: texts, k -> k responses each) over
    one of our rollout engines, on any model `--model` takes (HF dir, Megatron checkpoint, run):
    prompts rendered exactly as an RL stage renders them; seeded per (prompt, sample)."""
    from megatron_ernie.rl.engine import SamplingParams
    from megatron_ernie.rl.rollout import completion_seed

    m = open_model(model, tokenizer=tokenizer, thinking=thinking)
    eng, (render, decode) = m.engine(engine, seed), m.chat()
    seen = [0]

    def sample(prompts: list[str], k: int) -> list[list[str]]:
        base, seen[0] = seen[0], seen[0] + len(prompts)
        ids = [render([{"role": "user", "content": p}]) for p in prompts]
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=completion_seed(seed, base + i, s)) for i in range(len(prompts)) for s in range(k)]
        out = eng.generate([x for x in ids for _ in range(k)], params)
        texts = [decode(c.token_ids) for c in out]
        return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]

    return sample


def prefilter_main(argv=None) -> int:
    """`megatron-ernie-prefilter` (rewards/cli.py) whose --model may also be a Megatron checkpoint or
    run: sampled with the in-process engine, prompts rendered as the RL stage renders them."""
    from megatron_ernie.conversion.locate import locate
    from megatron_ernie.rewards.cli import hf_sampler
    from megatron_ernie.rewards.cli import prefilter_main as run

    def make(args):
        if Path(args.model).is_dir() and locate(args.model).kind == "hf":
            return hf_sampler(args)
        return engine_sampler(args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              seed=args.seed, tokenizer=args.tokenizer, thinking=args.thinking)

    return run(argv, make)
