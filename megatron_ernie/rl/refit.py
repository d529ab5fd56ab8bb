"""Weight refit, trainer side: a live Megatron model (any layout) -> full HF-named tensors -> engine.

    hf_tensors(model_chunks, args, dst="all")    # collective: (HF name, full tensor), in HF order
    buckets(stream, bucket_mb)                   # group a stream into <= bucket_mb MiB lists
    push(engine, stream, bucket_mb) -> RefitStats             # one update_weights call, bucketed
    refit(engine, model_chunks, args, bucket_mb=512, dst="all") -> RefitStats   # the two together

Names and recombination come from the converter's one table (`hf_adapter.KEY_MAP`, through
`canonical_names` / `canonical_name` / `hf_from_canonical`); this module only undoes the sharding,
the inverse of `hf_adapter.shard_for_rank` (`unshard`).

Collective contract. Every rank of the world calls `hf_tensors` (or `refit`) with the same `args`
and `dst` and drives the stream to its end; all ranks walk the canonical tensors in the same order
(`canonical_names(args)`), so the per-tensor collectives line up. Per canonical tensor:
1. inside its pipeline stage: TP shards all-gathered over the TP group (GLU halves regrouped, see
   `unshard`); a routed expert gathered over the expert-TP group on the EP rank that owns it, then
   broadcast over the expert-model-parallel group;
2. across stages: broadcast over the PP group from the stage that holds it (the first one for the
   tied embedding, which the last stage also holds as its output layer).
`dst="all"`: every rank receives every full tensor (each in-process engine shards what it needs);
`dst=<global rank>`: only that rank receives (stage 2 becomes one send/recv inside its PP group),
the others still take part in stage 1 and their stream is empty (a vLLM engine on rank 0).
Only one canonical tensor's gather buffers are alive at a time.

Yielded tensors are detached and may share memory with the trainer's parameters (nothing is copied
when nothing needed gathering): engines copy what they keep and never write into them.

Before anything is gathered, one small collective checks the model against `args` on every rank
together, so a bad state fails on all ranks (no hang) with `WeightError` naming the tensors: a
tensor with no key-map row, one outside `args`' model, a shard of the wrong shape, a tensor no rank
holds. A scalar-head (reward / value) model is refused: `reward_head.weight` has no HF name and a
rollout engine serves the policy's language-model head.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence

import torch

from megatron_ernie.errors import WeightError
from megatron_ernie.models.ernie.args import ErnieArgs
from megatron_ernie.models.ernie.hf_adapter import (
    REWARD_HEAD,
    RankInfo,
    canonical_name,
    canonical_names,
    canonical_shape,
    canonical_to_hf_names,
    hf_from_canonical,
    local_tensors,
    rank_info,
    unwrap_model,
)

log = logging.getLogger(__name__)

MiB = 2**20
Tensors = Iterator[tuple[str, torch.Tensor]]

# Dtype codes for the planning collective (0 = not held).
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)
_EXPERT = re.compile(r"^(?P<pre>decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(?P<e>\d+)(?P<post>\..+)$")


@dataclass
class RefitStats:
    """One refit as this rank saw it (zeros on ranks that receive nothing under `dst=<rank>`)."""

    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0
    peak_bucket_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# --- the inverse of shard_for_rank -------------------------------------------------------------
def _is_fc1(name: str) -> bool:  # shard_for_rank's GLU test, verbatim
    return ".linear_fc1." in name or name.endswith("linear_fc1.weight")


def _is_routed_expert(name: str) -> bool:  # shard_for_rank splits these by expert-TP, the rest by TP
    return ".experts.local_experts." in name


def unshard(shards: Sequence[torch.Tensor], name: str, dim: int) -> torch.Tensor:
    """The canonical tensor `name` from every rank's slice (group-rank order) along `dim`: the
    inverse of `hf_adapter.shard_for_rank`. A GLU weight's shards are [gate_r; up_r] each, so the
    gates are joined, then the ups (a plain concatenation would interleave them)."""
    if len(shards) == 1:
        return shards[0]
    if _is_fc1(name):
        halves = [torch.chunk(s, 2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(list(shards), dim=dim)


# --- process groups ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Groups:
    tp: object
    etp: object
    ep: object
    pp: object
    tp_size: int
    etp_size: int
    ep_size: int
    ep_rank: int
    pp_size: int
    pp_rank: int
    rank: int
    pp_ranks: tuple[int, ...]  # global ranks of this rank's PP group, by stage
    ep_ranks: tuple[int, ...]


def _groups() -> _Groups:
    from megatron.core import parallel_state as ps

    dist = torch.distributed.is_initialized()

    def ranks(group, size):
        return tuple(torch.distributed.get_process_group_ranks(group)) if dist and size > 1 else (_rank(),)

    pp, ep = ps.get_pipeline_model_parallel_group(), ps.get_expert_model_parallel_group()
    pp_size, ep_size = ps.get_pipeline_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()
    return _Groups(
        tp=ps.get_tensor_model_parallel_group(), etp=ps.get_expert_tensor_parallel_group(), ep=ep, pp=pp,
        tp_size=ps.get_tensor_model_parallel_world_size(), etp_size=ps.get_expert_tensor_parallel_world_size(),
        ep_size=ep_size, ep_rank=ps.get_expert_model_parallel_rank(),
        pp_size=pp_size, pp_rank=ps.get_pipeline_model_parallel_rank(), rank=_rank(),
        pp_ranks=ranks(pp, pp_size), ep_ranks=ranks(ep, ep_size),
    )


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _chunks(model_chunks) -> list[torch.nn.Module]:
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [unwrap_model(c) for c in chunks]


# --- the plan: what each canonical tensor is, who holds it (one collective, checked) -----------
@dataclass
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    owner_stage: int
    expert_owner: int | None  # EP rank holding a routed expert (None: not an expert)
    local: torch.Tensor | None  # this rank's shard (None: held by another EP rank or stage)
    dim: int | None  # partition dim of a TP / expert-TP split shard (None: not split)


def _expected_local_shape(full: tuple[int, ...], t: torch.Tensor, split: int) -> tuple[int, ...]:
    if not getattr(t, "tensor_model_parallel", False):
        return full
    shape = list(full)
    shape[t.partition_dim] //= split
    return tuple(shape)


def _plan(chunks: list[torch.nn.Module], args: ErnieArgs, g: _Groups) -> list[_Entry]:
    names = canonical_names(args)
    order = {n: i for i, n in enumerate(names)}
    errors: list[str] = []
    local: dict[str, torch.Tensor] = {}  # this rank's shards
    dtypes: dict[str, torch.dtype] = {}  # what this rank's stage holds after stage 1
    per_ep = args.num_experts // g.ep_size if args.num_experts else 0
    for chunk in chunks:
        info: RankInfo = rank_info(chunk)
        for local_name, t in local_tensors(chunk):
            canon = canonical_name(local_name, info)
            if canon == REWARD_HEAD:
                errors.append(f"{REWARD_HEAD!r}: a scalar-head (reward / value) model has no Hugging Face "
                              f"counterpart; rollout engines serve the policy's language-model head")
                continue
            if canon not in order:
                try:
                    canonical_to_hf_names(canon)
                except KeyError:  # hf_adapter's own WeightError is a KeyError too
                    errors.append(f"{canon!r} (parameter {local_name!r}) has no row in hf_adapter.KEY_MAP")
                else:
                    errors.append(f"{canon!r} (parameter {local_name!r}) is not a tensor of {args.name}")
                continue
            if canon in local:  # the tied embedding seen twice on one rank: same tensor
                continue
            split = g.etp_size if _is_routed_expert(canon) else g.tp_size
            want = _expected_local_shape(canonical_shape(canon, args), t, split)
            if tuple(t.shape) != want:
                errors.append(f"{canon!r}: this rank holds shape {tuple(t.shape)}, {args.name} implies {want}")
                continue
            m = _EXPERT.match(canon)
            if m and int(m["e"]) // per_ep != g.ep_rank:
                errors.append(f"{canon!r} is held by EP rank {g.ep_rank}; {args.num_experts} experts over "
                              f"EP={g.ep_size} put it on EP rank {int(m['e']) // per_ep}")
                continue
            local[canon], dtypes[canon] = t, t.dtype
            if m:  # after stage 1 the whole stage holds every expert of this layer
                for e in range(args.num_experts):
                    dtypes.setdefault(f"{m['pre']}{e}{m['post']}", t.dtype)

    # Which stage holds each tensor, and its dtype (fp32 routers in bf16 models): one all-reduce.
    meta = torch.zeros(2, len(names), dtype=torch.int64)
    meta[0] = g.pp_size
    for n, dtype in dtypes.items():
        meta[0, order[n]] = g.pp_rank
        meta[1, order[n]] = -(_DTYPES.index(dtype) + 1)
    if g.pp_size > 1:
        torch.distributed.all_reduce(meta, op=torch.distributed.ReduceOp.MIN, group=g.pp)
    missing = [n for i, n in enumerate(names) if meta[0, i] == g.pp_size]
    if missing:
        errors.append(f"no rank holds {len(missing)} tensors of {args.name}: {missing[:8]}")
    _raise_together(errors)

    plan = []
    for i, n in enumerate(names):
        t = local.get(n)
        m = _EXPERT.match(n)
        dim = t.partition_dim if t is not None and getattr(t, "tensor_model_parallel", False) else None
        plan.append(_Entry(n, canonical_shape(n, args), _DTYPES[-int(meta[1, i]) - 1], int(meta[0, i]),
                           int(m["e"]) // per_ep if m else None, t, dim))
    return plan


def _raise_together(errors: list[str]) -> None:
    """Every rank raises when any rank found a problem, each naming all of them."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        if errors:
            raise WeightError("refit: " + "; ".join(errors))
        return
    count = torch.tensor([len(errors)], dtype=torch.int64)
    torch.distributed.all_reduce(count)
    if not count.item():
        return
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, errors)  # only on this error path
    by_message: dict[str, list[int]] = {}
    for r, errs in enumerate(everyone):
        for e in errs:
            by_message.setdefault(e, []).append(r)
    lines = [f"{msg} [rank {','.join(map(str, ranks))}]" for msg, ranks in by_message.items()]
    raise WeightError(f"refit: {len(lines)} problem(s): " + "; ".join(lines[:12]))


