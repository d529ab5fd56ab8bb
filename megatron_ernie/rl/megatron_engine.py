"""The in-process rollout engine: this rank's shard of an ERNIE model generating with a KV cache.

`MegatronEngine` implements `rl.engine.RolloutEngine` at any TP/PP/EP layout in an initialised
Megatron parallel state (`runtime.initialize`). What it reuses from Megatron-Core and what it adds:

- The model is `build_model`'s GPTModel on the *local* spec (also on GPU): its SDPAttention honours
  a per-row padding mask in every step, which TE's attention would drop once Megatron switches
  decode steps to `no_mask`. Sequence parallelism is off in the engine's model whatever the
  layout says (a decode step has one token per row: nothing to split; Megatron's static engine
  refuses it too). MoE layers under TP then see every TP rank's full copy of the tokens, which
  the alltoall dispatcher treats as that rank's shard (gather + reduce-scatter): exact.
- KV cache: Megatron's `StaticInferenceContext` passed to GPTModel.forward; Megatron's Attention
  writes and reads the cache, and the context makes the model gather only the last position's
  logits over TP. PP: hidden states go stage to stage with Megatron's inference p2p helpers.
- Ragged prompts: left padding. Megatron's RoPE numbers positions by cache slot, so the engine's
  `RowPositionRotary` gives each row its own positions (slot - padding) and a bool mask keeps pad
  slots out of every query's keys: a prompt's tokens do not depend on the rest of the batch.
- Written here: the decode loop, sampling (per-request torch.Generator, inverse-CDF draws on
  the filtered distribution), stop/length handling, log-probs, routed-expert capture.
- One CPU rank holding the whole model (TP=PP=EP=1, the embedded default): the same loop runs on
  `lean_forward.LeanForward` instead of GPTModel.forward, the same weights in ~40 ops per layer
  (2.5-3x faster decode there; equal to this path up to rounding, tested). `lean=False` keeps
  Megatron-Core's path.

Collective contract. Every rank of the world calls `generate` (and `update_weights`, `sleep`,
`wake`) together. Ranks of one model-parallel group (TP×PP) pass the same prompts (checked: a
mismatch fails on every rank); each data-parallel rank passes its own share, possibly none.
Input errors on any rank fail `generate` on every rank before the first forward, so none hangs.
With EP > 1 the MoE alltoall needs every rank to run the same number of forwards: the decode
loop then runs in lockstep over the world (a 'still running' flag all-reduced each step); a
rank whose requests are done runs one-token forwards without its cache until all are.

Log-probs: fp32 log_softmax of the raw logits at the sampled token, before temperature, top-k,
top-p. Routed experts (MoE, `return_routed_experts`): recorded through Megatron's RouterReplay
(RECORD) on this engine's routers, [len(prompt) + len(tokens) - 1, moe_layers, top_k] int32 in
model layer order, pad positions excluded, gathered over PP stages. Each rank's router sees all of
its tokens (no sequence parallelism here; with EP, the rank's own requests). Rows are in token
order; a trainer replaying them under TP+SP must hand each TP rank the rows of its sequence shard
(its router sees [s/TP, b] tokens, flattened sequence-major).

Weights: `update_weights` takes full HF-named tensors (the whole model, as an HF checkpoint
lists them, in any order) through `hf_adapter.load_hf_stream`. A failed update leaves the engine
refusing to generate until a complete update succeeds. `sleep()` frees the KV cache and every
weight's storage; after `wake()` the weights are uninitialised and `update_weights` is required.
"""
from __future__ import annotations

import gc
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from megatron.core import parallel_state as ps
from megatron.core.inference.communication_utils import recv_from_prev_pipeline_rank_, send_to_next_pipeline_rank
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_ernie.errors import EngineInputError, UserError
from megatron_ernie.models.ernie.args import ErnieArgs, from_hf_config
from megatron_ernie.models.ernie.experts import pack_experts
from megatron_ernie.models.ernie.hf_adapter import load_hf_stream, load_hf_weights, local_tensors
from megatron_ernie.models.ernie.model import build_model, transformer_config
from megatron_ernie.models.ernie.router import ernie_routers
from megatron_ernie.rl import lean_forward
from megatron_ernie.rl.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    EngineNotReadyError,
    EngineStats,
    SamplingParams,
    check_prompts,
    hf_eos_ids,
    per_request,
)
from megatron_ernie.runtime import cpu_compat
from megatron_ernie.runtime.layout import ParallelLayout


