"""Routed experts for the local spec, in the reference's order of operations.

Megatron's SequentialMLP scales each token's *intermediate* activation by its routing weight
(before fc2, in fp32). The reference scales the expert *output* (after down_proj) by the weight
cast to the activation dtype, then sums experts in expert order. In fp32 both agree to rounding;
in bf16 only the reference's order gives bit-identical results, so that is what we run.
On GPU the TE spec's grouped-GEMM experts are used instead (speed over bit parity).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP


class ErnieSequentialMLP(SequentialMLP):
    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor):
        if self.config.fp8 or self.config.fp4 or self.config.moe_apply_probs_on_input:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
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
