"""The routed experts' grouped path (models/ernie/experts.py): without autograd, packed experts
run as two grouped matmuls and give bit for bit what Megatron's per-expert MLPs give; anything
that breaks the packed layout falls back to the per-expert path, with the same numbers."""
from __future__ import annotations

import pytest
import torch

from megatron_ernie.models.ernie.experts import ErnieSequentialMLP, pack_experts
from megatron_ernie.models.ernie.model import build_model, transformer_config
from megatron_ernie.runtime import ParallelLayout
from tests.helpers import TEST_MOE

COUNTS = [3, 0, 5, 1, 7, 0, 2, 6]  # uneven, with experts that get no token


def _experts(dtype=torch.float32):
    config = transformer_config(TEST_MOE, ParallelLayout(), dtype=dtype, use_te=False)
    model = build_model(TEST_MOE, config=config, use_te=False).eval()
    return model, [m for m in model.modules() if isinstance(m, ErnieSequentialMLP)]


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(COUNTS), TEST_MOE.hidden_size, generator=g).to(dtype)
    probs = torch.rand(sum(COUNTS), generator=g)
    return x, torch.tensor(COUNTS), probs


def _module_path(experts, x, counts, probs):
    with torch.enable_grad():  # autograd on: Megatron's MLPs, one expert at a time
        return experts(x, counts, probs)[0].detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_grouped_path_is_bit_identical_to_the_per_expert_mlps(world1, dtype):
    model, layers = _experts(dtype)
    assert len(TEST_MOE.moe_layer_pattern()) and len(layers) == sum(TEST_MOE.moe_layer_pattern())
    assert all(m.stacked_weights() is None for m in layers)  # not packed: built as separate tensors
    assert pack_experts(model) == len(layers)
    for i, experts in enumerate(layers):
        x, counts, probs = _inputs(dtype, seed=i)
        expected = _module_path(experts, x, counts, probs)
        w1, w2 = experts.stacked_weights()
        assert w1.shape == (len(COUNTS), *experts.local_experts[0].linear_fc1.weight.shape)
        assert torch.equal(w2[3], experts.local_experts[3].linear_fc2.weight)
        with torch.no_grad():
            got = experts(x, counts, probs)[0]
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_pack_keeps_values_and_a_repointed_weight_falls_back(world1):
    model, layers = _experts()
    experts = layers[0]
    before = [e.linear_fc1.weight.detach().clone() for e in experts.local_experts]
    pack_experts(model)
    assert all(torch.equal(b, e.linear_fc1.weight) for b, e in zip(before, experts.local_experts))
    x, counts, probs = _inputs(torch.float32)
    expected = _module_path(experts, x, counts, probs)
    weight = experts.local_experts[2].linear_fc2.weight
    weight.data = weight.data.clone()  # what a DDP buffer or a re-allocation does
    assert experts.stacked_weights() is None
    with torch.no_grad():
        assert torch.equal(experts(x, counts, probs)[0], expected)
    weight.data.add_(1.0)  # and the per-expert path reads the new weight
    with torch.no_grad():
        assert not torch.equal(experts(x, counts, probs)[0], expected)


def test_the_grouped_path_reads_updated_weights(world1):
    model, layers = _experts()
    pack_experts(model)
    experts = layers[0]
    x, counts, probs = _inputs(torch.float32)
    with torch.no_grad():
        first = experts(x, counts, probs)[0]
        experts.local_experts[0].linear_fc1.weight.mul_(2.0)  # an in-place load (copy_) into one expert
        second = experts(x, counts, probs)[0]
    assert experts.stacked_weights() is not None
    rows = COUNTS[0]
    assert not torch.equal(first[:rows], second[:rows]) and torch.equal(first[rows:], second[rows:])
    assert torch.equal(second, _module_path(experts, x, counts, probs))
