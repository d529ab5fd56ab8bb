"""ERNIE router pieces that the parity tests do not isolate."""
from __future__ import annotations

import torch

from megatron_ernie.models.ernie.model import build_model
from megatron_ernie.models.ernie.router import ErnieRouter, router_orthogonal_loss, update_expert_bias
from tests.helpers import TEST_MOE


def _routers(model):
    return [m for m in model.modules() if isinstance(m, ErnieRouter)]


def test_bias_update_lowers_overloaded_and_raises_idle_experts(world1):
    args = TEST_MOE.replace(moe_bias_update_rate=0.01)
    model = build_model(args).train()
    router = _routers(model)[0]
    x = torch.randn(32, 2, args.hidden_size)
    probs, routing_map = router(x)
    load = routing_map.sum(0).float()
    assert torch.equal(router.local_tokens_per_expert, load)
    assert update_expert_bias([model]) == len(_routers(model))
    expected = 0.01 * torch.sign(load.mean() - load)
    assert torch.allclose(router.e_score_correction_bias, expected)
    assert torch.count_nonzero(router.local_tokens_per_expert) == 0  # counters reset per step


def test_no_counting_in_eval_and_no_update_when_rate_is_zero(world1):
    model = build_model(TEST_MOE).eval()
    router = _routers(model)[0]
    router(torch.randn(8, 1, TEST_MOE.hidden_size))
    assert torch.count_nonzero(router.local_tokens_per_expert) == 0
    assert update_expert_bias([model]) == 0


def test_bias_and_gate_stay_fp32_in_a_bf16_model(world1):
    model = build_model(TEST_MOE)
    router = _routers(model)[0]
    router.e_score_correction_bias.fill_(1e-4 + 1.0)  # not representable in bf16
    model.bfloat16()
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.weight.dtype == torch.float32
    assert router.e_score_correction_bias[0].item() == torch.tensor(1.0001, dtype=torch.float32).item()
    assert model.decoder.layers[1].self_attention.linear_qkv.weight.dtype == torch.bfloat16


def test_orthogonal_loss_is_zero_only_for_orthogonal_gates():
    eye = torch.eye(4, 8)
    assert router_orthogonal_loss(eye * 3.0).item() == 0.0
    same = torch.ones(4, 8)
    assert router_orthogonal_loss(same).item() > 0.5
