"""Layer specs: ERNIE 4.5 declared on Megatron-Core's own layers.

One builder, one switch: the Transformer Engine spec when TE is importable on a GPU, the local
spec otherwise. ERNIE-specific pieces are declared into the stock specs, not forked:
the router (`MoESubmodules.router`) and, on the local spec, an fp32 RMSNorm identical to the
reference's (TE's RMSNorm already normalises in fp32), torch-SDPA core attention, and routed
experts that weight their outputs in the reference's order (bf16 bit parity).
"""
from __future__ import annotations

import copy
import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_ernie.models.ernie.experts import ErnieSequentialMLP
from megatron_ernie.models.ernie.router import ErnieRouter
from megatron_ernie.models.sdpa_attention import SDPAttention


class ErnieRMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as the reference does)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each TP rank sees a slice of tokens: grads need a TP sum.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


@functools.lru_cache(maxsize=1)
def te_available() -> bool:
    """TE spec only where TE imports and a GPU exists."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def _ernie_layer_spec(moe: bool, use_te: bool) -> ModuleSpec:
    num_experts = 1 if moe else None  # only its presence matters to the spec builders
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=moe)
    else:
        spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization="RMSNorm")
    spec = copy.deepcopy(spec)
    sub = spec.submodules
    if not use_te:
        sub.input_layernorm = ErnieRMSNorm
        sub.pre_mlp_layernorm = ErnieRMSNorm
        sub.self_attention.submodules.core_attention = SDPAttention
        if moe:
            sub.mlp.submodules.experts.module = ErnieSequentialMLP
            # Checkpoint keys as under TE, where a MoE layer's pre-MLP norm is its own module
            # (the stock local spec files it under the dense layer's fused-norm name).
            sub.sharded_state_dict_keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if moe:
        sub.mlp.submodules.router = ErnieRouter
    return spec


def ernie_layer_specs(args, use_te: bool) -> list[ModuleSpec]:
    """One spec per global layer: dense or MoE by ERNIE's layer rule."""
    dense, moe = _ernie_layer_spec(False, use_te), _ernie_layer_spec(True, use_te)
    return [moe if args.is_moe_layer(i) else dense for i in range(args.num_layers)]


def ernie_block_spec(args, config, use_te: bool, vp_stage=None, pp_rank=None) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage."""
    specs = ernie_layer_specs(args, use_te)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = ErnieRMSNorm
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + count], layer_norm=final_norm)
