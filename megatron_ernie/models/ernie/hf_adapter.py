"""ERNIE 4.5 text weights: Hugging Face names ⇄ Megatron-Core names, and sharding to a rank.

Two steps, kept apart so that each can be read (and streamed) on its own:
1. `KEY_MAP`: HF tensors ⇄ one *canonical* Megatron tensor (full, unsharded: TP=PP=EP=1 names,
   global layer and expert numbers).
2. `shard_for_rank`: canonical tensor -> the slice this rank holds (TP/ETP split, PP layer
   offset, EP expert offset), from the attributes Megatron puts on each parameter.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from megatron_ernie.conversion.safetensors_io import SafetensorsCheckpoint
from megatron_ernie.errors import WeightError  # noqa: F401 - re-exported: callers import it from here
from megatron_ernie.models.ernie.args import ErnieArgs

# --- 1. the key map --------------------------------------------------------------------------
# kind: copy  = same tensor
#       qkv   = HF q/k/v -> Megatron's per-query-group [q-heads of group, k, v] interleave (GQA)
#       glu   = HF gate/up -> Megatron linear_fc1 = cat(gate, up)
#       bias  = HF e_score_correction_bias [1, E] -> [E]
L = "decoder.layers.{i}."
H = "model.layers.{i}."
KEY_MAP: list[tuple[str, tuple[str, ...], str]] = [
    # Megatron (canonical)                             HF                                           kind
    ("embedding.word_embeddings.weight",               ("model.embed_tokens.weight",),              "copy"),
    ("output_layer.weight",                            ("lm_head.weight",),                         "copy"),
    ("decoder.final_layernorm.weight",                 ("model.norm.weight",),                      "copy"),
    (L + "input_layernorm.weight",                     (H + "input_layernorm.weight",),             "copy"),
    (L + "self_attention.linear_qkv.weight",           (H + "self_attn.q_proj.weight",
                                                        H + "self_attn.k_proj.weight",
                                                        H + "self_attn.v_proj.weight"),             "qkv"),
    (L + "self_attention.linear_proj.weight",          (H + "self_attn.o_proj.weight",),            "copy"),
    (L + "pre_mlp_layernorm.weight",                   (H + "post_attention_layernorm.weight",),    "copy"),
    (L + "mlp.linear_fc1.weight",                      (H + "mlp.gate_proj.weight",
                                                        H + "mlp.up_proj.weight"),                  "glu"),
    (L + "mlp.linear_fc2.weight",                      (H + "mlp.down_proj.weight",),               "copy"),
    (L + "mlp.router.weight",                          (H + "mlp.gate.weight",),                    "copy"),
    (L + "mlp.router.e_score_correction_bias",         (H + "mlp.moe_statics.e_score_correction_bias",), "bias"),
    (L + "mlp.shared_experts.linear_fc1.weight",       (H + "mlp.shared_experts.gate_proj.weight",
                                                        H + "mlp.shared_experts.up_proj.weight"),   "glu"),
    (L + "mlp.shared_experts.linear_fc2.weight",       (H + "mlp.shared_experts.down_proj.weight",),"copy"),
    (L + "mlp.experts.local_experts.{e}.linear_fc1.weight", (H + "mlp.experts.{e}.gate_proj.weight",
                                                        H + "mlp.experts.{e}.up_proj.weight"),      "glu"),
    (L + "mlp.experts.local_experts.{e}.linear_fc2.weight", (H + "mlp.experts.{e}.down_proj.weight",), "copy"),
    # Multi-token prediction (the 300B ships one): Megatron-Core's MultiTokenPredictionLayer names.
    ("mtp.layers.{k}.enorm.weight",                    ("model.mtp_emb_norm.{k}.weight",),          "copy"),
    ("mtp.layers.{k}.hnorm.weight",                    ("model.mtp_hidden_norm.{k}.weight",),       "copy"),
    ("mtp.layers.{k}.eh_proj.weight",                  ("model.mtp_linear_proj.{k}.weight",),       "copy"),
    # its transformer layer: every decoder-layer row above, with these prefixes
    ("mtp.layers.{k}.transformer_layer.*",             ("model.mtp_block.{k}.*",),                  "layer"),
]
MTP_LAYER = re.compile(r"^mtp\.layers\.(?P<k>\d+)\.transformer_layer\.(?P<rest>.+)$")
HF_MTP_LAYER = re.compile(r"^model\.mtp_block\.(?P<k>\d+)\.(?P<rest>.+)$")
# HF tensors the text model does not use (the 300B's multi-token-prediction layer): converted,
# never loaded into the model.
HF_IGNORED_PREFIXES = ("mtp", "model.mtp")
REWARD_HEAD = "reward_head.weight"  # reward / value models (heads.py): no HF counterpart


def _to_regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern)
    for field in "iek":
        out = out.replace(r"\{%s\}" % field, rf"(?P<{field}>\d+)")
    return re.compile("^" + out + "$")


_RULES = [(_to_regex(m), hf, kind) for m, hf, kind in KEY_MAP if kind != "layer"]


def canonical_to_hf_names(name: str) -> tuple[tuple[str, ...], str]:
    """The HF tensor names behind one canonical Megatron tensor, and how they combine."""
    mtp = MTP_LAYER.match(name)
    if mtp:  # an MTP transformer layer is a decoder layer under other prefixes
        hf, kind = canonical_to_hf_names(f"decoder.layers.{mtp['k']}.{mtp['rest']}")
        prefix = f"model.layers.{mtp['k']}."
        return tuple(f"model.mtp_block.{mtp['k']}." + h[len(prefix):] for h in hf), kind
    for regex, hf, kind in _RULES:
        m = regex.match(name)
        if m:
            return tuple(h.format(**m.groupdict()) for h in hf), kind
    raise WeightError(f"no HF mapping for Megatron tensor {name!r}")


def canonical_shape(name: str, args: ErnieArgs) -> tuple[int, ...]:
    """The full (unsharded) shape of a canonical tensor, from the model arguments alone."""
    h, d = args.hidden_size, args.head_dim
    base = MTP_LAYER.sub(r"decoder.layers.\g<k>.\g<rest>", name)
    suffix = re.sub(r"^decoder\.layers\.\d+\.", "", base)
    expert = args.moe_intermediate_size
    table = {
        "embedding.word_embeddings.weight": (args.vocab_size, h),
        "output_layer.weight": (args.vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": ((args.num_attention_heads + 2 * args.num_key_value_heads) * d, h),
        "self_attention.linear_proj.weight": (h, args.num_attention_heads * d),
        "mlp.linear_fc1.weight": (2 * args.intermediate_size, h),
        "mlp.linear_fc2.weight": (h, args.intermediate_size),
        "mlp.router.weight": (args.num_experts, h),
        "mlp.router.e_score_correction_bias": (args.num_experts,),
        "mlp.shared_experts.linear_fc1.weight": (2 * expert * args.moe_num_shared_experts, h),
        "mlp.shared_experts.linear_fc2.weight": (h, expert * args.moe_num_shared_experts),
        "enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
    }
    suffix = re.sub(r"^mtp\.layers\.\d+\.", "", suffix)
    suffix = re.sub(r"^mlp\.experts\.local_experts\.\d+\.", "mlp.experts.", suffix)
    table["mlp.experts.linear_fc1.weight"] = (2 * expert, h)
    table["mlp.experts.linear_fc2.weight"] = (h, expert)
    if suffix not in table:
        raise WeightError(f"no shape rule for Megatron tensor {name!r}")
    return table[suffix]


def hf_shapes(name: str, args: ErnieArgs) -> dict[str, tuple[int, ...]]:
    """The shapes of the HF tensors behind canonical tensor `name` (what config.json implies)."""
    hf_names, kind = canonical_to_hf_names(name)
    shape = canonical_shape(name, args)
    if kind == "qkv":
        q = args.num_attention_heads * args.head_dim
        kv = args.num_key_value_heads * args.head_dim
        shapes = [(q, shape[1]), (kv, shape[1]), (kv, shape[1])]
    elif kind == "glu":
        shapes = [(shape[0] // 2, shape[1])] * 2
    elif kind == "bias":
        shapes = [(1, shape[0])]
    else:
        shapes = [shape]
    return dict(zip(hf_names, shapes))


def _fuse_qkv(q, k, v, args: ErnieArgs, out: torch.Tensor | None = None) -> torch.Tensor:
    """Megatron's per-group [q…q k v] rows; written into `out` (the whole fused tensor) when given."""
    g, d = args.num_key_value_heads, args.head_dim
    h = q.shape[-1]
    parts = (q.reshape(g, -1, h), k.reshape(g, d, h), v.reshape(g, d, h))
    if out is None:
        return torch.cat(parts, dim=1).reshape(-1, h)
    groups, start = out.view(g, -1, h), 0
    for part in parts:
        groups[:, start:start + part.shape[1]].copy_(part)
        start += part.shape[1]
    return out


