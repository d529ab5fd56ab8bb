"""MoE router replay: the experts a rollout selected for each token, reused in the trainer's
forward passes, through Megatron-Core's `RouterReplay` (every ERNIE router holds one; the ERNIE
router passes its top-k through it).

Routing decisions travel with the batch as `routed_experts`: an int tensor [b, s, moe_layers, k]
in model layer order (the engines' per-sequence records, padded like the tokens). A forward pass
inside `replay_routing(model, routed)` makes each of this model's routers select exactly those
experts (the weights are still the router's own scores at those experts, so gradients flow as
usual). Per-instance control, not Megatron's process-global statics: a run holds several models
(policy, reference, the in-process engine's), and only the one being run may replay.

Token order: a router sees [s, b] flattened s-major; under sequence parallelism each TP rank sees
its contiguous slice of s. Padding positions get experts 0..k-1 (causal attention and dropless
routing keep them from influencing real tokens; their loss is masked).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_ernie.errors import ConfigError


def _routers(model) -> list:
    from megatron_ernie.models.ernie.router import ernie_routers

    return ernie_routers([model])


def moe_layer_ordinals(model) -> dict[int, int]:
    """Global layer index -> ordinal among the model's MoE layers (the column of `routed_experts`)."""
    from megatron_ernie.models.ernie.hf_adapter import unwrap_model

    args = unwrap_model(model).ernie_args
    moe = [i for i in range(args.num_layers) if args.is_moe_layer(i)]
    return {layer: j for j, layer in enumerate(moe)}


def _router_layer(router) -> int:
    return int(router.layer_number) - 1  # Megatron numbers layers from 1, globally


def _local_rows(per_layer: torch.Tensor, config) -> torch.Tensor:
    """[b, s, k] -> this rank's router input rows [s_local * b, k] (s-major, SP slice)."""
    from megatron.core import parallel_state as ps

    rows = per_layer.transpose(0, 1)  # [s, b, k]
    if config.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        chunk = rows.shape[0] // tp
        rows = rows[rank * chunk:(rank + 1) * chunk]
    return rows.reshape(-1, rows.shape[-1]).long()


@contextmanager
def replay_routing(model, routed: torch.Tensor | None):
    """Within the block, `model`'s routers select `routed` [b, s, moe_layers, k]; None: no-op."""
    if routed is None:
        yield
        return
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    routers = _routers(model)
    if not routers:
        yield
        return
    if any(r.router_replay is None for r in routers):
        raise ConfigError("this model was built without routing replay (moe_enable_routing_replay)")
    ordinals = moe_layer_ordinals(model)
    if routed.dim() != 4 or routed.shape[2] != len(ordinals) or routed.shape[3] != routers[0].topk:
        raise ConfigError(f"routed_experts has shape {tuple(routed.shape)}; expected [b, s, {len(ordinals)}, "
                          f"{routers[0].topk}] (batch, tokens, MoE layers, top-k)")
    try:
        for router in routers:
            replay = router.router_replay
            replay.clear_indices()
            replay.set_target_indices(_local_rows(routed[:, :, ordinals[_router_layer(router)]], router.config))
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        yield
    finally:
        for router in routers:
            router.router_replay.clear_router_replay_action()
            router.router_replay.clear_indices()


@contextmanager
def record_routing(model, out: dict):
    """Within the block, record each router's selection; on exit `out[global layer] = [rows, k]`
    (this rank's router input rows, s-major)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    routers = _routers(model)
    if any(r.router_replay is None for r in routers):
        raise ConfigError("this model was built without routing replay (moe_enable_routing_replay)")
    try:
        for router in routers:
            router.router_replay.clear_indices()
            router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
        yield out
        for router in routers:
            out[_router_layer(router)] = router.router_replay.get_recorded_indices()
    finally:
        for router in routers:
            router.router_replay.clear_router_replay_action()
            router.router_replay.clear_indices()


def pad_routed(records: list[torch.Tensor | None], seq_length: int, top_k: int, moe_layers: int) -> torch.Tensor:
    """Per-sequence records [n_i, L, k] -> [b, seq_length, L, k], padding with experts 0..k-1."""
    out = torch.arange(top_k).expand(len(records), seq_length, moe_layers, top_k).clone()
    for i, r in enumerate(records):
        if r is not None:
            n = min(r.shape[0], seq_length)
            out[i, :n] = r[:n]
    return out
