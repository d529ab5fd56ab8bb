"""Core attention for the local (non-TE) spec on torch's scaled_dot_product_attention.

Megatron's local DotProductAttention materialises [b·heads, s, s] scores through baddbmm, an
explicit mask and a separate softmax; on CPU that is ~2× slower than torch's fused SDPA kernel.
This module has DotProductAttention's constructor and forward signature, so it is declared into
the spec (`SelfAttentionSubmodules.core_attention`) instead of forking the attention layer.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_ernie.errors import LayoutError


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise LayoutError(f"cp={config.context_parallel_size}: the local spec's SDPAttention does not implement "
                              "context parallelism; use the TE spec")
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.current_max_attn_logits = None  # interface parity with DotProductAttention

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np·hn].
        `attention_mask` follows Megatron: bool, True = masked out, broadcastable to [b, 1, sq, sk]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences / attention bias need the TE spec")
        sq, b, heads, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        mask = None if attention_mask is None else ~attention_mask
        if causal and q.shape[2] != k.shape[2]:  # decoding: queries are the last sq positions
            sk = k.shape[2]
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
            causal = False
        dropout = self.dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != heads,
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)
