"""Our SDPA core attention against Megatron's DotProductAttention (the reference it replaces)."""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_ernie.models.ernie.model import transformer_config
from megatron_ernie.models.sdpa_attention import SDPAttention
from tests.helpers import TEST_MOE


def _pair(mask_type):
    cfg = transformer_config(TEST_MOE)
    kw = dict(config=cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    return SDPAttention(**kw), DotProductAttention(**kw)


def _qkv(sq, sk, b=2, heads=4, groups=2, hn=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(sq, b, heads, hn, generator=g), torch.randn(sk, b, groups, hn, generator=g),
            torch.randn(sk, b, groups, hn, generator=g))


def test_causal_gqa_matches_megatron(world1):
    ours, ref = _pair(AttnMaskType.causal)
    q, k, v = _qkv(24, 24)
    assert (ours(q, k, v, None) - ref(q, k, v, None)).abs().max().item() <= 1e-6


def test_explicit_padding_mask_matches_megatron(world1):
    ours, ref = _pair(AttnMaskType.padding)
    q, k, v = _qkv(12, 12)
    mask = torch.ones(12, 12, dtype=torch.bool).triu(1)[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :3] = True  # second sample: first 3 keys are padding
    mask[1, :, :3, 0] = False  # keep at least one visible key per query
    a, b = ours(q, k, v, mask), ref(q, k, v, mask)
    assert (a - b).abs().max().item() <= 1e-6


def test_decoding_queries_see_the_whole_prefix(world1):
    ours, _ = _pair(AttnMaskType.causal)
    q, k, v = _qkv(1, 9)
    full_q, _, _ = _qkv(9, 9)
    full_q[-1] = q[0]
    last = ours(full_q, k, v, None)[-1]
    assert torch.allclose(ours(q, k, v, None)[0], last, atol=1e-6)


def test_unsupported_inputs_are_refused(world1):
    ours, _ = _pair(AttnMaskType.causal)
    q, k, v = _qkv(4, 4)
    with pytest.raises(NotImplementedError, match="attention bias"):
        ours(q, k, v, None, attention_bias=torch.zeros(1))
