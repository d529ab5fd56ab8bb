"""Scoring with a trained reward model (DRM: Bradley-Terry; RDRM: reference-guided).

`RewardModelScorer.from_checkpoint(dir)` loads what `recipe=reward_model` wrote (a checkpoint
directory or the run's directory) into this process at the current Megatron parallel layout
(one process when none is set up) and scores samples the way they were trained: the same chat
rendering, the reference answer in the input when the model was trained with references
(`data.use_reference`), the value at the last token. Scores are deterministic: the same batch
scores bit-identically every time; every sequence is padded to the same fixed length, so
batch-mates change a score only through the MoE experts' GEMM shapes (~1e-7 relative).

Sources: `drm` (the response alone) and `rdrm` (needs `sample.reference`; a sample without one
is a failed result, not a silent DRM score).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from megatron_ernie.errors import CheckpointError, ConfigError
from megatron_ernie.rewards.types import RewardResult, RewardSample, register_source


class NotARewardModel(CheckpointError):
    """A checkpoint without a reward head (e.g. a language model's): the path named."""


def _checkpoint(path: str | Path):
    """The Megatron checkpoint at `path` (a checkpoint, or a training run: its latest complete one)."""
    from megatron_ernie.conversion.locate import locate

    found = locate(path)
    if found.kind != "mcore":
        raise NotARewardModel(f"{path}: an HF model directory, not a reward-model checkpoint "
                              "(expected a recipe=reward_model checkpoint or run directory)")
    return found


def _run_settings(ckpt: Path) -> dict:
    """seq_length and use_reference the model was trained with (its run_config.yaml)."""
    import yaml

    cfg_path = ckpt / "run_config.yaml"
    data = (yaml.safe_load(cfg_path.read_text()) or {}).get("data", {}) if cfg_path.exists() else {}
    return {"seq_length": int(data.get("seq_length", 512)), "use_reference": bool(data.get("use_reference", True)),
            "empty_think": bool(data.get("empty_think_for_non_thinking", True))}


def _ensure_parallel_state(args) -> None:
    from megatron.core import parallel_state as ps

    from megatron_ernie.runtime import ParallelLayout, initialize

    if not ps.model_parallel_is_initialized():
        initialize(ParallelLayout(), args, environ=_single_process_env())


def _single_process_env() -> dict:
    import os

    from megatron_ernie.runtime.distributed import free_port

    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    return env or {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def values_func(end_index: torch.Tensor, output: torch.Tensor, non_loss_data: bool = False):
    from megatron_ernie.algorithms.reward_model import sequence_values

    return sequence_values(output, end_index)


class RewardModelScorer:
    def __init__(self, model_chunks: list, tokenizer, *, seq_length: int, use_reference: bool,
                 empty_think: bool = True, micro_batch_size: int = 8):
        self.model_chunks = model_chunks
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.use_reference = use_reference
        self.empty_think = empty_think
        self.micro_batch_size = micro_batch_size
        self.truncated = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, micro_batch_size: int = 8, dtype: torch.dtype | None = None,
                        seq_length: int | None = None) -> "RewardModelScorer":
        from megatron.core import parallel_state as ps

        from megatron_ernie.conversion.mcore_format import McoreCheckpoint
        from megatron_ernie.conversion.mcore_model import load_model_checkpoint
        from megatron_ernie.data.tokenizer import load_tokenizer
        from megatron_ernie.models.ernie import from_hf_config
        from megatron_ernie.models.ernie.hf_adapter import REWARD_HEAD
        from megatron_ernie.models.ernie.model import build_model
        from megatron_ernie.runtime import ParallelLayout

        found = _checkpoint(path)
        ckpt = found.dir
        if REWARD_HEAD not in McoreCheckpoint(ckpt).tensors:
            raise NotARewardModel(f"{ckpt}: no {REWARD_HEAD} — not a reward-model checkpoint (train one with recipe=reward_model)")
        if found.config is None:
            raise CheckpointError(f"{ckpt}: no hf/config.json, the model's shape (training writes it with every checkpoint)")
        args = from_hf_config(found.config)
        _ensure_parallel_state(args)
        layout = ParallelLayout(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                                ep=ps.get_expert_model_parallel_world_size())
        model = build_model(args, layout, dtype=dtype or torch.float32, head="scalar")
        load_model_checkpoint(model, ckpt)
        model.eval()
        settings = _run_settings(ckpt)
        return cls([model], load_tokenizer(found.assets), seq_length=seq_length or settings["seq_length"],
                   use_reference=settings["use_reference"], empty_think=settings["empty_think"],
                   micro_batch_size=micro_batch_size)

    def input_ids(self, sample: RewardSample) -> list[int]:
        from megatron_ernie.data.preference import reward_input_ids

        reference = sample.reference if self.use_reference else None
        ids = reward_input_ids([{"role": "user", "content": sample.prompt}], sample.response, self.tokenizer,
                               reference=reference, empty_think=self.empty_think)
        if len(ids) > self.seq_length:  # keep the response end, where the value is read
            self.truncated += 1
            ids = ids[-self.seq_length:]
        return ids

    @torch.no_grad()
    def values(self, samples: Sequence[RewardSample]) -> list[float]:
        """The model's reward for each sample (same on every rank of the model-parallel group)."""
        from megatron.core import parallel_state as ps

        from megatron_ernie.algorithms.reward_model import forward_step
        from megatron_ernie.data.preference import collate_sequences
        from megatron_ernie.training.step import forward_only

        if not samples:
            return []
        seqs = [self.input_ids(s) for s in samples]
        mbs = self.micro_batch_size
        pad = (-len(seqs)) % mbs  # the schedule wants equal microbatches: pad with a copy, drop after
        padded = seqs + [seqs[-1]] * pad
        micro = [collate_sequences(padded[k:k + mbs], self.seq_length) for k in range(0, len(padded), mbs)]
        out = forward_only(self.model_chunks, micro, forward_step=partial(forward_step, loss_func=values_func),
                           seq_length=self.seq_length,
                           micro_batch_size=mbs, collect_data=True)
        values = torch.cat(out) if out else torch.zeros(len(padded))
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(values, src=ps.get_pipeline_model_parallel_last_rank(),
                                        group=ps.get_pipeline_model_parallel_group())
        return values[:len(seqs)].tolist()


class RewardModelSource:
    """A reward source over a `RewardModelScorer` (built lazily from `checkpoint`, or given)."""

    def __init__(self, checkpoint: str | None = None, scorer: RewardModelScorer | None = None,
                 require_reference: bool = False, micro_batch_size: int = 8):
        if scorer is None and checkpoint is None:
            raise ConfigError("a reward-model source needs `checkpoint` (a recipe=reward_model output) or a scorer")
        self.name = "rdrm" if require_reference else "drm"
        self._checkpoint, self._scorer = checkpoint, scorer
        self.require_reference = require_reference
        self.micro_batch_size = micro_batch_size

    @property
    def scorer(self) -> RewardModelScorer:
        if self._scorer is None:
            self._scorer = RewardModelScorer.from_checkpoint(self._checkpoint, micro_batch_size=self.micro_batch_size)
        return self._scorer

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(samples)
        todo = []
        for i, s in enumerate(samples):
            if self.require_reference and not s.reference:
                results[i] = RewardResult.failure(self.name, "no reference answer (RDRM needs sample.reference)")
            else:
                todo.append(i)
        if todo:
            try:
                values = self.scorer.values([samples[i] for i in todo])
            except Exception as e:  # noqa: BLE001 - the batch fails as a whole, counted, never raised
                values = None
                for i in todo:
                    results[i] = RewardResult.failure(self.name, f"reward model failed: {type(e).__name__}: {e}")
            for i, v in zip(todo, values or []):
                results[i] = RewardResult(float(v), self.name, details={"raw": float(v)})
        return results


@register_source("drm")
def drm(checkpoint: str | None = None, scorer: RewardModelScorer | None = None, micro_batch_size: int = 8):
    return RewardModelSource(checkpoint, scorer, require_reference=False, micro_batch_size=micro_batch_size)


@register_source("rdrm")
def rdrm(checkpoint: str | None = None, scorer: RewardModelScorer | None = None, micro_batch_size: int = 8):
    return RewardModelSource(checkpoint, scorer, require_reference=True, micro_batch_size=micro_batch_size)
