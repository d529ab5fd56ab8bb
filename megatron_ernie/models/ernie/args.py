"""ERNIE 4.5 text model arguments: the published shapes, tiny presets, and HF config.json I/O."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from megatron_ernie.errors import ConfigError  # a model configuration we cannot represent faithfully


@dataclass(frozen=True)
class ErnieArgs:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    # MoE (num_experts == 0: dense model)
    num_experts: int = 0
    moe_k: int = 0
    moe_intermediate_size: int = 0
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 0
    moe_layer_end_index: int = -1  # -1: last layer (stored as num_layers - 1)
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    # Router training knobs (not in HF configs; post-training defaults)
    moe_aux_loss_coeff: float = 0.0  # Mixtral-style load-balancing loss
    moe_orthogonal_loss_coeff: float = 0.0  # ERNIE router orthogonal loss
    moe_bias_update_rate: float = 0.0  # aux-loss-free balancing; 0 = off
    num_mtp_layers: int = 0  # 300B ships one MTP layer; inference and our training ignore it

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        """ERNIE's rule (0-based layer i), identical to the reference implementation."""
        return (
            self.is_moe
            and (i + 1) % self.moe_layer_interval == 0
            and self.moe_layer_start_index <= i <= self.moe_layer_end_index
        )

    def moe_layer_pattern(self) -> list[int]:
        return [int(self.is_moe_layer(i)) for i in range(self.num_layers)]

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) parameters of the text model (MTP layer excluded)."""
        h = self.hidden_size
        attn = h * self.num_attention_heads * self.head_dim * 2 + 2 * h * self.num_key_value_heads * self.head_dim
        total = active = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h  # + final norm
        for i in range(self.num_layers):
            layer = attn + 2 * h
            if self.is_moe_layer(i):
                expert = 3 * h * self.moe_intermediate_size
                shared = expert * self.moe_num_shared_experts + self.num_experts * (h + 1)
                total += layer + shared + self.num_experts * expert
                active += layer + shared + self.moe_k * expert
            else:
                total += layer + 3 * h * self.intermediate_size
                active += layer + 3 * h * self.intermediate_size
        return total, active

    def replace(self, **changes) -> "ErnieArgs":
        return dataclasses.replace(self, **changes)

    def __post_init__(self):
        if self.moe_layer_end_index == -1:  # HF's "-1 = last layer", stored explicitly
            object.__setattr__(self, "moe_layer_end_index", self.num_layers - 1)
        if self.is_moe:
            if not 0 < self.moe_k <= self.num_experts:
                raise ConfigError(f"{self.name}: moe_k={self.moe_k} must be in [1, num_experts={self.num_experts}]")
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"{self.name}: moe_intermediate_size must be > 0 for a MoE model")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{self.name}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )


# Published shapes (HF configs of baidu/ERNIE-4.5-*-PT).
ERNIE45_0P3B = ErnieArgs(
    name="ernie45_0.3b", vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_layers=18,
    num_attention_heads=16, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True,
)
ERNIE45_21B_A3B = ErnieArgs(
    name="ernie45_21b_a3b", vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_layers=28,
    num_attention_heads=20, num_key_value_heads=4, head_dim=128, tie_word_embeddings=True,
    num_experts=64, moe_k=6, moe_intermediate_size=1536, moe_num_shared_experts=2,
    moe_layer_start_index=1, moe_layer_end_index=27, moe_layer_interval=1,
)
ERNIE45_300B_A47B = ErnieArgs(
    name="ernie45_300b_a47b", vocab_size=103424, hidden_size=8192, intermediate_size=28672, num_layers=54,
    num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
    num_experts=64, moe_k=8, moe_intermediate_size=3584, moe_num_shared_experts=0,
    moe_layer_start_index=3, moe_layer_end_index=53, moe_layer_interval=1, num_mtp_layers=1,
)
# Tiny presets for tests and the demo: every structural feature of the big ones, CPU-sized.
ERNIE45_TINY_DENSE = ErnieArgs(
    name="ernie45_tiny_dense", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
)
ERNIE45_TINY_MOE = ErnieArgs(
    name="ernie45_tiny_moe", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
    num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
    moe_layer_start_index=1, moe_layer_end_index=-1, moe_layer_interval=1,
)

PRESETS: dict[str, ErnieArgs] = {
    a.name: a
    for a in (ERNIE45_0P3B, ERNIE45_21B_A3B, ERNIE45_300B_A47B, ERNIE45_TINY_DENSE, ERNIE45_TINY_MOE)
}


def preset(name: str) -> ErnieArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None


# --- HF config.json ⇄ ErnieArgs --------------------------------------------------------------
# HF key -> our field, for the two text model types.
_HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "pad_token_id": "pad_token_id",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
_HF_MOE_FIELDS = {
    "moe_num_experts": "num_experts",
    "moe_k": "moe_k",
    "moe_intermediate_size": "moe_intermediate_size",
    "moe_num_shared_experts": "moe_num_shared_experts",
    "moe_layer_start_index": "moe_layer_start_index",
    "moe_layer_end_index": "moe_layer_end_index",
    "moe_layer_interval": "moe_layer_interval",
    "moe_norm_min": "moe_norm_min",
    "num_nextn_predict_layers": "num_mtp_layers",
}
# Fields that carry no model math (metadata, inference, or training settings of other trainers).
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "output_router_logits", "router_aux_loss_coef", "_name_or_path",
    "auto_map", "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class",
    "use_flash_attention", "use_rmsnorm", "fuse_rms_norm", "fuse_attn_ffn", "fuse_swiglu",
    "fuse_linear", "fuse_rope", "use_fast_ln", "recompute", "quantization_config",
    "multi_token_pred_lambda", "moe_use_aux_free", "moe_capacity", "moe_gate", "moe_aux_loss_lambda",
    "moe_orthogonal_loss_lambda", "moe_z_loss_lambda", "moe_dropout_prob", "moe_group",
    "moe_use_hard_gate", "moe_gate_act", "moe_multimodal_dispatch_use_allgather",
    "compression_ratio", "weight_share_add_bias", "rope_scaling", "rope_theta", "rope_parameters",
    "use_bias", "hidden_act", "freq_allocation",
}
# Fields whose non-default value changes the math in a way we do not implement.
_HF_REQUIRED_VALUES = {"use_bias": (False, None), "hidden_act": ("silu",)}


def from_hf_config(cfg: dict | str | Path, name: str | None = None, strict: bool = True) -> ErnieArgs:
    """ErnieArgs from an HF `config.json` (dict, file or model directory).

    Unknown fields are reported by name: an error when `strict`, else a warning.
    """
    source = "<dict>"
    if not isinstance(cfg, dict):
        path = Path(cfg)
        path = path / "config.json" if path.is_dir() else path
        source = str(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: not a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in ("ernie4_5", "ernie4_5_moe"):
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not an ERNIE 4.5 text model "
            "(expected 'ernie4_5' or 'ernie4_5_moe')"
        )
    mapping = dict(_HF_FIELDS)
    if model_type == "ernie4_5_moe":
        mapping.update(_HF_MOE_FIELDS)
    for key, allowed in _HF_REQUIRED_VALUES.items():
        if key in cfg and cfg[key] not in allowed:
            raise ConfigError(f"{source}: unsupported value {key}={cfg[key]!r} (supported: {allowed})")
    rope_scaling = cfg.get("rope_scaling")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or (rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default")):
        raise ConfigError(f"{source}: unsupported RoPE scaling {rope or rope_scaling!r} (only default RoPE)")
    unknown = sorted(k for k in cfg if k not in mapping and k not in _HF_IGNORED)
    if unknown:
        msg = f"{source}: unknown config fields {unknown} for model_type {model_type!r}"
        if strict:
            raise ConfigError(msg + " (pass strict=False to load anyway)")
        warnings.warn(msg + " were ignored", stacklevel=2)
    kwargs = {ours: cfg[hf] for hf, ours in mapping.items() if hf in cfg and cfg[hf] is not None}
    if "head_dim" not in kwargs:
        missing = [k for k in ("hidden_size", "num_attention_heads") if not isinstance(cfg.get(k), int) or cfg[k] < 1]
        if missing:
            raise ConfigError(f"{source}: needs positive integers {missing} (or head_dim)")
        kwargs["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    kwargs["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 500000.0)))
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    try:
        return ErnieArgs(name=name or cfg.get("_name_or_path") or model_type, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_hf_config(args: ErnieArgs) -> dict:
    """The HF `config.json` dict that describes `args` (transformers >= 5 layout)."""
    cfg = {hf: getattr(args, ours) for hf, ours in _HF_FIELDS.items()}
    cfg.update(
        model_type="ernie4_5_moe" if args.is_moe else "ernie4_5",
        architectures=["Ernie4_5_MoeForCausalLM" if args.is_moe else "Ernie4_5ForCausalLM"],
        hidden_act="silu",
        use_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
    )
    if args.is_moe:
        cfg.update({hf: getattr(args, ours) for hf, ours in _HF_MOE_FIELDS.items() if ours != "num_mtp_layers"})
        if args.num_mtp_layers:
            cfg["num_nextn_predict_layers"] = args.num_mtp_layers
    return cfg
