"""The ERNIE 4.5 router, declared into Megatron-Core's MoE layer through `MoESubmodules.router`.

Stock Megatron-Core ties its expert bias to sigmoid scoring; ERNIE scores with a softmax:

    scores   = softmax(x @ W_gate^T)                  (fp32)
    selected = topk(scores + e_score_correction_bias)  (the bias steers selection only)
    weights  = scores[selected] / max(sum(scores[selected]), moe_norm_min)

The bias is a buffer (never receives a gradient); `update_expert_bias` moves it by the
aux-loss-free balancing rule from the tokens each expert received. Optional losses: the
Mixtral/Switch load-balancing loss (megatron's implementation) and the router orthogonal loss.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    get_tokens_per_expert_and_token_count,
    get_updated_expert_bias,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter


def ernie_topk(scores: torch.Tensor, bias: torch.Tensor, k: int, norm_min: float, replay=None):
    """ERNIE selection and weighting on [tokens, E] fp32 scores -> (weights [T,k], index [T,k])."""

    def select(s, topk, num_groups=None, group_topk=None):
        return torch.topk(s, k=topk, dim=1)

    biased = scores + bias
    _, index = select(biased, k) if replay is None else replay.get_replay_topk(biased, k, None, None, select)
    weights = torch.gather(scores, dim=1, index=index)
    weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=norm_min)
    return weights, index


def router_orthogonal_loss(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean squared deviation of the normalised gate rows' Gram matrix from the identity:
    pushes experts' gate directions apart (ERNIE 4.5's router orthogonal loss)."""
    w = weight.float()
    w = w / torch.clamp(w.norm(dim=1, keepdim=True), min=eps)
    gram = w @ w.t()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).mean()


class ErnieRouter(TopKRouter):
    """TopKRouter with ERNIE's biased-selection / unbiased-weighting softmax routing."""

    def __init__(self, config, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        n = config.num_moe_experts
        self.norm_min = config.moe_norm_min
        self.orthogonal_loss_coeff = config.moe_orthogonal_loss_coeff
        self.bias_update_rate = config.moe_bias_update_rate
        self.register_buffer("e_score_correction_bias", torch.zeros(n, dtype=torch.float32))
        del self.local_tokens_per_expert  # TopKRouter set it to None (its bias path is sigmoid-only)
        self.register_buffer("local_tokens_per_expert", torch.zeros(n, dtype=torch.float32), persistent=False)
        # Routing decisions must not depend on the model's compute dtype (HF keeps these in fp32).
        self.weight.data = self.weight.data.float()

    def _apply(self, fn, recurse=True):
        """Keep gate weight and bias fp32 through model.bfloat16()/.half()."""
        bias = self.e_score_correction_bias.detach().clone()
        weight = self.weight.detach().clone()
        out = super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:  # e.g. model.bfloat16()
            self.e_score_correction_bias.data = bias.to(self.e_score_correction_bias.device)
            self.weight.data = weight.to(self.weight.device)
        return out

    def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask=False):
        """Megatron's Switch load-balancing loss, scaled so that its gradient is the same under
        every layout. Megatron 0.16 scales by the rank's *local* token count under
        calculate_per_token_loss, so with sequence parallelism each TP rank's partial loss gets
        1/TP of the weight it has in a single-process run; we scale by the tokens of the whole
        TP×CP group (the micro-batch), which makes TP+SP match TP=1 exactly."""
        coeff = self.get_aux_loss_coeff("aux_loss")
        if coeff == 0:
            return probs
        tokens_per_expert, _, total_tokens = get_tokens_per_expert_and_token_count(
            routing_map=routing_map, reduce_group=self.tp_cp_group, topk=self.topk,
            with_padding_mask=with_padding_mask,
        )
        aux_loss = switch_load_balancing_loss_func(
            probs=scores_for_aux_loss, tokens_per_expert=tokens_per_expert, total_num_tokens=total_tokens,
            topk=self.topk, num_experts=self.config.num_moe_experts, moe_aux_loss_coeff=coeff,
            fused=self.config.moe_router_fusion,
        )
        return self.attach_and_log_load_balancing_loss(
            probs, coeff, aux_loss, "load_balancing_loss", self.tp_cp_group, valid_token_count=total_tokens
        )

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)

        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, index = ernie_topk(
            scores, self.e_score_correction_bias, self.topk, self.norm_min, self.router_replay
        )
        probs = torch.zeros_like(scores).scatter(1, index, weights)
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, index, True)

        training = self.training and torch.is_grad_enabled()
        if training and self.is_aux_loss_enabled():
            probs = self._apply_aux_loss(probs, scores, routing_map, with_padding_mask=padding_mask is not None)
        if training and self.orthogonal_loss_coeff > 0:
            loss = router_orthogonal_loss(self.weight) * self.orthogonal_loss_coeff
            probs = self.attach_and_log_load_balancing_loss(
                probs, self.orthogonal_loss_coeff, loss, "router_orthogonal_loss", self.tp_cp_group
            )
        if training:  # expert loads: for aux-loss-free balancing and the load metrics
            with torch.no_grad():
                # megatron's padding_mask is True at padding positions
                counted = routing_map if padding_mask is None else routing_map & ~padding_mask[:, None]
                self.local_tokens_per_expert += counted.sum(dim=0)
        return probs, routing_map


def ernie_routers(model_chunks: Iterable[torch.nn.Module]) -> list[ErnieRouter]:
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, ErnieRouter)]


@torch.no_grad()
def update_expert_bias(model_chunks: Iterable[torch.nn.Module]) -> int:
    """Aux-loss-free balancing step, once per optimizer step (after the global batch):
    bias += rate * sign(mean_load - load), loads summed over TP×DP×CP. Returns routers updated."""
    everyone = ernie_routers(model_chunks)
    routers = [r for r in everyone if r.bias_update_rate > 0]
    if not routers:
        for router in everyone:
            router.local_tokens_per_expert.zero_()
        return 0
    counts = torch.stack([r.local_tokens_per_expert for r in routers])
    biases = torch.stack([r.e_score_correction_bias for r in routers])
    updated = get_updated_expert_bias(counts, biases, routers[0].bias_update_rate)
    for router, bias in zip(routers, updated):
        router.e_score_correction_bias.copy_(bias)
    for router in everyone:
        router.local_tokens_per_expert.zero_()
    return len(routers)


@torch.no_grad()
def expert_load_balance(model_chunks: Iterable[torch.nn.Module]) -> dict[int, float]:
    """Per MoE layer (global 0-based index): max expert load / mean expert load over this global
    batch (1.0 = perfectly balanced), summed over TP×DP×CP and gathered over pipeline stages.
    Call after the forward/backward passes and before `update_expert_bias` (which resets counts)."""
    from megatron.core import parallel_state as ps

    routers = ernie_routers(model_chunks)
    local: dict[int, float] = {}
    if routers:
        counts = torch.stack([r.local_tokens_per_expert for r in routers]).clone()
        torch.distributed.all_reduce(counts, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
        ratios = counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-9)
        local = {int(r.layer_number) - 1: float(x) for r, x in zip(routers, ratios)}
    if ps.get_pipeline_model_parallel_world_size() > 1:
        gathered = [None] * ps.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(gathered, local, group=ps.get_pipeline_model_parallel_group())
        local = {k: v for part in gathered for k, v in part.items()}
    return dict(sorted(local.items()))
