"""What a checkpoint or model directory is: the one place that decides.

`locate(path)` accepts, in this order:
- a Megatron-Core dist checkpoint (`metadata.json` + `.metadata`): a training checkpoint
  (`step_NNNNNNNN/`) or a converted one (`hf_to_mcore`, `merge_experts`);
- a Hugging Face model directory (`config.json`);
- a training run's checkpoints root (`<out_dir>/checkpoints/`: a `latest` pointer and/or
  `step_NNNNNNNN/` directories) or the run directory holding it: its latest complete checkpoint.

A training checkpoint is complete when it is published under its `step_` name with its
`trainer_state.json`; saves are written in hidden temporaries (`.step_…tmp-…`), which never count.
The root's latest is the checkpoint `latest` names, else the newest complete one (what
`training/checkpoint.py` resumes from; it takes these rules from here).

`Located.assets` is where the model's config.json and tokenizer live: the HF directory itself,
or the checkpoint's `hf/` (written by training saves and by `hf_to_mcore`), or None.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_ernie.errors import CheckpointError
from megatron_ernie.runtime.atomic import TMP_MARK

ASSETS = "hf"                      # inside a Megatron checkpoint: config.json, tokenizer, templates
LATEST = "latest"                  # in a checkpoints root: the name of the newest complete checkpoint
STATE_FILE = "trainer_state.json"  # in a training checkpoint: written last, marks it complete
STEP_DIR = re.compile(r"^step_(\d{8})$")
CHECKPOINTS = "checkpoints"        # a run directory's checkpoints root
DIST_FILES = ("metadata.json", ".metadata")
HF_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

Kind = Literal["hf", "mcore"]
_WHAT = {"hf": "an HF model directory", "mcore": "a Megatron checkpoint"}


@dataclass(frozen=True)
class Located:
    kind: Kind
    dir: Path             # the HF directory, or the Megatron checkpoint (a run's: its latest complete one)
    assets: Path | None   # config.json / tokenizer: the HF directory itself, or <checkpoint>/hf

    @property
    def config(self) -> Path | None:
        """The model's HF config.json, when there is one."""
        path = self.assets / HF_CONFIG if self.assets else None
        return path if path and path.is_file() else None

    @property
    def tokenizer(self) -> Path | None:
        """The directory to load the model's own tokenizer from, when it has one."""
        return self.assets if self.assets and (self.assets / TOKENIZER_CONFIG).is_file() else None


def step_name(step: int) -> str:
    """The directory name of the training checkpoint of `step`."""
    return f"step_{step:08d}"


def is_dist_checkpoint(path: Path) -> bool:
    return all((path / name).exists() for name in DIST_FILES)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The published training checkpoints under `root`, oldest first (hidden temporaries are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` names (when it is complete), else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / STATE_FILE).exists():
            return path
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _is_checkpoints_root(path: Path) -> bool:
    """A `latest` pointer, a step directory, or only the temporaries of saves that never finished."""
    return (path / LATEST).exists() or any(STEP_DIR.match(p.name) or _is_save_temporary(p) for p in path.iterdir())


def _is_save_temporary(path: Path) -> bool:
    return _is_temporary(path) and path.name.startswith((".step_", f".{LATEST}"))


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name


def locate(path: str | Path, kind: Kind | None = None) -> Located:
    """What `path` is (see the module docstring); `kind` refuses the other kind. Raises
    CheckpointError naming the path and what was looked for."""
    path = Path(path)
    found = _locate(path)
    if kind is not None and found.kind != kind:
        raise CheckpointError(f"{path}: {_WHAT[found.kind]}, expected {_WHAT[kind]}")
    return found


def _locate(path: Path) -> Located:
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected an HF model directory, a Megatron checkpoint "
                              "or a training run)")
    if _is_temporary(path):
        raise CheckpointError(f"{path}: the hidden temporary of an unfinished save or conversion, not a checkpoint")
    if is_dist_checkpoint(path):
        return Located("mcore", path, path / ASSETS if (path / ASSETS).is_dir() else None)
    if (path / "metadata.json").exists():
        raise CheckpointError(f"{path}: metadata.json without .metadata, not a complete Megatron dist checkpoint")
    if (path / HF_CONFIG).is_file():
        return Located("hf", path, path)
    for root in (path, path / CHECKPOINTS):
        if root.is_dir() and _is_checkpoints_root(root):
            latest = latest_checkpoint(root)
            if latest is None:
                raise CheckpointError(f"{root}: no complete training checkpoint (a step_NNNNNNNN/ directory with "
                                      f"{STATE_FILE}; hidden temporaries of unfinished saves do not count)")
            return _locate(latest)
    raise CheckpointError(
        f"{path}: not a checkpoint: looked for an HF model directory ({HF_CONFIG}), a Megatron dist checkpoint "
        f"({' + '.join(DIST_FILES)}) and a training run's checkpoints ({LATEST} or step_NNNNNNNN/ with "
        f"{STATE_FILE}, here or under {CHECKPOINTS}/)")


__all__ = ["ASSETS", "LATEST", "STATE_FILE", "STEP_DIR", "Located", "complete_checkpoints", "is_dist_checkpoint",
           "latest_checkpoint", "locate", "step_name"]