# --- the stream --------------------------------------------------------------------------------
def _all_gather(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(out, t.contiguous(), group=group)
    return out


def _stage_full(e: _Entry, g: _Groups) -> torch.Tensor:
    """Stage 1, on every rank of the owning stage: the full canonical tensor."""
    if e.expert_owner is None:
        if e.dim is None or g.tp_size == 1:
            return e.local.detach()
        return unshard(_all_gather(e.local.detach(), g.tp, g.tp_size), e.name, e.dim)
    if e.local is not None:  # this EP rank holds the expert
        t = e.local.detach()
        full = t if e.dim is None or g.etp_size == 1 else unshard(_all_gather(t, g.etp, g.etp_size), e.name, e.dim)
    else:
        full = torch.empty(e.shape, dtype=e.dtype)
    if g.ep_size > 1:
        full = full.contiguous()
        torch.distributed.broadcast(full, src=g.ep_ranks[e.expert_owner], group=g.ep)
    return full


def _check_dst(dst) -> None:
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if dst == "all":
        return
    if isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < world:
        raise ValueError(f"dst={dst!r}: expected 'all' or a global rank in [0, {world})")


def receives(dst) -> bool:
    """Whether this rank's stream carries tensors for `dst`."""
    return dst == "all" or dst == _rank()


def hf_tensors(model_chunks, args: ErnieArgs | None = None, *, dst: str | int = "all") -> Tensors:
    """Collective. The model's full tensors under their HF names (those of its saved safetensors),
    in `canonical_names(args)` order; see the module docstring for the protocol.

    `model_chunks`: a model, a DDP / Float16 wrapped one, or a list of (virtual-pipeline) chunks.
    `args`: the model's ErnieArgs (default: the one `build_model` attached). The check against
    `args` runs now (collective, `WeightError` on every rank); the gathers run as the stream is read.
    """
    _check_dst(dst)
    chunks = _chunks(model_chunks)
    args = args or getattr(chunks[0], "ernie_args", None)
    if args is None:
        raise ValueError("hf_tensors: pass the model's ErnieArgs (this model carries none)")
    g = _groups()
    plan = _plan(chunks, args, g)
    return _stream(plan, args, g, dst)


@torch.no_grad()
def _stream(plan: list[_Entry], args: ErnieArgs, g: _Groups, dst) -> Tensors:
    to_all = dst == "all"
    for e in plan:
        full = _stage_full(e, g) if e.owner_stage == g.pp_rank else None
        if g.pp_size > 1:
            src = g.pp_ranks[e.owner_stage]
            if to_all:
                if full is None:
                    full = torch.empty(e.shape, dtype=e.dtype)
                full = full.contiguous()
                torch.distributed.broadcast(full, src=src, group=g.pp)
            elif dst in g.pp_ranks and src != dst:  # one hop, owner stage -> dst, inside dst's PP group
                if g.rank == src:
                    torch.distributed.send(full.contiguous(), dst=dst, group=g.pp)
                elif g.rank == dst:
                    full = torch.empty(e.shape, dtype=e.dtype)
                    torch.distributed.recv(full, src=src, group=g.pp)
        if not (to_all or g.rank == dst):
            continue
        if tuple(full.shape) != e.shape:  # cannot happen after _plan's checks; a gather bug if it does
            raise WeightError(f"refit: gathered {e.name!r} has shape {tuple(full.shape)}, expected {e.shape}")
        parts = hf_from_canonical(e.name, full, args)
        del full  # the parts keep what they view; nothing else of this tensor stays referenced
        while parts:
            name = next(iter(parts))
            yield name, parts.pop(name)


# --- buckets and the refit ---------------------------------------------------------------------
def buckets(stream: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive lists of the stream of at most `bucket_mb` MiB (2**20 bytes) each; a tensor
    larger than that goes alone. A bucket is handed out as soon as it is full or the next tensor
    would overflow it (that tensor starts the next one).

    Memory: each list is emptied when the next bucket is asked for and no other reference is kept,
    so what this holds is one bucket (plus, when a bucket closed on an overflow, the tensor that
    starts the next) whatever the model size. Keep what you need before asking for the next
    (`[list(b) for b in buckets(...)]` keeps them all)."""
    cap = int(bucket_mb * MiB)
    if cap <= 0:
        raise ValueError(f"bucket_mb={bucket_mb}: must be > 0 (at least one byte)")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for item in stream:
        n = item[1].nbytes
        if bucket and size + n > cap:
            yield bucket
            bucket.clear()
            size = 0
        bucket.append(item)
        size += n
        del item  # the list is the only holder
        if size >= cap:
            yield bucket
            bucket.clear()
            size = 0
    if bucket:
        yield bucket
        bucket.clear()


def push(engine, stream: Iterable[tuple[str, torch.Tensor]], bucket_mb: float = 512,
         stats: RefitStats | None = None) -> RefitStats:
    """`engine.update_weights(...)` called once, with a generator over `stream` filled bucket by
    bucket: each bucket's tensors (and so its collectives) are produced together, then handed over
    one at a time and released as the engine lets go of them.

    One call per refit (not per bucket): the engine sees a whole refit (it can check completeness,
    count refits, finalise once); engines that batch (an RPC per bucket) group the stream themselves,
    e.g. with `buckets`. `engine=None`: the stream is driven to its end with no one receiving
    (ranks outside `dst`). If the engine raises or returns early, the rest of the stream is still
    driven (other ranks' collectives complete), then its error — or a RuntimeError — is raised."""
    stats = stats or RefitStats()
    start = time.perf_counter()

    def handout() -> Tensors:
        for bucket in buckets(stream, bucket_mb):
            stats.buckets += 1
            stats.peak_bucket_bytes = max(stats.peak_bucket_bytes, sum(t.nbytes for _, t in bucket))
            bucket.reverse()
            while bucket:
                stats.tensors += 1
                stats.bytes += bucket[-1][1].nbytes
                yield bucket.pop()  # no local reference: released when the engine drops it

    items = handout()
    try:
        if engine is not None:
            engine.update_weights(items)
    finally:
        taken = stats.tensors
        left = sum(1 for _ in items)  # keeps this rank's collectives in step with the others
    if engine is not None and left:
        raise RuntimeError(f"{type(engine).__name__}.update_weights returned after taking {taken} tensors; "
                           f"{left} more were in the refit (they were gathered and dropped)")
    stats.seconds = time.perf_counter() - start
    return stats


def refit(engine, model_chunks, args: ErnieArgs | None = None, bucket_mb: float = 512,
          dst: str | int = "all") -> RefitStats:
    """Collective: push the model's current weights into `engine` (see `push` for the call
    pattern, the module docstring for `dst`). On ranks that receive nothing, `engine` may be None.
    Returns (and logs) this rank's stats."""
    start = time.perf_counter()
    stream = hf_tensors(model_chunks, args, dst=dst)
    stats = push(engine if receives(dst) else None, stream, bucket_mb)
    stats.seconds = time.perf_counter() - start
    if receives(dst):
        log.info("refit: %d tensors, %.1f MiB in %d buckets (peak bucket %.1f MiB) in %.2f s",
                 stats.tensors, stats.bytes / MiB, stats.buckets, stats.peak_bucket_bytes / MiB, stats.seconds)
    return stats


__all__ = ["MiB", "RefitStats", "buckets", "hf_tensors", "push", "receives", "refit", "unshard"]
