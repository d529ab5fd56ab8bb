"""Reward model (DRM / RDRM): the ERNIE decoder with a scalar head, Bradley-Terry loss on pairs.

Batches: preference pairs (`data/preference.py`), rows 2k = chosen, 2k+1 = rejected; each row's
reward is the head's value at its last token. Loss per pair: −log σ(r_chosen − r_rejected),
averaged over the pairs of the global batch (the "token" count Megatron divides by is the pair
count). RDRM is the same model whose inputs carry the reference answer (`data.use_reference`).
Reported: pairwise accuracy (r_chosen > r_rejected) and the mean margin, in training and on the
held-out pairs (`data.eval_path`, default the bundled eval split) at `train.eval_interval` and
at the end.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_ernie.algorithms import sft
from megatron_ernie.models.ernie.hf_adapter import REWARD_HEAD

HEAD = "scalar"
ROWS_PER_ITEM = 2  # a dataset item is a pair: two sequences
KEEP_INIT = (REWARD_HEAD,)  # a language model's weights initialise everything but the head
REPORT_KEYS = ("lm loss", "pair_accuracy", "reward_margin")
build_tokenizer = sft.build_tokenizer  # the same rule: data.tokenizer, else init_from's, else the demo one


def _paths(spec: str | None, default) -> list[str]:
    return [p.strip() for p in spec.split(",")] if spec else [str(default)]


def build_dataset(cfg, tokenizer, split: str = "train"):
    from megatron_ernie.data.preference import PreferenceDataset, bundled_pairs_path

    spec = cfg.data.path if split == "train" else cfg.data.eval_path
    return PreferenceDataset(_paths(spec, bundled_pairs_path(split)), tokenizer, cfg.data.seq_length,
                             overlong=cfg.data.overlong.value, empty_think=cfg.data.empty_think_for_non_thinking,
                             use_reference=cfg.data.use_reference)


def microbatch(items: list[dict]) -> dict:
    from megatron_ernie.data.preference import collate_pairs

    return collate_pairs(items)


def sequence_values(output: torch.Tensor, end_index: torch.Tensor) -> torch.Tensor:
    """[b, s, 1] values -> [b] fp32: each row's value at its last token."""
    rows = torch.arange(output.shape[0], device=output.device)
    return output[rows, end_index.to(output.device), 0].float()


def bradley_terry_loss(end_index: torch.Tensor, output: torch.Tensor):
    """Megatron's loss-function contract: (loss sum, count, reports of [sum, count])."""
    r = sequence_values(output, end_index)
    margin = r[0::2] - r[1::2]
    loss_sum = -torch.nn.functional.logsigmoid(margin).sum()
    n = torch.tensor(margin.numel(), dtype=torch.int)
    count = float(margin.numel())
    reports = {
        "lm loss": torch.stack([loss_sum.detach(), torch.tensor(count)]),
        "pair_accuracy": torch.stack([(margin > 0).sum().float(), torch.tensor(count)]),
        "reward_margin": torch.stack([margin.detach().sum(), torch.tensor(count)]),
    }
    return loss_sum, n, reports


def forward_step(data_iterator, model, loss_func=bradley_terry_loss):
    """`loss_func(end_index, output)`: the BT loss in training; scoring passes one returning the values."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)  # causal; no labels: the values
    return output, partial(loss_func, batch["end_index"])


_EVAL_SETS: dict = {}


def evaluate(model_chunks: list, cfg, tokenizer) -> dict[str, float]:
    """Pairwise accuracy, margin and loss on the held-out pairs (split over DP ranks)."""
    from megatron.core import parallel_state as ps

    from megatron_ernie.training.step import forward_only

    key = (cfg.data.eval_path, cfg.data.seq_length, cfg.data.use_reference, id(tokenizer))
    if key not in _EVAL_SETS:  # rendered once per run, not at every evaluation
        _EVAL_SETS.clear()
        _EVAL_SETS[key] = build_dataset(cfg, tokenizer, split="eval")
    data = _EVAL_SETS[key]
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mbs = cfg.train.micro_batch_size
    usable = len(data) - len(data) % (dp * mbs)  # every rank runs the same number of microbatches
    if usable == 0:
        raise ValueError(f"data.eval_path: {len(data)} pairs, fewer than DP × micro_batch_size = {dp * mbs}")
    mine = list(range(rank, usable, dp))
    micro = [microbatch([data[i] for i in mine[k:k + mbs]]) for k in range(0, len(mine), mbs)]
    reduced = forward_only(model_chunks, micro, forward_step=forward_step, seq_length=cfg.data.seq_length,
                           micro_batch_size=mbs * ROWS_PER_ITEM, report_keys=REPORT_KEYS)
    out = {k: s / c for k, (s, c) in reduced.items() if c}
    return {"eval/pair_accuracy": out["pair_accuracy"], "eval/reward_margin": out["reward_margin"],
            "eval/loss": out["lm loss"], "eval/pairs": reduced["lm loss"][1]}


CURVES = ("pair_accuracy", "eval/pair_accuracy", "reward_margin")
