"""Megatron-Core `dist_checkpointing` checkpoints (torch_dist backend), streamed.

The format is PyTorch Distributed Checkpoint (DCP): `.metadata` lists every tensor by its
Megatron *sharded key* with its global shape and the chunks stored (offsets, sizes, file and
byte range); `*.distcp` files hold the chunks; `common.pt` holds the non-sharded state and
`metadata.json` names the backend. Storage is independent of the parallel layout: a loader at
any TP/PP/EP asks for the slices it owns and DCP reads the overlapping chunks.

Two things the stock writers cannot do, and why this module exists:
- write without holding the model: chunks are produced on demand (`resolve_data`) and written in
  plan order, one at a time (torch's FileSystemWriter keeps every tensor of a file referenced
  until the file closes, and Megatron's async writer stages a whole rank's state);
- read one layer at a time (`McoreCheckpoint.load`), whatever layout wrote the chunks.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ernie.conversion.locate import is_dist_checkpoint
from megatron_ernie.conversion.prefetch import prefetch
from megatron_ernie.conversion.safetensors_io import CheckpointError, WriteBehind, nbytes

METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}
COMMON_FILE = "common.pt"


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a global tensor: `fetch()` produces it when the writer gets to it."""
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    fetch: Callable[[], torch.Tensor] = field(compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


class _LazySavePlanner(DefaultSavePlanner):
    """Plans the given chunks (no state dict in memory) and fetches each only when written."""

    def __init__(self, chunks: Sequence[Chunk]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, dedup_save_to_lowest_rank=False)
        self._chunks = {MetadataIndex(c.key, torch.Size(c.offsets)): c for c in chunks}
        self._order = list(chunks)

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.shape)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for c in self._order
        ]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        chunk = self._chunks[MetadataIndex(write_item.index.fqn, write_item.index.offset)]
        t = chunk.fetch()
        if tuple(t.shape) != chunk.shape or t.dtype != chunk.dtype:
            raise CheckpointError(
                f"chunk {chunk.key}@{chunk.offsets}: produced {t.dtype} {tuple(t.shape)}, planned {chunk.dtype} {chunk.shape}"
            )
        t = t.detach().contiguous()
        if t.untyped_storage().nbytes() != t.nbytes:  # torch.save writes whole storages
            t = t.clone()
        return t


class _StreamingWriter(FileSystemWriter):
    """Writes items in plan order into files of about `max_file_bytes`, dropping each after use."""

    def __init__(self, path: Path, max_file_bytes: int, on_item: Callable[[Chunk], None] | None = None,
                 chunks: Mapping[MetadataIndex, Chunk] | None = None):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self.max_file_bytes = max_file_bytes
        self.on_item = on_item
        self.chunks = chunks or {}

    def write_data(self, plan: SavePlan, planner) -> torch.futures.Future:
        from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, SerializationFormat, _item_size, _write_item

        results, buckets, size = [], [[]], 0
        for item in plan.items:
            if buckets[-1] and size + _item_size(item) > self.max_file_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(item)
            size += _item_size(item)
        # chunks are produced (read, fused, cast) in a thread ahead of the writes, in plan order
        produced = prefetch(((item, planner.resolve_data(item)) for b in buckets for item in b),
                            size_of=lambda pair: pair[1].nbytes)
        for n, items in enumerate(buckets):
            name = f"{plan.storage_data.prefix}{n}{DEFAULT_SUFFIX}"
            with open(Path(self.path) / name, "wb", buffering=0) as stream:  # buffered: 3x slower
                behind = WriteBehind(stream)
                for expected in items:
                    item, data = next(produced)
                    assert item is expected
                    start = stream.tell()
                    results.append(_write_item(self.transforms, stream, data, item, name, SerializationFormat.TORCH_SAVE))
                    behind.advance(start)
                    del data
                    if self.on_item:
                        self.on_item(self.chunks.get(MetadataIndex(item.index.fqn, item.index.offset)))
                os.fsync(stream.fileno())
        produced.close()
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(results)
        return fut


