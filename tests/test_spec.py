"""One spec builder, one switch: local spec on CPU, TE spec on GPU, ERNIE pieces declared into both."""
from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer

import megatron_ernie.models.ernie.spec as spec
from megatron_ernie.models.ernie.model import build_model
from megatron_ernie.models.ernie.router import ErnieRouter
from megatron_ernie.models.sdpa_attention import SDPAttention
from tests.helpers import TEST_MOE


def test_cpu_builds_the_local_spec_with_ernie_pieces(world1):
    assert spec.te_available() is False
    model = build_model(TEST_MOE.replace(moe_layer_interval=2))
    layers = model.decoder.layers
    assert [type(layer.mlp) for layer in layers] == [MLP, MoELayer, MLP, MoELayer]
    for layer in layers:
        assert isinstance(layer.input_layernorm, spec.ErnieRMSNorm)
        assert isinstance(layer.pre_mlp_layernorm, spec.ErnieRMSNorm)
        assert isinstance(layer.self_attention.core_attention, SDPAttention)
    assert isinstance(layers[1].mlp.router, ErnieRouter)
    assert layers[1].mlp.shared_experts.linear_fc1.weight.shape == (2 * TEST_MOE.moe_intermediate_size, TEST_MOE.hidden_size)
    assert isinstance(model.decoder.final_layernorm, spec.ErnieRMSNorm)


def test_te_switch_keeps_te_norms_and_attention_but_declares_the_router(monkeypatch):
    calls = []

    def fake_te_spec(num_experts=None, moe_grouped_gemm=False, **_):
        calls.append((num_experts, moe_grouped_gemm))
        return get_gpt_layer_local_spec(num_experts=num_experts, normalization="RMSNorm")

    monkeypatch.setattr(spec, "get_gpt_layer_with_transformer_engine_spec", fake_te_spec)
    specs = spec.ernie_layer_specs(TEST_MOE, use_te=True)
    assert calls == [(None, False), (1, True)]  # grouped GEMM experts on TE
    dense, moe = specs[0].submodules, specs[1].submodules
    assert dense.input_layernorm is not spec.ErnieRMSNorm  # TE's own (fp32) norms stay
    assert dense.self_attention.submodules.core_attention is not SDPAttention
    assert moe.mlp.submodules.router is ErnieRouter
