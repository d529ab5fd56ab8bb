"""Forward-only passes on Megatron's schedules that return per-token outputs: the policy's (or the
frozen reference's) log-probabilities of given tokens, and a value model's per-token values.

Log-probs stay vocab-parallel: each TP rank holds its slice of the logits and Megatron's
`vocab_parallel_cross_entropy` reduces max / sum-exp / target logit over the TP group, so the full
[tokens, vocabulary] logits are never gathered. Under PP only the last stage gets the results.
Each micro-batch may carry `routed_experts` (rl/replay.py): the forward then reuses those routing
decisions.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_ernie.training.step import forward_only


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(label) per position from this TP rank's vocab-parallel logits [b, s, V/tp], fp32.
    Megatron's kernel works in place: fp32 `logits` hold the softmax afterwards (read anything
    else from them first)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return -vocab_parallel_cross_entropy(logits, labels)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, group=None) -> torch.Tensor:
    """Entropy per position of softmax over the whole vocabulary, from this TP rank's slice of
    the logits [b, s, V/tp] (fp32, no gradient: a metric). `group` (TP) is reduced over: a max,
    then Σ e^(l-m) and Σ e^(l-m)·(l-m) together, without gathering the logits."""
    logits = logits.float()
    reduce = group is not None and torch.distributed.get_world_size(group) > 1
    m = logits.max(dim=-1, keepdim=True).values
    if reduce:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = logits - m
    e = shifted.exp()
    sums = torch.stack([e.sum(dim=-1), (e * shifted).sum(dim=-1)])
    if reduce:
        torch.distributed.all_reduce(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]


def _model_inputs(batch: dict):
    return batch["tokens"], batch["position_ids"], batch.get("attention_mask")


def _replaying(model, batch: dict):
    from megatron_ernie.rl.replay import replay_routing

    return replay_routing(model, batch.get("routed_experts"))


def logprob_forward_step(data_iterator, model, temperature: float = 1.0):
    """A forward step whose collected output is [b, s] log-probs of `labels` (no loss)."""
    batch = next(data_iterator)
    with _replaying(model, batch):
        logits = model(*_model_inputs(batch))  # no labels: this rank's vocab slice of the logits

    def collect(output, non_loss_data=True):
        return token_logprobs(output, batch["labels"], temperature).detach()

    return logits, collect


def value_forward_step(data_iterator, model):
    """A scalar-head forward step whose collected output is [b, s] values."""
    batch = next(data_iterator)
    with _replaying(model, batch):
        values = model(*_model_inputs(batch))

    def collect(output, non_loss_data=True):
        return output[..., 0].float().detach()

    return values, collect


def per_token(model_chunks: list, microbatches: list[dict], *, what: str, seq_length: int,
              temperature: float = 1.0) -> list[torch.Tensor]:
    """[b, s] log-probs (`what="logprobs"`) or values (`what="values"`) per micro-batch, on the
    last pipeline stage (an empty list elsewhere)."""
    if what == "logprobs":
        step = partial(logprob_forward_step, temperature=temperature)
    elif what == "values":
        step = value_forward_step
    else:
        raise ValueError(f"what={what!r}: expected 'logprobs' or 'values'")
    rows = microbatches[0]["tokens"].shape[0] if microbatches else 1
    return forward_only(model_chunks, microbatches, forward_step=step, seq_length=seq_length,
                        micro_batch_size=rows, collect_data=True)