def write_checkpoint(root: Path, chunks: Sequence[Chunk], common: dict | None = None,
                     max_file_bytes: int = 4 * 1024**3, on_item: Callable[[Chunk], None] | None = None) -> None:
    """Write a torch_dist checkpoint of `chunks` into the (empty, temporary) directory `root`."""
    index = {MetadataIndex(c.key, torch.Size(c.offsets)): c for c in chunks}
    if len(index) != len(chunks):
        raise CheckpointError("two chunks share a key and offset")
    writer = _StreamingWriter(root, max_file_bytes, on_item, index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving as a single process" is expected
        try:
            dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks), no_dist=True)
        except CheckpointException as e:  # DCP wraps what our fetch raised: surface it
            raise _first_failure(e) from None
    torch.save(common or {}, root / COMMON_FILE)
    (root / "metadata.json").write_text(json.dumps(METADATA_JSON))


def _first_failure(e: Exception) -> Exception:
    for failure in getattr(e, "failures", {}).values():
        inner = getattr(failure, "exc", failure)
        if isinstance(inner, Exception):
            return inner
    return e


class _CachedReader(FileSystemReader):
    """Reads `.metadata` once per checkpoint, not once per load call."""

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_metadata_cache"):
            self._metadata_cache = super().read_metadata(*args, **kwargs)
        return self._metadata_cache


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Loads boxes of global tensors into given targets (DCP's resharding reads the overlaps)."""

    def __init__(self, regions: Sequence[tuple[str, tuple[int, ...], tuple[int, ...], torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions
        self.targets = {(k, tuple(o)): t for k, o, _, t in regions}

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, offsets, sizes, _ in self.regions:
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        self.plan = LoadPlan(items)
        return self.plan

    def resolve_tensor(self, read_item):
        target = self.targets[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # written in place


class McoreCheckpoint:
    """Read access to a torch_dist checkpoint written by us or by Megatron-Core at any layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_json = self.root / "metadata.json"
        if not is_dist_checkpoint(self.root):
            raise CheckpointError(f"{self.root}: not a Megatron-Core dist checkpoint (no metadata.json / .metadata)")
        backend = json.loads(meta_json.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise CheckpointError(f"{meta_json}: sharded_backend {backend!r} is not supported (only torch_dist)")
        self._reader = _CachedReader(str(self.root))
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as e:  # noqa: BLE001 - name the file whatever torch raised
            raise CheckpointError(f"{self.root / '.metadata'}: unreadable ({e})") from None
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Full global tensors for `keys`, assembled from whatever chunks the writer stored."""
        keys = list(keys)
        tensors = self.load_regions([(k, (0,) * len(self.shape(k)), self.shape(k)) for k in self._known(keys)])
        return dict(zip(keys, tensors))

    def _known(self, keys: list[str]) -> list[str]:
        missing = [k for k in keys if k not in self.tensors]
        if missing:
            raise CheckpointError(f"{self.root}: tensors missing from the checkpoint: {missing[:5]}")
        return keys

    def load_regions(self, regions: Sequence[tuple[str, Sequence[int], Sequence[int]]]) -> list[torch.Tensor]:
        """Boxes (key, offsets, sizes) of global tensors, e.g. one expert of a stacked tensor:
        only the chunks overlapping each box are read."""
        self._known([k for k, _, _ in regions])
        targets = [torch.empty(tuple(sizes), dtype=self.dtype(k)) for k, _, sizes in regions]
        planner = _RegionLoadPlanner([(k, tuple(o), tuple(sz), t) for (k, o, sz), t in zip(regions, targets)])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no process group: loading in a single process" is expected
                dcp.load({}, storage_reader=self._reader, planner=planner, no_dist=True)
        except Exception as e:  # noqa: BLE001
            e = _first_failure(e)
            names = [k for k, _, _ in regions]
            raise CheckpointError(f"{self.root}: reading {names[:3]}{'...' if len(names) > 3 else ''} failed: {e}") from None
        return targets



def sync_save_strategy():
    """Megatron-Core's torch_dist save, written synchronously by this process.

    The stock strategy stages every tensor and writes from forked workers that report through a
    spawned `multiprocessing.Manager`; a run killed with SIGKILL leaves those helper processes
    behind (holding its stdout/stderr). Same format, same planner, no helper processes.
    """
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir: Path):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt_state = mcore_to_pyt_state_dict(state, False)
            planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False)
            # one process: plan locally, nothing to gather
            alone = not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's ShardedTensor deprecation
                warnings.simplefilter("ignore", UserWarning)  # "no_dist: saving in a single process"
                dcp.save(pyt_state, storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                         planner=planner, no_dist=alone)

    return SyncTorchDistSaveStrategy("torch_dist", 1)
