"""Build ERNIE 4.5 text models as Megatron-Core GPTModels."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ernie.models.ernie.args import ErnieArgs
from megatron_ernie.models.ernie.spec import ernie_block_spec, te_available
from megatron_ernie.runtime.layout import ParallelLayout


@dataclass
class ErnieTransformerConfig(TransformerConfig):
    """Megatron's TransformerConfig plus the knobs of the ERNIE router."""

    moe_norm_min: float = 1e-12
    moe_orthogonal_loss_coeff: float = 0.0
    moe_bias_update_rate: float = 0.0


def transformer_config(
    args: ErnieArgs,
    layout: ParallelLayout | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    **overrides,
) -> ErnieTransformerConfig:
    """The Megatron config that reproduces `args` under `layout`."""
    layout = layout or ParallelLayout()
    use_te = te_available() if use_te is None else use_te
    on_cpu = not torch.cuda.is_available()
    kw = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.intermediate_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_key_value_heads,
        kv_channels=args.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_interleaved=True,
        init_method_std=0.02,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        pipeline_dtype=dtype,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp or layout.tp,
        sequence_parallel=layout.sequence_parallel,
        calculate_per_token_loss=True,
        use_cpu_initialization=on_cpu,
        # Fused kernels need CUDA. TE's fused RoPE (interleaved needs TE >= 2.3) rotates in fp32
        # like the reference; on CPU runtime/cpu_compat.py does the same.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=use_te,
        bias_dropout_fusion=use_te,
        masked_softmax_fusion=use_te,
        apply_rope_fusion=use_te,
        persist_layer_norm=False,
    )
    if args.is_moe:
        kw.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_k,
            moe_ffn_hidden_size=args.moe_intermediate_size,
            moe_shared_expert_intermediate_size=(
                args.moe_intermediate_size * args.moe_num_shared_experts
                if args.moe_num_shared_experts
                else None
            ),
            moe_layer_freq=args.moe_layer_pattern(),
            moe_router_score_function="softmax",
            moe_router_pre_softmax=True,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss" if args.moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=use_te,
            moe_norm_min=args.moe_norm_min,
            moe_orthogonal_loss_coeff=args.moe_orthogonal_loss_coeff,
            moe_bias_update_rate=args.moe_bias_update_rate,
            # every router gets a RouterReplay (idle unless rl/replay.py sets an action): the
            # rollout engine records selections through it, the trainer replays them
            moe_enable_routing_replay=True,
        )
    kw.update(overrides)
    return ErnieTransformerConfig(**kw)


def build_model(
    args: ErnieArgs,
    layout: ParallelLayout | None = None,
    *,
    config: ErnieTransformerConfig | None = None,
    dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    vp_stage: int | None = None,
    head: str = "lm",
) -> GPTModel:
    """This rank's part of the model (parallel state must be initialised).

    `head="scalar"`: a reward / value model (models/ernie/heads.py) — one value per position, no
    vocabulary projection, never tied to the embeddings."""
    if head not in ("lm", "scalar"):
        raise ValueError(f"head={head!r}: expected 'lm' or 'scalar'")
    use_te = te_available() if use_te is None else use_te
    config = config or transformer_config(args, layout, dtype=dtype, use_te=use_te)
    model_class = GPTModel
    if head == "scalar":
        from megatron_ernie.models.ernie.heads import ErnieScalarModel as model_class
    model = model_class(
        config=config,
        transformer_layer_spec=ernie_block_spec(args, config, use_te, vp_stage=vp_stage),
        vocab_size=args.vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=args.tie_word_embeddings and head == "lm",
        position_embedding_type="rope",
        rotary_base=args.rope_theta,
        vp_stage=vp_stage,
    )
    model.ernie_args = args
    return model