def _split_qkv(qkv, args: ErnieArgs):
    g, d = args.num_key_value_heads, args.head_dim
    per_group = args.num_attention_heads // g * d
    x = qkv.reshape(g, per_group + 2 * d, -1)
    q, k, v = torch.split(x, [per_group, d, d], dim=1)
    h = qkv.shape[-1]
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def canonical_from_hf(name: str, get: Callable[[str], torch.Tensor], args: ErnieArgs) -> torch.Tensor:
    """The full Megatron tensor `name`, built from HF tensors fetched with `get`."""
    hf_names, kind = canonical_to_hf_names(name)
    parts = [get(n) for n in hf_names]
    if kind == "qkv":
        return _fuse_qkv(*parts, args)
    if kind == "glu":
        return torch.cat(parts, dim=0)
    if kind == "bias":
        return parts[0].reshape(-1)
    return parts[0]


def hf_from_canonical(name: str, tensor: torch.Tensor, args: ErnieArgs) -> dict[str, torch.Tensor]:
    """Inverse of `canonical_from_hf`: HF tensors for one full Megatron tensor."""
    hf_names, kind = canonical_to_hf_names(name)
    if kind == "qkv":
        parts = _split_qkv(tensor, args)
    elif kind == "glu":
        parts = torch.chunk(tensor, 2, dim=0)
    elif kind == "bias":
        parts = (tensor.reshape(1, -1),)
    else:
        parts = (tensor,)
    return {n: p.contiguous() for n, p in zip(hf_names, parts)}


