"""Output heads other than the language-model head.

A reward model is the ERNIE decoder with a scalar head: one value per position, read at the last
token of each sequence. `ErnieScalarModel` is Megatron's GPTModel with the head standing where
`_postprocess` calls `self.output_layer(...)` (so it returns [b, s, 1] instead of logits); the
head's parameter lives under its own name, `reward_head.weight`, so an LM checkpoint (whose
`output_layer.weight` is [vocab, hidden]) initialises the decoder and never collides with it.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


HEAD_SEED = 20250630


class ScalarHead(torch.nn.Module):
    """hidden [s, b, h] -> values [s, b, 1]. Replicated over TP: under sequence parallelism the
    sequence is gathered first; every TP rank then computes the same values and gradients, so the
    gather's backward takes this rank's slice (no reduce: the gradients are already complete)."""

    def __init__(self, hidden_size: int, sequence_parallel: bool, dtype: torch.dtype, init_std: float):
        super().__init__()
        # Its own generator: the same initial head on every rank and at every layout (Megatron
        # seeds the default RNG per pipeline stage).
        g = torch.Generator().manual_seed(HEAD_SEED)
        self.weight = torch.nn.Parameter((torch.randn(1, hidden_size, generator=g) * init_std).to(dtype))
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return torch.nn.functional.linear(hidden, self.weight)


class _HeadCall:
    """Stands where GPTModel calls `self.output_layer(hidden, weight=..., runtime_gather_output=...)`.
    A plain object (not a Module), so the head's parameter is registered once, as `reward_head`."""

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self.sequence_parallel = False

    def __call__(self, hidden, weight=None, runtime_gather_output=None):
        return self._model.reward_head(hidden), None


class ErnieScalarModel(GPTModel):
    """GPTModel whose last stage ends in a `ScalarHead` (built untied: no vocabulary projection)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.post_process:
            config = self.config
            del self.output_layer  # [vocab, hidden]: not used, not checkpointed
            self.reward_head = ScalarHead(config.hidden_size, config.sequence_parallel, config.params_dtype,
                                          config.init_method_std)
            self.output_layer = _HeadCall(self)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        # LanguageModule's version pads/ties `output_layer.weight`, which this model has not; with
        # post_process off it skips that and everything else stays (the head is a plain child).
        post, self.post_process = self.post_process, False
        try:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self.post_process = post
