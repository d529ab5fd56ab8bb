"""A compact forward of the engine's own ERNIE model, for generation on one CPU rank.

Why it exists. Megatron-Core's inference path through GPTModel costs ~600 small ops and ~20
module layers per decode step: attention's KV-cache bookkeeping, RoPE recomputed per layer, the
MoE token dispatcher with its host syncs, TP regions that are identities on one rank. A decode
step of a small model is mostly that overhead: on 2 CPU cores the engine ran at ~0.8× the speed of
transformers' `generate` (benchmarks/rollout.py). This forward runs the same arithmetic in ~40
ops per layer, on the *same* weight tensors: it reads them from the Megatron modules at every
call, so update_weights, sleep/wake and refit need nothing extra. It keeps its own KV cache.

- attention: one QKV matmul split by Megatron's per-group layout [q…q k v]; RoPE from per-row
  rotors computed once per generate call (an fp32 complex multiply is Megatron's interleaved
  rotation); the cache written in place; prefill on torch SDPA with a bool mask of real slots,
  decode steps as two GQA-grouped matmuls (one query per row: cheaper than SDPA's kernel here);
- MoE: ERNIE's routing through `router.ernie_topk`, the function the Megatron router runs.
  Then, for a few tokens (decode: at most 2 per expert), every expert on every token: fc1 as one
  wide matmul, the GLU output scaled by the routing probability (zero where not selected), fc2
  and the weighted sum as one matmul over the experts side by side. All experts' weights are
  read anyway, and two wide matmuls beat 2·E narrow ones. Otherwise (prefill) the
  tokens are sorted by expert and run through the experts' two grouped matmuls
  (`experts.ErnieSequentialMLP._grouped`). The shared experts are added after;
- linears on oneDNN with weights reordered once per generate call (`_linear`): ~2× faster
  than MKL's sgemm at decode's few rows. The reorders are dropped when the call ends, so a weight
  changed between calls is always read fresh.

Numbers: equal to Megatron's path up to rounding, since the summation order differs. Tested:
log-probs within 1e-5 of transformers and of Megatron's path, identical greedy tokens, identical
routed experts. `MegatronEngine` uses it only where `applies` says so, and keeps Megatron-Core's
path for every other layout and on GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_ernie.models.ernie.experts import ErnieSequentialMLP
from megatron_ernie.models.ernie.router import ErnieRouter, ernie_topk


def applies(model, layout) -> bool:
    """A CPU rank holding the whole LM (no TP/PP/EP/CP) on the local spec, its experts packed."""
    if (layout.tp, layout.pp, layout.ep, layout.cp, layout.etp or 1) != (1, 1, 1, 1, 1):
        return False
    if not (model.pre_process and model.post_process) or not hasattr(model, "output_layer"):
        return False
    if model.embedding.word_embeddings.weight.device.type != "cpu":
        return False
    for layer in model.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and (not isinstance(experts, ErnieSequentialMLP) or experts.stacked_weights() is None):
            return False
    return True


def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class LeanForward:
    """`start(...)` once per generate call, `forward(tokens, first)` per step, `finish()` after."""

    def __init__(self, model, args):
        self.model, self.args = model, args
        self.layers = list(model.decoder.layers)
        self.moe = [isinstance(getattr(layer.mlp, "router", None), ErnieRouter) for layer in self.layers]
        self.use_onednn = _onednn()
        self.cache: torch.Tensor | None = None  # [layers, 2 (k, v), b, kv heads, slots, head dim]
        self.rotors: torch.Tensor | None = None  # [b, slots, 1, head dim / 2] complex
        self.valid: torch.Tensor | None = None  # [b, slots] bool: real (not padding) slots
        self.packed: dict = {}  # (weight address, shape) -> oneDNN-reordered copy, this call only
        self.records: list[torch.Tensor] | None = None  # per MoE layer [b·s, k] when recording

    def start(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """positions / valid [b, slots]: every slot's RoPE position and whether it is real."""
        a = self.args
        b, slots = positions.shape
        dtype = self.model.embedding.word_embeddings.weight.dtype
        shape = (len(self.layers), 2, b, a.num_key_value_heads, slots, a.head_dim)
        if self.cache is None or self.cache.shape != shape or self.cache.dtype != dtype:
            self.cache = None
            self.cache = torch.empty(shape, dtype=dtype, device=positions.device)
        rope = self.model.rotary_pos_emb
        inv_freq = getattr(rope, "inner", rope).inv_freq.to(positions.device)  # the engine wraps it
        angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [b, slots, dim/2], as Megatron's
        self.rotors = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
        self.valid = valid
        self.packed = {}

    def finish(self) -> None:
        """Drop what belongs to one call (the cache stays for the next call of the same shape)."""
        self.rotors = self.valid = self.records = None
        self.packed = {}

    def release(self) -> None:
        self.finish()
        self.cache = None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, first: int, record: bool = False) -> torch.Tensor:
        """tokens [b, s] into slots first..first+s-1 -> fp32 logits of the last slot [b, V]."""
        model = self.model
        b, s = tokens.shape
        self.records = [] if record else None
        x = F.embedding(tokens, model.embedding.word_embeddings.weight)  # [b, s, H]
        mask = self._mask(first, s)
        rotors = self.rotors[:, first:first + s]
        for i, (layer, moe) in enumerate(zip(self.layers, self.moe)):
            x = x + self._attention(layer.self_attention, layer.input_layernorm(x), i, first, rotors, mask)
            h = layer.pre_mlp_layernorm(x)
            x = x + (self._moe(layer.mlp, h) if moe else self._mlp(layer.mlp, h))
        x = model.decoder.final_layernorm(x[:, -1])
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
            else model.output_layer.weight
        return self._linear(x, weight).float()

    # --- pieces -------------------------------------------------------------------------------
    def _linear(self, x: torch.Tensor, weight: torch.Tensor, layout=None) -> torch.Tensor:
        """x @ W.T with W = weight, or W = layout(weight) (a re-arranged copy made once per call);
        on oneDNN with W reordered at its first use in this call."""
        key = (weight.data_ptr(), weight.shape, layout)
        if not self.use_onednn or weight.dtype != torch.float32:  # bf16 oneDNN needs AVX512-BF16
            if layout is None:
                return F.linear(x, weight)
            if key not in self.packed:
                self.packed[key] = layout(weight)
            return F.linear(x, self.packed[key])
        packed = self.packed.get(key)
        if packed is None:
            w = weight if layout is None else layout(weight)
            packed = self.packed[key] = torch.ops.mkldnn._reorder_linear_weight(w, 32)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, None, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    def _mask(self, first: int, s: int) -> torch.Tensor:
        """[b, 1, s, first+s] bool, True = may attend: real slots up to the query's own. A
        padding query sees itself, so no row is empty. A decode token is real: every real slot."""
        end = first + s
        if s == 1:
            return self.valid[:, None, None, :end]
        keys = torch.arange(end, device=self.valid.device)
        queries = keys[first:, None]
        allowed = (keys[None, :] <= queries)[None] & (self.valid[:, None, :end] | (keys[None, :] == queries)[None])
        return allowed[:, None]

    def _attention(self, attn, h, i: int, first: int, rotors, mask):
        a = self.args
        b, s, _ = h.shape
        end = first + s
        groups, per_group, d = a.num_key_value_heads, a.num_attention_heads // a.num_key_value_heads, a.head_dim
        qkv = self._linear(h, attn.linear_qkv.weight).view(b, s, groups, per_group + 2, d)
        q = _rotate(qkv[:, :, :, :per_group].reshape(b, s, groups * per_group, d), rotors)
        cache = self.cache[i]
        cache[0, :, :, first:end] = _rotate(qkv[:, :, :, per_group], rotors).transpose(1, 2)
        cache[1, :, :, first:end] = qkv[:, :, :, per_group + 1].transpose(1, 2)
        keys, values = cache[0, :, :, :end], cache[1, :, :, :end]  # [b, groups, end, d]
        scale = attn.core_attention.softmax_scale
        if s == 1:  # each group's queries against its keys: [b, groups, per_group, end]
            scores = torch.matmul(q.view(b, groups, per_group, d), keys.transpose(-1, -2)) * scale
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            out = torch.matmul(probs, values).view(b, 1, groups * per_group * d)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale,
                                                 enable_gqa=per_group > 1)
            out = out.transpose(1, 2).reshape(b, s, -1)
        return self._linear(out, attn.linear_proj.weight)

    def _mlp(self, mlp, h):
        """Megatron's MLP without bias: fc1 → SiLU-GLU → fc2."""
        gate, up = torch.chunk(self._linear(h, mlp.linear_fc1.weight), 2, dim=-1)
        return self._linear(F.silu(gate) * up, mlp.linear_fc2.weight)

    def _moe(self, moe, h):
        b, s, hidden = h.shape
        x = h.reshape(-1, hidden)
        router = moe.router
        scores = torch.softmax(F.linear(x.float(), router.weight), dim=-1, dtype=torch.float32)
        weights, index = ernie_topk(scores, router.e_score_correction_bias, router.topk, router.norm_min)
        if self.records is not None:
            self.records.append(index)
        w1, w2 = moe.experts.stacked_weights()
        if x.shape[0] <= 2 * w1.shape[0]:
            routed = self._every_expert(x, torch.zeros_like(scores).scatter(1, index, weights), w1, w2)
        else:
            flat = index.reshape(-1)
            order = torch.argsort(flat, stable=True)
            rows = order // router.topk  # each selection's token, in expert order
            counts = torch.bincount(flat, minlength=w1.shape[0])
            out = moe.experts._grouped(x[rows], counts, weights.reshape(-1)[order], w1, w2)
            routed = torch.zeros_like(x).index_add_(0, rows, out)
        if moe.shared_experts is not None:
            routed = routed + self._mlp(moe.shared_experts, x)
        return routed.view(b, s, hidden)

    def _every_expert(self, x, probs, w1, w2):
        """All experts on all tokens x [T, H]: Σ_e p_e·(h_e @ W2_e^T) = [p_0·h_0 … p_E·h_E] @
        [W2_0 … W2_E]^T, so fc2 and the weighted sum are one matmul over the experts' widths."""
        experts, width = w1.shape[0], w1.shape[1]
        gate, up = torch.chunk(self._linear(x, w1.view(experts * width, -1)).view(-1, experts, width), 2, dim=-1)
        h = F.silu(gate) * up * probs.to(gate.dtype)[:, :, None]  # [T, E, F]
        return self._linear(h.flatten(1), w2, _side_by_side)


def _side_by_side(w2: torch.Tensor) -> torch.Tensor:
    """[E, H, F] expert fc2 weights -> [H, E·F], expert e in columns e·F..(e+1)·F-1."""
    return w2.permute(1, 0, 2).reshape(w2.shape[1], -1)


def _rotate(t: torch.Tensor, rotors: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE in fp32 (the pair (2i, 2i+1) turned by angle i) on [b, s, heads, d]."""
    pairs = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotors).flatten(-2).to(t.dtype)
