"""The trainer's log-probs of rollout experiences (a forward-only pass on Megatron's schedules),
with or without replaying the rollout's routing, and the train/rollout mismatch of that pass
(rl/mismatch.py) — what every RL algorithm's `prepare` starts with.

Without replay, the pass records each router's own selection and compares it with the rollout's:
the share of tokens whose experts differ in ≥ 1 MoE layer. Each pipeline stage sees its own
layers and, under sequence parallelism, each TP rank its slice of the tokens, so the per-token
"differs" flags are combined over the model-parallel group before counting.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_ernie.rl.mismatch import add_sums, mismatch_sums, reduce_mismatch
from megatron_ernie.rl.rollout import Experience, collate


def _differs(recorded: dict[int, torch.Tensor], routed: torch.Tensor, model, b: int, s: int) -> torch.Tensor:
    """[b, s] bool for this rank's routers: recorded selection != the rollout's (as sets)."""
    from megatron.core import parallel_state as ps

    from megatron_ernie.rl.mismatch import expert_sets_differ
    from megatron_ernie.rl.replay import moe_layer_ordinals

    ordinals = moe_layer_ordinals(model)
    out = torch.zeros(b, s, dtype=torch.bool)
    for layer, rows in recorded.items():
        k = rows.shape[-1]
        local_s = rows.shape[0] // b
        start = ps.get_tensor_model_parallel_rank() * local_s if local_s != s else 0
        mine = rows.view(local_s, b, k).transpose(0, 1).cpu()  # [b, local_s, k]
        want = routed[:, start:start + local_s, ordinals[layer]]
        out[:, start:start + local_s] |= expert_sets_differ(mine[:, :, None], want[:, :, None])
    return out


def _forward_step(data_iterator, model, *, temperature: float, replay: bool, flags: list):
    from megatron_ernie.rl.replay import record_routing, replay_routing
    from megatron_ernie.training.forward import token_logprobs

    batch = next(data_iterator)
    routed = batch.get("routed_experts")
    inputs = (batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    if replay or routed is None:
        with replay_routing(model, routed if replay else None):
            logits = model(*inputs)
    else:
        recorded: dict = {}
        with record_routing(model, recorded):
            logits = model(*inputs)
        flags.append(_differs(recorded, routed, model, *batch["tokens"].shape))

    def collect(output, non_loss_data=True):
        return token_logprobs(output, batch["labels"], temperature).detach()

    return logits, collect


def recompute(run, experiences: list[Experience], *, role: str = "policy", micro_batch_size: int = 1,
              replay: bool = True, temperature: float = 1.0):
    """Collective. Returns (per-experience [len(response)] trainer log-probs on the last pipeline
    stage — None elsewhere —, the mismatch metrics, identical on every rank)."""
    from megatron.core import parallel_state as ps

    from megatron_ernie.training.step import forward_only

    seq = run.cfg.data.seq_length
    chunks = [experiences[k:k + micro_batch_size] for k in range(0, len(experiences), micro_batch_size)]
    micro = [collate(c, seq) for c in chunks]
    flags: list[torch.Tensor] = []
    step = partial(_forward_step, temperature=temperature, replay=replay, flags=flags)
    out = forward_only(run.models[role].chunks, micro, forward_step=step, seq_length=seq,
                       micro_batch_size=micro_batch_size, collect_data=True)
    counting = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    sums = torch.zeros(6, dtype=torch.float64)
    per_exp = None
    if out:
        per_exp = []
        for mb, lp in zip(micro, out):
            if counting:
                sums = add_sums(sums, mismatch_sums(lp, mb["rollout_logprobs"], mb["loss_mask"]))
            per_exp += [row[m.bool()] for row, m in zip(lp, mb["loss_mask"])]
    if flags:
        differ = torch.stack(flags).to(torch.int32)
        if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(differ, op=torch.distributed.ReduceOp.MAX, group=ps.get_model_parallel_group())
        if counting:
            masks = torch.stack([mb["loss_mask"] for mb in micro]).bool()
            sums[4] += differ.bool()[masks].sum()
            sums[5] += masks.sum()
    return per_exp, reduce_mismatch(sums)