# --- positions per row ------------------------------------------------------------------------
class RowPositionRotary(torch.nn.Module):
    """Megatron's RotaryEmbedding with one position per (cache slot, row): [slots, b, 1, dim].

    Megatron's attention slices the embedding by cache slot (dim 0) and broadcasts it over the
    batch (dim 1), so per-row positions need no change there. Without positions set (plain
    forwards) it is the wrapped module."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.emb: torch.Tensor | None = None

    def set_positions(self, positions: torch.Tensor | None) -> None:
        """positions [slots, b] (int) or None. Same numbers as Megatron's `get_emb` per row."""
        if positions is None:
            self.emb = None
            return
        inv_freq = self.inner.inv_freq.to(positions.device)
        freqs = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [slots, b, dim/2]
        if self.inner.rotary_interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        self.emb = emb[:, :, None, :]

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.inner.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        if self.emb is None:
            return self.inner(max_seq_len, offset, packed_seq, cp_group)
        return self.emb[:max_seq_len]


# --- sampling -------------------------------------------------------------------------------
def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]):
    """One token per row of fp32 logits [n, V]: temperature, top-k, top-p, then an inverse-CDF
    draw with the row's generator (one uniform per row and step: a row's stream does not depend
    on its batch). Greedy rows take the argmax. Ties break to the lowest id in both cases, so
    top_k=1 is greedy."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    device = logits.device
    index = torch.tensor(rows, device=device)
    temperature = torch.tensor([params[i].temperature for i in rows], device=device)
    top_k = torch.tensor([params[i].top_k or logits.shape[-1] for i in rows], device=device)
    # top_p=1 must not cut the tail where fp32 cumulative sums reach 1 early
    top_p = torch.tensor([params[i].top_p if params[i].top_p < 1 else float("inf") for i in rows], device=device)
    uniform = torch.stack([torch.rand((), generator=generators[i], device=device) for i in rows])
    sorted_logits, order = torch.sort(logits[index] / temperature[:, None], dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[-1], device=device)
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)  # smallest prefix reaching top_p
    cdf = torch.cumsum(probs, dim=-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp(max=logits.shape[-1] - 1)
    out[index] = order.gather(1, pick).squeeze(1)
    return out


# --- one generate call's rows ---------------------------------------------------------------
@dataclass
class _Batch:
    """Left-padded rows and what each has produced. Slot t of row r holds position t - pad[r]."""

    prompts: list[list[int]]
    truncated: list[bool]
    params: list[SamplingParams]
    limits: list[int]  # new tokens allowed: max_new_tokens, or what the context leaves
    stops: list[frozenset[int]]
    generators: list[torch.Generator]
    device: torch.device
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    records: list[torch.Tensor] = field(default_factory=list)  # per forward: [s, b, local moe layers, k]

    def __post_init__(self):
        n = len(self.prompts)
        self.tokens, self.logprobs, self.finish = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        lens = torch.tensor([len(p) for p in self.prompts], dtype=torch.long)
        self.width = int(lens.max()) if n else 0
        self.pad = (self.width - lens).to(self.device)
        self.padded = bool((lens < self.width).any())
        self.steps = max(self.limits, default=0)

    @property
    def size(self) -> int:
        return len(self.prompts)

    @property
    def cache_len(self) -> int:
        return self.width + self.steps - 1  # the last sampled token is never fed

    def active(self) -> bool:
        return any(f is None for f in self.finish)

    def slots_valid(self, slots: int) -> torch.Tensor:
        """[b, slots] bool: which cache slots hold real tokens."""
        return torch.arange(slots, device=self.device)[None, :] >= self.pad[:, None]

    def positions(self, slots: int) -> torch.Tensor:
        """[slots, b] RoPE position of every slot (pad slots: 0)."""
        return (torch.arange(slots, device=self.device)[:, None] - self.pad[None, :]).clamp(min=0)

    def prefill_inputs(self, pad_id: int):
        """Tokens [b, width], positions [b, width] and the mask (None without padding: causal).
        The mask is b·width² bools: bucket long ragged prompts by length to bound it."""
        tokens = torch.full((self.size, self.width), pad_id, dtype=torch.long)
        for r, p in enumerate(self.prompts):
            tokens[r, self.width - len(p):] = torch.tensor(p, dtype=torch.long)
        if not self.padded:
            return tokens.to(self.device), self.positions(self.width).t(), None
        valid = self.slots_valid(self.width)
        causal = torch.ones(self.width, self.width, dtype=torch.bool, device=self.device).tril()
        own = torch.eye(self.width, dtype=torch.bool, device=self.device)  # pad queries see themselves: no NaN
        allowed = causal[None] & (valid[:, None, :] | own[None])
        return tokens.to(self.device), self.positions(self.width).t(), ~allowed[:, None]

    def decode_inputs(self, step: int):
        """Step n >= 1 feeds each row's last token into slot width + n - 1."""
        end = self.width + step
        tokens = torch.tensor([t[-1] if t else 0 for t in self.tokens], dtype=torch.long, device=self.device)
        mask = ~self.slots_valid(end)[:, None, None, :] if self.padded else None
        return tokens[:, None], self.positions(end)[-1:].t(), mask

    def advance(self, tokens: list[int], logprobs: list[float]) -> None:
        for r, (tok, lp) in enumerate(zip(tokens, logprobs)):
            if self.finish[r] is not None:
                continue
            self.tokens[r].append(tok)
            self.logprobs[r].append(lp)
            if tok in self.stops[r]:
                self.finish[r] = FINISH_STOP
            elif len(self.tokens[r]) >= self.limits[r]:
                self.finish[r] = FINISH_LENGTH

    def routed_experts(self, r: int) -> torch.Tensor:
        """Row r's records: its prompt slots of the prefill, then one per fed completion token."""
        prefill = self.records[0][int(self.pad[r]):, r]
        decoded = [self.records[n][0, r][None] for n in range(1, len(self.tokens[r]))]
        return torch.cat([prefill, *decoded])


