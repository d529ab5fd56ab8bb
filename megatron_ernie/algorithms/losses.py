"""Losses: small pure functions over tensors in Megatron's per-token loss contract
(`calculate_per_token_loss=True`): each returns (loss sum, count the schedule divides by,
{name: tensor([sum, count])} to report)."""
from __future__ import annotations

import torch

from megatron_ernie.training.step import LOSS_KEY


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token NLL summed over the mask (SFT: assistant tokens only)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {LOSS_KEY: report}


def bradley_terry_loss(values: torch.Tensor):
    """Pairs in consecutive rows (2k chosen, 2k+1 rejected) of per-sequence values [2n]:
    −log σ(r_chosen − r_rejected) summed over pairs; reports pairwise accuracy and mean margin."""
    margin = values[0::2] - values[1::2]
    loss_sum = -torch.nn.functional.logsigmoid(margin).sum()
    n = torch.tensor(margin.numel(), dtype=torch.int)
    count = float(margin.numel())
    reports = {
        LOSS_KEY: torch.stack([loss_sum.detach(), torch.tensor(count)]),
        "pair_accuracy": torch.stack([(margin > 0).sum().float(), torch.tensor(count)]),
        "reward_margin": torch.stack([margin.detach().sum(), torch.tensor(count)]),
    }
    return loss_sum, n, reports
