"""Routed experts for the local spec, in the reference's order of operations.

Megatron's SequentialMLP scales each token's *intermediate* activation by its routing weight
(before fc2, in fp32). The reference scales the expert *output* (after down_proj) by the weight
cast to the activation dtype, then sums experts in expert order. In fp32 both agree to rounding;
in bf16 only the reference's order gives bit-identical results, so that is what we run.
On GPU the TE spec's grouped-GEMM experts are used instead (speed over bit parity).

Without autograd (rollout engines, forward-only log-probs) the experts run as two grouped
matmuls (`torch._grouped_mm`, whose CPU path is a per-group `matmul(x, W.t())`: the same calls
Megatron's local linears issue, checked bit for bit in tests/test_experts.py) on the experts'
weights viewed as one [E, out, in] tensor, with the GLU and the routing weights applied once to
all tokens. A decode step feeds a few tokens per expert, and Megatron's ~20 module/autograd-
function layers per expert were most of its time. The view needs the local experts' weights
laid out back to back in one storage: `pack_experts(model)` does that — the rollout engine calls
it on its own model (and again after re-allocating weights on wake). Trainers do not: their
weights live in Megatron's DDP buffers, and views sharing one storage would trip writers that
refuse shared memory (safetensors). Without the layout the experts run one by one as Megatron's
MLPs, with the same numbers.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP


class ErnieSequentialMLP(SequentialMLP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._applies: bool | None = None
        self._stacked = None  # (weight addresses, whether they are back to back)
        self._weights: list[torch.nn.Parameter] | None = None

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor):
        if self.config.fp8 or self.config.fp4 or self.config.moe_apply_probs_on_input:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        stacked = None if torch.is_grad_enabled() else self.stacked_weights()
        if stacked is not None:
            return self._grouped(permuted_local_hidden_states, tokens_per_expert, permuted_probs, *stacked), None
        counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
        outputs = []
        for expert, tokens, probs in zip(
            self.local_experts,
            torch.split(permuted_local_hidden_states, counts),
            torch.split(permuted_probs, counts),
        ):
            out, _ = expert(tokens)
            outputs.append(out * probs.to(out.dtype).unsqueeze(-1))
        return torch.cat(outputs, dim=0), None

    def _grouped(self, x, tokens_per_expert, probs, w1, w2):
        counts = torch.as_tensor(tokens_per_expert, device=x.device)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        h = torch._grouped_mm(x, w1.transpose(1, 2), offs=offsets)
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)  # as MLP.forward's glu
        h = self.config.activation_func(x_glu) * (x_linear + self.config.glu_linear_offset)
        out = torch._grouped_mm(h, w2.transpose(1, 2), offs=offsets)
        return out * probs.to(out.dtype).unsqueeze(-1)

    # --- the stacked view -------------------------------------------------------------------
    def _linears(self):
        return [e.linear_fc1 for e in self.local_experts], [e.linear_fc2 for e in self.local_experts]

    def pack(self) -> None:
        """Lay fc1 and fc2 weights of the local experts out back to back (values kept), so that
        `stacked_weights` can view them as one tensor each."""
        if not self._grouped_applies():
            return
        for layers in self._linears():
            stacked = torch.stack([l.weight.detach() for l in layers])
            for e, layer in enumerate(layers):
                layer.weight.data = stacked[e]

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(fc1 [E, 2F, H], fc2 [E, H, F]) as views of the experts' own weights, or None when
        they are not back to back in one storage or the grouped path would compute otherwise.
        The layout check is cached per weight address (a forward asks once per MoE layer)."""
        if not self._grouped_applies():
            return None
        if self._weights is None:  # the Parameter objects (their storage may be re-pointed)
            self._weights = [l.weight for layers in self._linears() for l in layers]
        weights = self._weights
        key = tuple(w.data_ptr() for w in weights)
        if self._stacked is None or self._stacked[0] != key:  # only addresses: no storage is held
            n = len(self.local_experts)
            self._stacked = (key, _back_to_back(weights[:n]) and _back_to_back(weights[n:]))
        if not self._stacked[1]:
            return None
        n = len(self.local_experts)
        return _stacked_view(weights[0], n), _stacked_view(weights[n], n)

    def _grouped_applies(self) -> bool:
        """Whether MLP.forward would run exactly matmul → GLU → matmul per expert (local linears
        without bias or communication, no fused or TE activation, no clamp). Fixed by the
        module's structure: decided once."""
        if self._applies is None:
            self._applies = self._decide_grouped()
        return self._applies

    def _decide_grouped(self) -> bool:
        c = self.config
        if c.use_te_activation_func or c.bias_activation_fusion or not c.gated_linear_unit:
            return False
        if c.activation_func_clamp_value is not None or not len(self.local_experts):
            return False
        return all(_is_plain_linear(l) for layers in self._linears() for l in layers)


def pack_experts(model: torch.nn.Module) -> int:
    """`pack()` every ErnieSequentialMLP in `model`; returns how many were packed."""
    packed = 0
    for module in model.modules():
        if isinstance(module, ErnieSequentialMLP) and module._grouped_applies():
            module.pack()
            packed += 1
    return packed


def _back_to_back(weights: list[torch.Tensor]) -> bool:
    """Whether equally shaped contiguous tensors lie back to back, in order, in one storage."""
    first = weights[0]
    step = first.numel() * first.element_size()
    storage = first.untyped_storage().data_ptr()
    return all(w.data_ptr() == first.data_ptr() + e * step and w.shape == first.shape and w.is_contiguous()
               and w.untyped_storage().data_ptr() == storage for e, w in enumerate(weights))


def _stacked_view(first: torch.Tensor, n: int) -> torch.Tensor:
    return first.detach().as_strided((n, *first.shape), (first.numel(), first.shape[1], 1))


def _is_plain_linear(layer) -> bool:
    """Megatron's local Column/RowParallelLinear of an expert without bias: its forward is one
    `matmul(x, W.t())` (under expert TP/EP the dispatcher communicates, not the linear; with
    one expert-TP rank its copy/reduce regions are identities)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return (type(layer) in (ColumnParallelLinear, RowParallelLinear) and layer.bias is None and layer.is_expert
            and not getattr(layer, "gather_output", False) and layer.weight.dim() == 2
            and (layer.explicit_expert_comm or layer.tp_group.size() == 1))