# --- the engine -----------------------------------------------------------------------------
class MegatronEngine:
    """ERNIE rollout engine on this rank's model shard. See the module docstring for the contract.

    args/layout: the model and the parallel layout already initialised (`runtime.initialize`).
    max_model_len: the context (prompt + completion), default the model's max positions.
    overlong: "refuse" or "truncate" (from the left) prompts that leave no room for one token.
    eos_token_ids: finish a request (besides its stop_token_ids); default the config's EOS.
    seed: where seeds come from for requests without one (per DP rank).
    init_from: an HF directory to load (else weights must come through update_weights).
    lean: generate through `lean_forward` where it applies (one CPU rank); False keeps
    Megatron-Core's inference path everywhere (the reference the lean forward is tested against)."""

    def __init__(self, args: ErnieArgs, layout: ParallelLayout | None = None, *, dtype: torch.dtype = torch.float32,
                 max_model_len: int | None = None, overlong: str = "refuse",
                 eos_token_ids: Iterable[int] | None = None, seed: int = 0, init_from: str | Path | None = None,
                 lean: bool = True):
        self.args = args
        self.layout = layout or ParallelLayout()
        self.max_model_len = max_model_len or args.max_position_embeddings
        self.overlong = overlong
        eos = eos_token_ids if eos_token_ids is not None else [args.eos_token_id]
        self.eos_token_ids = frozenset(int(t) for t in eos)
        self.stats = EngineStats()
        self.device = _collective_device()
        self.model = self._build(dtype)
        self.routers = ernie_routers([self.model])
        self._moe_slot = _moe_slots(args, self.routers)
        self._seed_source = torch.Generator().manual_seed(seed + 1_000_003 * ps.get_data_parallel_rank())
        self._lockstep = ps.get_expert_model_parallel_world_size() > 1
        self._lean = lean_forward.LeanForward(self.model, args) \
            if lean and lean_forward.applies(self.model, self.layout) else None
        self._cache: StaticInferenceContext | None = None
        self._shapes: list[tuple[torch.Tensor, torch.Size]] | None = None  # set while asleep
        self._recording = False
        self._not_ready = "no weights loaded: call update_weights (or pass init_from)"
        if init_from is not None:
            self._load(lambda: load_hf_weights(self.model, init_from, args))

    @classmethod
    def from_hf(cls, path: str | Path, layout: ParallelLayout | None = None, **kwargs) -> "MegatronEngine":
        """An engine on an HF model directory: config.json, weights, and EOS ids from
        generation_config.json when present (unless `eos_token_ids` is given)."""
        args = from_hf_config(path)
        kwargs.setdefault("eos_token_ids", hf_eos_ids(path) or (args.eos_token_id,))
        return cls(args, layout, init_from=path, **kwargs)

    def _build(self, dtype: torch.dtype):
        config = transformer_config(self.args, self.layout, dtype=dtype, use_te=False, sequence_parallel=False,
                                    moe_enable_routing_replay=self.args.is_moe)
        model = build_model(self.args, self.layout, config=config, use_te=False).eval()
        for router in ernie_routers([model]):
            # RouterReplay's class-wide list is what a trainer's set_replay_data addresses; the
            # engine drives its own instances, so they stay out of it.
            RouterReplay.global_router_replay_instances.remove(router.router_replay)
        model.rotary_pos_emb = RowPositionRotary(model.rotary_pos_emb)
        pack_experts(model)  # grouped expert matmuls in decode (models/ernie/experts.py)
        return model

    # --- weights --------------------------------------------------------------------------
    def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load full HF-named tensors (the whole model) into this rank's shards. Raises
        WeightError naming a missing, unknown or misshapen tensor; the engine then refuses to
        generate until a complete update succeeds."""
        if self._shapes is not None:
            raise EngineNotReadyError("update_weights: the engine is asleep; call wake() first")
        self._load(lambda: load_hf_stream(self.model, tensors, self.args, source="update_weights"))

    def _load(self, load) -> None:
        self._not_ready = "update_weights is in progress or was interrupted"
        try:
            load()
        except Exception as e:
            self._not_ready = f"the last weight update failed, weights are inconsistent ({e}); " \
                              "a complete update_weights must succeed before generate"
            raise
        self._not_ready = None
        self.stats.refits += 1

    def sleep(self) -> None:
        """Free the KV cache and every weight's storage (the module structure stays)."""
        if self._shapes is not None:
            return
        self._cache = None
        if self._lean is not None:
            self._lean.release()
        self._shapes = []
        for _, t in local_tensors(self.model):
            self._shapes.append((t, t.shape))
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        self.model.rotary_pos_emb.set_positions(None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Reallocate the weights (uninitialised: generate needs an update_weights first)."""
        if self._shapes is None:
            return
        for t, shape in self._shapes:
            t.data = torch.empty(shape, dtype=t.dtype, device=t.device)
        pack_experts(self.model)
        self._shapes = None
        self._not_ready = "woken from sleep: the weights need an update_weights before generate"

    @property
    def asleep(self) -> bool:
        return self._shapes is not None

    # --- generation -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Collective (see the module docstring). One Completion per prompt, in order."""
        with torch.inference_mode(), cpu_compat.device_mode_suspended():
            batch = self._admit(prompts, params)
            record = self.args.is_moe and any(p.return_routed_experts for p in batch.params)
            self._record(record)
            try:
                self._decode(batch, record)
            finally:
                self._record(False)
                self.model.rotary_pos_emb.set_positions(None)
            routed = self._gather_routed(batch) if record else None
        self.stats.requests += batch.size
        self.stats.generated_tokens += sum(len(t) for t in batch.tokens)
        wants = [routed is not None and p.return_routed_experts for p in batch.params]
        return [
            Completion(prompt_ids=batch.prompts[r], token_ids=batch.tokens[r], logprobs=batch.logprobs[r],
                       finish_reason=batch.finish[r], prompt_truncated=batch.truncated[r],
                       routed_experts=routed[r] if wants[r] else None)
            for r in range(batch.size)
        ]

    def _admit(self, prompts, params) -> _Batch:
        """Validate on every rank, then agree: any rank's error fails generate everywhere."""
        error: UserError | None = None
        try:
            if self._shapes is not None:
                raise EngineNotReadyError("generate refused: the engine is asleep")
            if self._not_ready is not None:
                raise EngineNotReadyError(f"generate refused: {self._not_ready}")
            params = per_request(params, len(prompts))
            served = check_prompts(prompts, params, vocab_size=self.args.vocab_size, max_model_len=self.max_model_len,
                                   overlong=self.overlong, stats=self.stats)
        except UserError as e:
            error = e
        if not _same_in_group(prompts, params, ps.get_model_parallel_group()) and error is None:
            error = EngineInputError("generate: ranks of one model-parallel group (TP×PP) passed different prompts "
                                     "or sampling params; they must pass the same")
        failed = _max_over_world(torch.distributed.get_rank() + 1 if error else 0)
        if error is not None:
            raise error
        if failed:
            raise EngineInputError(f"generate refused: rank {failed - 1} could not serve its requests (see its error)")
        return _Batch(
            prompts=[ids for ids, _ in served], truncated=[t for _, t in served], params=list(params),
            limits=[min(p.max_new_tokens, self.max_model_len - len(ids)) for (ids, _), p in zip(served, params)],
            stops=[self.eos_token_ids | frozenset(p.stop_token_ids) for p in params],
            generators=[self._generator(p) for p in params], device=self.device,
        )

    def _generator(self, p: SamplingParams) -> torch.Generator:
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
        return torch.Generator(device=self.device).manual_seed(seed)

    def _decode(self, batch: _Batch, record: bool) -> None:
        """Prefill, then one token per step until every request is done (in lockstep with EP)."""
        if self._lean is not None:
            return self._lean_decode(batch, record)
        ctx = self._kv_cache(batch) if batch.size else None
        if ctx is not None:
            self.model.rotary_pos_emb.set_positions(batch.positions(ctx.max_sequence_length))
        step = 0
        while True:
            here = batch.active()
            if not (_max_over_world(int(here)) if self._lockstep else here):
                return
            if not here:
                self._idle_forward()
                continue
            if step == 0:
                tokens, positions, mask = batch.prefill_inputs(self.args.pad_token_id)
            else:
                tokens, positions, mask = batch.decode_inputs(step)
            if step == 1:
                ctx.enable_decode_mode()
            logits = self._forward(tokens, positions, mask, ctx)
            self.stats.forwards += 1
            if record:
                batch.records.append(self._take_records(tokens.shape[1], batch.size))
            batch.advance(*self._sample(logits, batch))
            step += 1

    def _lean_decode(self, batch: _Batch, record: bool) -> None:
        """The same loop on `lean_forward` (one rank holds the whole model: no collectives)."""
        if not batch.size:
            return
        lean, slots = self._lean, batch.cache_len
        lean.start(batch.positions(slots).t(), batch.slots_valid(slots))
        try:
            step = 0
            while batch.active():
                if step == 0:
                    tokens, first = batch.prefill_inputs(self.args.pad_token_id)[0], 0
                else:
                    tokens, first = batch.decode_inputs(step)[0], batch.width + step - 1
                logits = lean.forward(tokens, first, record=record)
                self.stats.forwards += 1
                if record:  # per MoE layer [b·s, k] -> [s, b, layers, k], as _take_records gives
                    picked = torch.stack(lean.records, dim=1).view(batch.size, tokens.shape[1], len(lean.records), -1)
                    batch.records.append(picked.transpose(0, 1).to(device="cpu", dtype=torch.int32))
                batch.advance(*self._sample(logits[:, None], batch))
                step += 1
        finally:
            lean.finish()

    def _kv_cache(self, batch: _Batch) -> StaticInferenceContext:
        """The cache of earlier calls when big enough, else a bigger one (Megatron's Attention
        allocates each layer's buffers at its first forward). Held until sleep()."""
        cache = self._cache
        if cache is None or cache.max_batch_size < batch.size or cache.max_sequence_length < batch.cache_len:
            rows, slots = (cache.max_batch_size, cache.max_sequence_length) if cache is not None else (0, 0)
            self._cache = cache = StaticInferenceContext(max(batch.size, rows), max(batch.cache_len, slots))
        cache.reset()
        return cache

    def _forward(self, tokens, positions, mask, ctx):
        """One forward through this stage (hidden states in from the previous, out to the next)."""
        model, first, last = self.model, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        b, s = tokens.shape
        received = None
        if not first:
            received = torch.empty((s, b, self.args.hidden_size), dtype=model.config.pipeline_dtype, device=self.device)
            recv_from_prev_pipeline_rank_(received)
        model.set_input_tensor(received)
        out = model(tokens, positions, mask, inference_context=ctx, runtime_gather_output=True)
        if not last:
            send_to_next_pipeline_rank(out.to(model.config.pipeline_dtype).contiguous())
        if ctx is not None:
            ctx.increment_sequence_len_offset(s)
        return out if last else None

    def _idle_forward(self) -> None:
        """A one-token forward without the cache: keeps the MoE alltoall in step with ranks that
        still decode (EP lockstep)."""
        emb = self.model.rotary_pos_emb.emb
        self.model.rotary_pos_emb.set_positions(None)
        recording = self._recording
        self._record(False)
        try:
            zeros = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self._forward(zeros, zeros, None, None)
        finally:
            self._record(recording)
            self.model.rotary_pos_emb.emb = emb

    def _sample(self, logits, batch: _Batch) -> tuple[list[int], list[float]]:
        """Sample on the last stage; (token, log-prob) per row broadcast to every stage."""
        shared = torch.empty((batch.size, 2), dtype=torch.float64, device=self.device)
        if logits is not None:
            logits = logits[:, -1].float()
            tokens = sample_tokens(logits, batch.params, batch.generators)
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
            shared[:, 0], shared[:, 1] = tokens, logprobs
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(shared, src=ps.get_pipeline_model_parallel_last_rank(),
                                        group=ps.get_pipeline_model_parallel_group())
        shared = shared.cpu()
        return shared[:, 0].long().tolist(), shared[:, 1].float().tolist()

    # --- routed experts -----------------------------------------------------------------------
    def _record(self, on: bool) -> None:
        self._recording = on
        for router in self.routers:
            router.router_replay.clear_indices()
            if on:
                router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
            else:
                router.router_replay.clear_router_replay_action()

    def _take_records(self, s: int, b: int) -> torch.Tensor:
        """This forward's selections [s, b, local MoE layers, k] (the router saw [s·b] tokens)."""
        k = self.args.moe_k
        picked = [r.router_replay.get_recorded_indices().view(s, b, k) for r in self.routers]
        for r in self.routers:
            r.router_replay.clear_indices()
        if not picked:
            return torch.zeros((s, b, 0, k), dtype=torch.int32)
        return torch.stack(picked, dim=2).to(device="cpu", dtype=torch.int32)

    def _gather_routed(self, batch: _Batch) -> list[torch.Tensor]:
        """Per row [tokens, all MoE layers, k]: each stage fills its layers, summed over PP."""
        if not batch.size:
            return []
        local = [batch.routed_experts(r) for r in range(batch.size)]
        lengths = [t.shape[0] for t in local]
        moe_layers = sum(self.args.moe_layer_pattern())
        full = torch.zeros((sum(lengths), moe_layers, self.args.moe_k), dtype=torch.int32)
        full[:, self._moe_slot] = torch.cat(local)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            full = full.to(self.device)
            torch.distributed.all_reduce(full, group=ps.get_pipeline_model_parallel_group())
            full = full.cpu()
        return list(torch.split(full, lengths))


# --- helpers --------------------------------------------------------------------------------
def _moe_slots(args: ErnieArgs, routers) -> list[int]:
    """Each local router's index among the model's MoE layers (router.layer_number is global)."""
    moe = [i for i in range(args.num_layers) if args.is_moe_layer(i)]
    return [moe.index(int(r.layer_number) - 1) for r in routers]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _max_over_world(value: int) -> int:
    if torch.distributed.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _same_in_group(prompts, params, group) -> bool:
    """Whether every rank of `group` passed the same requests (a checksum, compared by max/min)."""
    if torch.distributed.get_world_size(group) == 1:
        return True
    try:
        requests = params if isinstance(params, SamplingParams) else list(params)
        text = repr(([list(map(int, p)) for p in prompts], requests))
        crc = zlib.crc32(text.encode())
    except (TypeError, ValueError):  # unreadable requests: differ from everything (check_prompts names the fault)
        crc = -1 - torch.distributed.get_rank()
    t = torch.tensor([crc, -crc], dtype=torch.long, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return int(t[0]) == -int(t[1])
