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

from megatron_ernie.algorithms import losses, sft
from megatron_ernie.models.ernie.hf_adapter import REWARD_HEAD
from megatron_ernie.training.algorithm import MAIN, Algorithm, Role

REPORT_KEYS = (losses.LOSS_KEY, "pair_accuracy", "reward_margin")


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


def pair_loss(end_index: torch.Tensor, output: torch.Tensor):
    """The Bradley-Terry loss of a micro-batch's pairs, from the head's outputs."""
    return losses.bradley_terry_loss(sequence_values(output, end_index))


def forward_step(data_iterator, model, loss_func=pair_loss):
    """`loss_func(end_index, output)`: the BT loss in training; scoring passes one returning the values."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)  # causal; no labels: the values
    return output, partial(loss_func, batch["end_index"])


class RewardModel(Algorithm):
    name = "reward_model"
    # the head starts fresh on a language model's weights
    roles = (Role(MAIN, head="scalar", keep_init=(REWARD_HEAD,)),)
    rows_per_item = 2  # a dataset item is a pair: two sequences
    curves = ("pair_accuracy", "eval/pair_accuracy", "reward_margin")

    def __init__(self):
        self._eval_set = None  # rendered once per run, not at every evaluation

    def build_tokenizer(self, cfg):
        return sft.build_tokenizer(cfg)  # the same rule: data.tokenizer, else init_from's, else the demo one

    def build_dataset(self, cfg, tokenizer):
        return build_dataset(cfg, tokenizer)

    def microbatch(self, items):
        return microbatch(items)

    def forward_step(self, role):
        return forward_step

    def report_keys(self, role):
        return REPORT_KEYS

    def evaluate(self, run) -> dict[str, float]:
        """Pairwise accuracy, margin and loss on the held-out pairs (split over DP ranks)."""
        from megatron_ernie.errors import DataError
        from megatron_ernie.training.step import forward_only

        cfg = run.cfg
        if self._eval_set is None:
            self._eval_set = build_dataset(cfg, run.tokenizer, split="eval")
        data = self._eval_set
        mbs = cfg.train.micro_batch_size
        usable = len(data) - len(data) % (run.dp_size * mbs)  # every rank runs the same number of microbatches
        if usable == 0:
            raise DataError(f"data.eval_path: {len(data)} pairs, fewer than DP × micro_batch_size = "
                            f"{run.dp_size * mbs}")
        mine = list(range(run.dp_rank, usable, run.dp_size))
        micro = [microbatch([data[i] for i in mine[k:k + mbs]]) for k in range(0, len(mine), mbs)]
        reduced = forward_only(run.models[MAIN].chunks, micro, forward_step=forward_step,
                               seq_length=cfg.data.seq_length, micro_batch_size=mbs * self.rows_per_item,
                               report_keys=REPORT_KEYS)
        out = {k: s / c for k, (s, c) in reduced.items() if c}
        return {"eval/pair_accuracy": out["pair_accuracy"], "eval/reward_margin": out["reward_margin"],
                "eval/loss": out[losses.LOSS_KEY], "eval/pairs": reduced[losses.LOSS_KEY][1]}
