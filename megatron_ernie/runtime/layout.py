"""Parallel layout: the numbers a run is split by, validated before anything is allocated."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_ernie.errors import LayoutError  # raised by validate(); importable from here


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    cp: int = 1  # context parallel
    ep: int = 1  # expert parallel
    etp: int | None = None  # expert tensor parallel (defaults to tp)
    sequence_parallel: bool = False
    distributed_optimizer: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def validate(self, args, world_size: int) -> None:
        """Fail fast with the constraint and the numbers; `args` is an ErnieArgs."""
        errors = []
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if errors:
            raise LayoutError("; ".join(errors))
        etp = self.etp or self.tp
        mp = self.tp * self.pp * self.cp
        if world_size % mp:
            errors.append(
                f"world size {world_size} is not a multiple of TP×PP×CP = "
                f"{self.tp}×{self.pp}×{self.cp} = {mp}"
            )
        expert_mp = etp * self.ep * self.pp
        if world_size % expert_mp:
            errors.append(
                f"world size {world_size} is not a multiple of ETP×EP×PP = "
                f"{etp}×{self.ep}×{self.pp} = {expert_mp}"
            )
        if args.num_attention_heads % self.tp:
            errors.append(
                f"num_attention_heads={args.num_attention_heads} is not divisible by TP={self.tp}"
            )
        if args.num_key_value_heads % self.tp:
            errors.append(
                f"num_key_value_heads (query groups)={args.num_key_value_heads} is not divisible "
                f"by TP={self.tp}"
            )
        if args.vocab_size % self.tp:
            errors.append(f"vocab_size={args.vocab_size} is not divisible by TP={self.tp}")
        if args.num_layers % self.pp:
            errors.append(f"num_layers={args.num_layers} is not divisible by PP={self.pp}")
        if args.is_moe:
            if args.num_experts % self.ep:
                errors.append(f"num_experts={args.num_experts} is not divisible by EP={self.ep}")
            if args.moe_intermediate_size % etp:
                errors.append(
                    f"moe_intermediate_size={args.moe_intermediate_size} is not divisible by "
                    f"expert TP={etp}"
                )
            if self.tp > 1 and not self.sequence_parallel:
                errors.append(
                    f"MoE with TP={self.tp} needs sequence_parallel=True (megatron-core routes "
                    "sequence-parallel shards)"
                )
        elif self.ep > 1:
            errors.append(f"EP={self.ep} needs a MoE model; {args.name} is dense")
        if args.intermediate_size % self.tp:
            errors.append(f"intermediate_size={args.intermediate_size} is not divisible by TP={self.tp}")
        if self.sequence_parallel and self.tp == 1:
            errors.append("sequence_parallel=True needs TP > 1")
        if errors:
            raise LayoutError("invalid parallel layout: " + "; ".join(errors))