def _layer_names(p: str, moe: bool, args: ErnieArgs) -> list[str]:
    names = [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight",
             p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight"]
    if not moe:
        return names + [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names += [p + "mlp.router.weight", p + "mlp.router.e_score_correction_bias"]
    if args.moe_num_shared_experts:
        names += [p + "mlp.shared_experts.linear_fc1.weight", p + "mlp.shared_experts.linear_fc2.weight"]
    for e in range(args.num_experts):
        names += [p + f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                  p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"]
    return names


def mtp_layer_is_moe(args: ErnieArgs, k: int) -> bool:
    """ERNIE builds MTP block k with decoder-layer index k, so the MoE rule applies to k."""
    return args.is_moe_layer(k)


def canonical_names(args: ErnieArgs, with_mtp: bool = False, mtp_moe: Iterable[bool] | None = None) -> list[str]:
    """Every canonical Megatron tensor of a model (the order HF checkpoints list them).

    `with_mtp` adds the multi-token-prediction layers (`args.num_mtp_layers`); `mtp_moe` says
    which of them are MoE layers when a checkpoint shows it (default: ERNIE's layer rule).
    """
    names = ["embedding.word_embeddings.weight"]
    for i in range(args.num_layers):
        names += _layer_names(f"decoder.layers.{i}.", args.is_moe_layer(i), args)
    names.append("decoder.final_layernorm.weight")
    if not args.tie_word_embeddings:
        names.append("output_layer.weight")
    if with_mtp and args.num_mtp_layers:
        moe_flags = list(mtp_moe) if mtp_moe is not None else [mtp_layer_is_moe(args, k) for k in range(args.num_mtp_layers)]
        for k, moe in enumerate(moe_flags):
            p = f"mtp.layers.{k}."
            names += [p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight"]
            names += _layer_names(p + "transformer_layer.", moe, args)
    return names


def expected_hf_names(args: ErnieArgs, with_mtp: bool = False, mtp_moe: Iterable[bool] | None = None) -> set[str]:
    out = set()
    for name in canonical_names(args, with_mtp, mtp_moe):
        out.update(canonical_to_hf_names(name)[0])
    return out


# --- Megatron-Core checkpoint keys (dist_checkpointing) ----------------------------------------
# The sharded keys Megatron-Core writes differ from module names in two ways, identical under the
# TE and local specs: norms fused into the following linear are saved under TE's names, and
# routed experts are one tensor per layer, stacked on a leading expert axis.
_SHARDED_KEY_RULES = [
    (re.compile(r"^(.*)\.input_layernorm\.weight$"), r"\1.self_attention.linear_qkv.layer_norm_weight"),
    (re.compile(r"^(.*)\.mlp\.experts\.local_experts\.\d+\.(linear_fc[12]\.weight)$"), r"\1.mlp.experts.experts.\2"),
]
_EXPERT_INDEX = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def sharded_key(name: str, moe_layer: bool) -> tuple[str, int | None]:
    """Canonical name -> (Megatron-Core checkpoint key, expert index on its leading axis or None).

    A dense layer's pre-MLP norm is fused into linear_fc1 under TE (`mlp.linear_fc1.
    layer_norm_weight`); a MoE layer's stays `pre_mlp_layernorm.weight`.
    """
    key = name
    for regex, repl in _SHARDED_KEY_RULES:
        key = regex.sub(repl, key)
    if not moe_layer:
        key = re.sub(r"\.pre_mlp_layernorm\.weight$", ".mlp.linear_fc1.layer_norm_weight", key)
    m = _EXPERT_INDEX.search(name)
    return key, (int(m.group(1)) if m else None)


def is_moe_layer_name(name: str, args: ErnieArgs, mtp_moe: Iterable[bool] | None = None) -> bool:
    """Whether canonical tensor `name` belongs to a MoE layer (False outside layers)."""
    m = re.match(r"^decoder\.layers\.(\d+)\.", name)
    if m:
        return args.is_moe_layer(int(m.group(1)))
    m = MTP_LAYER.match(name)
    if m:
        flags = list(mtp_moe) if mtp_moe is not None else None
        k = int(m["k"])
        return flags[k] if flags is not None else mtp_layer_is_moe(args, k)
    return False


# --- HF checkpoint access ---------------------------------------------------------------------
class HFWeights:
    """Named HF tensors of a checkpoint: a directory of safetensors (sharded or not, read one
    tensor at a time through `conversion.safetensors_io`) or an in-memory state dict
    (transformers' fused `experts.gate_up_proj` layout is unfused here)."""

    def __init__(self, source: str | Path | Mapping[str, torch.Tensor]):
        self._tensors: dict[str, torch.Tensor] = {}
        self._checkpoint = None
        if isinstance(source, Mapping):
            self.source = "<state dict>"
            self._tensors = _unfuse_experts(dict(source))
        else:
            self.source = str(source)
            self._checkpoint = SafetensorsCheckpoint(source)

    def keys(self) -> list[str]:
        """Every name, in storage order for directories (sequential reads)."""
        if self._checkpoint is None:
            return list(self._tensors)
        entries = self._checkpoint.entries
        return sorted(entries, key=lambda n: (str(entries[n].file), entries[n].begin))

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape without reading it."""
        if self._checkpoint is None:
            return tuple(self._get_in_memory(name).shape)
        if name not in self._checkpoint:
            raise WeightError(_missing_message(self.source, [name]))
        return self._checkpoint.entries[name].shape

    def get(self, name: str) -> torch.Tensor:
        if self._checkpoint is None:
            return self._get_in_memory(name)
        if name not in self._checkpoint:
            raise WeightError(_missing_message(self.source, [name]))
        return self._checkpoint.get(name)

    def _get_in_memory(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise WeightError(_missing_message(self.source, [name]))
        return self._tensors[name]


def _missing_message(source: str, names: list[str], shown: int = 8) -> str:
    if len(names) == 1:
        return f"{source}: tensor {names[0]!r} is missing"
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return f"{source}: {len(names)} tensors are missing: {names[:shown]}{more}"


def _unfuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers>=5 keeps experts as [E, 2I, H] / [E, H, I] and the bias under `mlp.gate.`
    in memory; checkpoints on disk (what we map) do not."""
    out = {}
    for k, v in sd.items():
        k = k.replace("mlp.gate.moe_statics.", "mlp.moe_statics.")
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e, w in enumerate(v):
                gate, up = torch.chunk(w, 2, dim=0)
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate, up
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e, w in enumerate(v):
                out[f"{base}{e}.down_proj.weight"] = w
        else:
            out[k] = v
    return out


# --- 2. sharding to this rank -----------------------------------------------------------------
_TE_ALIASES = [  # TE spec module names -> local spec names
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"mlp\.experts\.linear_fc(\d)\.weight(\d+)$"), r"mlp.experts.local_experts.\2.linear_fc\1.weight"),
]


@dataclass(frozen=True)
class RankInfo:
    layer_offset: int
    expert_offset: int
    tp: tuple[int, int]  # (rank, size)
    etp: tuple[int, int]
    tied: bool = False  # output layer shares the embedding (its PP last-stage copy included)


def rank_info(model) -> RankInfo:
    from megatron.core import parallel_state as ps

    layers = getattr(unwrap_model(model).decoder, "layers", [])
    offset = layers[0].layer_number - 1 if len(layers) else 0
    num_experts = unwrap_model(model).config.num_moe_experts or 0
    ep_rank, ep_size = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    return RankInfo(
        layer_offset=offset,
        expert_offset=ep_rank * (num_experts // ep_size) if num_experts else 0,
        tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        etp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
        tied=bool(getattr(unwrap_model(model), "share_embeddings_and_output_weights", False)),
    )


def unwrap_model(model):
    """The module inside DDP/Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def canonical_name(local_name: str, info: RankInfo) -> str:
    """This rank's parameter name -> the canonical (global, unsharded) name."""
    name = local_name
    while name.startswith("module."):
        name = name[len("module."):]
    for regex, repl in _TE_ALIASES:
        name = regex.sub(repl, name)
    name = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + info.layer_offset}.", name)
    name = re.sub(r"experts\.local_experts\.(\d+)\.", lambda m: f"experts.local_experts.{int(m.group(1)) + info.expert_offset}.", name)
    if info.tied and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    return name


def shard_for_rank(full: torch.Tensor, local: torch.Tensor, name: str, info: RankInfo) -> torch.Tensor:
    """Slice the canonical tensor the way Megatron split `local` (its attributes say how)."""
    if getattr(local, "tensor_model_parallel", False):
        dim = local.partition_dim
        rank, size = info.etp if ".experts.local_experts." in name else info.tp  # experts split by ETP
        if ".linear_fc1." in name or name.endswith("linear_fc1.weight"):
            gate, up = torch.chunk(full, 2, dim=dim)  # GLU: each half is split on its own
            full = torch.cat([torch.chunk(gate, size, dim=dim)[rank], torch.chunk(up, size, dim=dim)[rank]], dim=dim)
        else:
            full = torch.chunk(full, size, dim=dim)[rank]
    if tuple(full.shape) != tuple(local.shape):
        raise WeightError(
            f"tensor {name!r}: source shape {tuple(full.shape)} does not fit this rank's "
            f"parameter shape {tuple(local.shape)}"
        )
    return full


def _copy_whole(local: torch.Tensor, name: str, parts: dict[str, torch.Tensor], args: ErnieArgs) -> bool:
    """Copy the HF parts straight into their places in `local` when it holds the whole canonical
    tensor (no TP split): `canonical_from_hf` + copy, without building the fused tensor first —
    one copy of q/k/v and gate/up instead of two (refit speed). False: the caller slices."""
    hf_names, kind = canonical_to_hf_names(name)
    tensors = [parts[n] for n in hf_names]
    if kind == "qkv":
        q, k, v = tensors
        if tuple(local.shape) != (q.shape[0] + k.shape[0] + v.shape[0], q.shape[-1]):
            return False
        _fuse_qkv(q, k, v, args, out=local)
        return True
    if kind == "glu":
        gate, up = tensors
        if tuple(local.shape) != (gate.shape[0] + up.shape[0], *gate.shape[1:]):
            return False
        local[:gate.shape[0]].copy_(gate)
        local[gate.shape[0]:].copy_(up)
        return True
    full = tensors[0].reshape(-1) if kind == "bias" else tensors[0]
    if tuple(full.shape) != tuple(local.shape):
        return False
    local.copy_(full)
    return True


def local_tensors(model) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter and persistent buffer this rank holds."""
    m = unwrap_model(model)
    seen = set()
    for name, p in m.named_parameters():
        seen.add(name)
        yield name, p
    state_keys = set(m.state_dict().keys())
    for name, b in m.named_buffers():
        if name in state_keys and name not in seen:
            yield name, b


@torch.no_grad()
def load_canonical(model, get: Callable[[str], torch.Tensor], keep_init: tuple[str, ...] = ()) -> int:
    """Fill this rank's parameters from canonical tensors fetched with `get`; those named in
    `keep_init` (e.g. a new reward head) stay as initialised. Returns the count filled."""
    info = rank_info(model)
    n = 0
    for name, local in local_tensors(model):
        canon = canonical_name(name, info)
        if canon in keep_init:
            continue
        local.copy_(shard_for_rank(get(canon), local, canon, info).to(local.dtype))
        n += 1
    return n


class HFLoader:
    """The one path from named HF tensors to this rank's parameters, for every source (a
    directory, a state dict, a stream from a trainer), in any order.

    Each HF tensor is checked on arrival (known name, shape from the config); those of a
    canonical tensor this rank holds are kept until its parts are complete (q/k/v, gate/up),
    then fused, sliced for the rank and copied in. Tensors of other ranks are only counted
    (`fetch` is never called for them: a directory rank reads just its own shards).
    `finish()` names every expected tensor that never came."""

    def __init__(self, model, args: ErnieArgs, keep_init: tuple[str, ...] = (), source: str = "weight stream"):
        self.model, self.args, self.source = model, args, source
        self.info = rank_info(model)
        self.targets: dict[str, list[torch.Tensor]] = {}
        for name, local in local_tensors(model):
            canon = canonical_name(name, self.info)
            if canon not in keep_init:
                canonical_to_hf_names(canon)  # a parameter without an HF mapping fails here
                self.targets.setdefault(canon, []).append(local)
        self.owner: dict[str, str] = {}  # HF name -> canonical name (whole model)
        self.shapes: dict[str, tuple[int, ...]] = {}
        for canon in canonical_names(args):
            for hf_name, shape in hf_shapes(canon, args).items():
                self.owner[hf_name], self.shapes[hf_name] = canon, shape
        self.seen: set[str] = set()
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.filled = 0

    def ignored(self, name: str) -> bool:
        return name.startswith(HF_IGNORED_PREFIXES) or (name == "lm_head.weight" and self.args.tie_word_embeddings)

    def check_names(self, names: Iterable[str]) -> None:
        """For sources that list their names up front: refuse before anything is loaded."""
        names = list(names)
        unknown = [n for n in names if n not in self.owner and not self.ignored(n)]
        if unknown:
            raise WeightError(f"{self.source}: tensors not part of {self.args.name}: {sorted(unknown)}")
        present = set(names)
        missing = [n for n in self.owner if n not in present]
        if missing:
            raise WeightError(_missing_message(self.source, missing))

    @torch.no_grad()
    def accept(self, name: str, shape: tuple[int, ...], fetch: Callable[[], torch.Tensor]) -> None:
        if self.ignored(name):
            return
        canon = self.owner.get(name)
        if canon is None:
            raise WeightError(f"{self.source}: tensors not part of {self.args.name}: {[name]}")
        expected = self.shapes[name]
        if tuple(shape) != expected:
            raise WeightError(f"{self.source}: HF tensor {name!r} for {canon!r}: source shape {tuple(shape)} "
                              f"does not match {expected} (the model's config)")
        if name in self.seen:
            raise WeightError(f"{self.source}: tensor {name!r} was given twice")
        self.seen.add(name)
        if canon not in self.targets:
            return  # another pipeline stage's or expert rank's tensor
        parts = self.pending.setdefault(canon, {})
        parts[name] = fetch()
        if len(parts) == len(canonical_to_hf_names(canon)[0]):
            full = None
            for local in self.targets[canon]:
                if not _copy_whole(local, canon, parts, self.args):
                    if full is None:
                        full = canonical_from_hf(canon, parts.__getitem__, self.args)
                    local.copy_(shard_for_rank(full, local, canon, self.info).to(local.dtype))
                self.filled += 1
            del self.pending[canon]

    def finish(self) -> int:
        """Every expected tensor arrived: returns the count of this rank's tensors filled."""
        missing = [n for n in self.owner if n not in self.seen]
        if missing:
            raise WeightError(_missing_message(self.source, missing))
        return self.filled


def load_hf_weights(model, source, args: ErnieArgs, keep_init: tuple[str, ...] = ()) -> int:
    """Load an HF checkpoint (directory, state dict or HFWeights) into this rank's part of `model`.

    Every HF tensor must be used: unknown and missing names are listed in the error before
    anything is loaded. Returns the count of this rank's tensors filled."""
    hf = source if isinstance(source, HFWeights) else HFWeights(source)
    loader = HFLoader(model, args, keep_init, source=hf.source)
    names = hf.keys()
    loader.check_names(names)
    for name in names:
        loader.accept(name, hf.shape(name), functools.partial(hf.get, name))
    return loader.finish()


def load_hf_stream(model, tensors: Iterable[tuple[str, torch.Tensor]], args: ErnieArgs,
                   keep_init: tuple[str, ...] = (), source: str = "weight stream") -> int:
    """Load full HF-named tensors, as they come (e.g. from a trainer), into this rank's part of
    `model`. An unknown or misshapen tensor fails when it arrives, missing ones when the stream
    ends; on failure the model holds a mix of old and new weights (the caller must not use it)."""
    loader = HFLoader(model, args, keep_init, source=source)
    for name, tensor in tensors:
        for part_name, part in _unfuse_experts({name: tensor}).items():
            loader.accept(part_name, tuple(part.shape), functools.partial(_same, part))
    return loader.finish()


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def canonical_state_dict(model) -> dict[str, torch.Tensor]:
    """This rank's tensors under canonical names (the full model when TP=PP=EP=1)."""
    info = rank_info(model)
    return {canonical_name(n, info): t.detach().clone() for n, t in local_tensors(model)}


def to_hf_state_dict(canonical: Mapping[str, torch.Tensor], args: ErnieArgs) -> dict[str, torch.Tensor]:
    """HF tensors from a full canonical state dict (tied output layer dropped)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in canonical.items():
        if name == "output_layer.weight" and args.tie_word_embeddings:
            continue
        out.update(hf_from_canonical(name, tensor, args))
    return out
