"""Offline UPO (`recipe=upo_offline`): ERNIE 4.5's DPO-style loss on fixed preference pairs.

Roles: `policy` (trained) and a frozen `reference`, both from `model.init_from`. The source is a
pair JSONL (`data.path`: `prompt` or `messages`, `chosen`, `rejected`; what
`tools/build_pairs.py` writes). Per step:
1. `prepare`: the step's pairs as micro-batches (rows 2k chosen, 2k+1 rejected) and the
   reference's log-probs of their response tokens (a forward-only pass).
2. One policy update: the sequence log-probs of each row against the reference's, in
   `rl_losses.dpo_loss` (sigmoid with β, IPO, label smoothing: `rl.ppo.upo_*`, the same knobs as
   online UPO), the mean over the step's pairs.
"""
from __future__ import annotations

from functools import partial

from megatron_ernie.algorithms import policy_step, sft
from megatron_ernie.training.algorithm import MAIN, Algorithm, Role, Update
from megatron_ernie.training.step import LOSS_KEY

REFERENCE = "reference"
REPORTS = (LOSS_KEY, "upo_loss", "upo_pair_accuracy", "upo_reward_margin", "upo_chosen_reward", "upo_rejected_reward")


class UPOOffline(Algorithm):
    name = "upo_offline"
    roles = (Role(MAIN), Role(REFERENCE, trainable=False))
    rows_per_item = 2
    curves = ("upo_pair_accuracy", "upo_reward_margin", "upo_chosen_reward", "upo_rejected_reward")

    def build_tokenizer(self, cfg):
        from dataclasses import replace

        # standalone: the mean DPO loss over the step's pairs (coefficient 1)
        self.upo = replace(cfg.rl.ppo, upo_coef=1.0)
        return sft.build_tokenizer(cfg)

    def build_dataset(self, cfg, tokenizer):
        return pair_dataset(cfg.data.path, cfg, tokenizer)

    def prepare(self, batch, run):
        return pair_microbatches(batch, run, REFERENCE, pairs=run.cfg.train.micro_batch_size, scale=1.0,
                                 count_pairs=True)

    def updates(self, batch, run):
        c = run.cfg
        return [Update(MAIN, batch, c.train.micro_batch_size * 2, c.data.seq_length)]

    def forward_step(self, role):
        return partial(policy_step.forward_step, policy=None, upo=self.upo)

    def report_keys(self, role):
        return REPORTS


def pair_dataset(spec: str | None, cfg, tokenizer):
    from megatron_ernie.data.preference import PolicyPairDataset
    from megatron_ernie.errors import ConfigError

    if not spec:
        raise ConfigError("offline UPO needs pairs: data.path (recipe=upo_offline) or rl.ppo.offline_pairs (PPO) "
                          "— a pair JSONL, e.g. from tools/build_pairs.py")
    return PolicyPairDataset([p.strip() for p in spec.split(",")], tokenizer, cfg.data.seq_length,
                             overlong=cfg.data.overlong.value, empty_think=cfg.data.empty_think_for_non_thinking)


def pair_microbatches(items: list[dict], run, reference: str, *, pairs: int, scale: float,
                      count_pairs: bool) -> list[dict]:
    """Micro-batches of `pairs` pairs (2·pairs rows) with the reference's log-probs."""
    import torch

    from megatron_ernie.data.preference import stack_rows
    from megatron_ernie.training.forward import per_token

    micro = [stack_rows(items[k:k + pairs]) for k in range(0, len(items), pairs)]
    ref = per_token(run.models[reference].chunks, micro, what="logprobs", seq_length=run.cfg.data.seq_length)
    for i, m in enumerate(micro):
        # off the last pipeline stage there is no loss: zeros keep the micro-batch's keys alike
        m["ref_logprobs"] = ref[i] if ref else torch.zeros_like(m["loss_mask"])
        m["upo_scale"] = torch.tensor(scale, dtype=torch.float64)
        m["pair_rows"] = torch.tensor(count_pairs)
    return micro
