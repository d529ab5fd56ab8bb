"""Shared test fixtures: tiny reference models, a fixed batch, and gloo worlds on 127.0.0.1."""
from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_ernie.models.ernie import ErnieArgs, preset, to_hf_config
from megatron_ernie.rewards.types import PerSampleSource, RewardResult, register_source
from megatron_ernie.runtime.distributed import free_port  # noqa: F401 - tests import it from here


@register_source("test_vowels")
class VowelShare(PerSampleSource):
    """RL tests' reward: the share of vowels among the response's letters. Deterministic, and it
    varies between a tiny random model's samples (so group advantages are not all zero)."""

    name = "test_vowels"

    def __init__(self, name="test_vowels"):
        self.name = name

    def score_one(self, sample):
        letters = [c for c in sample.response.lower() if c.isalpha()]
        return RewardResult(sum(c in "aeiou" for c in letters) / max(len(letters), 1), self.name)


def hf_model(args: ErnieArgs, seed: int = 0, bias_std: float = 0.05):
    """A random `transformers` reference model of `args`' shape, with a non-zero correction bias."""
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM, Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    cfg = {k: v for k, v in to_hf_config(args).items() if k not in ("model_type", "architectures")}
    torch.manual_seed(seed)
    if args.is_moe:
        model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**cfg))
    else:
        model = Ernie4_5ForCausalLM(Ernie4_5Config(**cfg))
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                t.normal_(0.0, bias_std)
            elif name.endswith("mlp.gate.weight"):  # transformers 5 initialises the router to zeros:
                t.normal_(0.0, 0.1)  # every token would pick the same experts (by the bias alone)
    return model.eval()


def save_hf_model(args: ErnieArgs, path: Path, seed: int = 0) -> Path:
    hf_model(args, seed).save_pretrained(str(path))
    return path


def fixed_batch(args: ErnieArgs, n: int = 4, seq: int = 32, seed: int = 7) -> dict[str, torch.Tensor]:
    """n sequences: tokens, labels (next token), a loss mask with holes, positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, args.vocab_size, (n, seq + 1), generator=g)
    mask = (torch.rand(n, seq, generator=g) > 0.2).float()
    return {
        "tokens": ids[:, :-1].contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "loss_mask": mask,
        "position_ids": torch.arange(seq).unsqueeze(0).expand(n, -1).contiguous(),
    }


def _worker(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.pop("SLURM_PROCID", None)
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    except Exception:
        traceback.print_exc()
        raise


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks; raises if any rank fails."""
    mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)


TEST_MOE = preset("ernie45_tiny_moe")
TEST_DENSE = preset("ernie45_tiny_dense")
# Rollout-engine tests: vLLM's CPU attention refuses head_dim 16; 64 is the size known to run there.
ENGINE_MOE = TEST_MOE.replace(name="engine_tiny_moe", head_dim=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Engine tests: a tiny model gains nothing from more threads, and on shared cores OpenMP
    threads spin-waiting on busy cores made decoding ~20x slower. Import it into a test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- RL runs ------------------------------------------------------------------------------------
RL_PROMPTS = ("what is 2 + 3?", "spell cat", "say hello", "name a colour")


def rl_inputs(root: Path, reward: str = "test_vowels", normalize: str = "") -> list[str]:
    """A tiny engine MoE as an HF dir, four prompts and a one-source reward router under `root`:
    the overrides that point a run at them."""
    import json

    hf = save_hf_model(ENGINE_MOE, root / "hf") if not (root / "hf").exists() else root / "hf"
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "domain": "general"}) + "\n" for p in RL_PROMPTS))
    return [f"model.init_from={hf}", f"rl.rollout.prompts={prompts}", f"rl.rewards={rl_rewards(root, reward, normalize)}"]


def rl_rewards(root: Path, reward: str, normalize: str = "") -> Path:
    path = root / f"rewards_{reward}.yaml"
    path.write_text(f"sources:\n  r: {{type: {reward}}}\nroutes:\n  - {{domain: '*', combine: {{r: 1.0}}}}\n"
                    + (f"normalize: {normalize}\n" if normalize else ""))
    return path


def run_and_record(rank: int, world: int, overrides: list[str], out: Path, algorithm=None,
                   fault: str | None = None) -> None:
    """One training run (in a spawned rank): recipes + overrides, the stage's algorithm unless one
    is given; the last rank writes out/result.json with the losses (float hex) and metric rows."""
    import json

    from megatron_ernie import algorithms
    from megatron_ernie.training.config import compose
    from megatron_ernie.training.loop import run

    if fault:
        os.environ["MEGATRON_ERNIE_FAULT"] = fault
    cfg = compose([*overrides, f"out_dir={out}"])
    result = run(cfg, algorithm if algorithm is not None else algorithms.build(cfg.stage.value), progress=False)
    if rank == world - 1:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        (out / "result.json").write_text(json.dumps({"losses": {str(k): v.hex() for k, v in result.losses.items()},
                                                     "rows": rows}))


def recorded(out: Path) -> dict:
    import json

    return json.loads((out / "result.json").read_text())

