"""`conversion.locate`: the one rule for what a checkpoint or model directory is (HF directory,
Megatron checkpoint, a training run's checkpoints root or run directory), with errors that name
the path and what was looked for."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_ernie.conversion.locate import LATEST, STATE_FILE, Located, locate, step_name
from megatron_ernie.errors import CheckpointError, UserError
from tests.helpers import TEST_DENSE, save_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny HF model with its tokenizer, and its conversion to a Megatron checkpoint."""
    from megatron_ernie.conversion.convert import hf_to_mcore
    from megatron_ernie.data.tokenizer import demo_tokenizer

    root = tmp_path_factory.mktemp("locate")
    hf = save_hf_model(TEST_DENSE, root / "hf_model")
    demo_tokenizer().save_pretrained(str(hf))
    hf_to_mcore(hf, root / "converted", progress=False)
    return hf, root / "converted"


def _fake_dist(path: Path, step: int | None = None, hf: bool = True) -> Path:
    """A directory with a dist checkpoint's marker files (what locate looks at); `step`: a
    training checkpoint's state file too."""
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (path / ".metadata").write_bytes(b"\x00")
    if hf:
        (path / "hf").mkdir()
        (path / "hf" / "config.json").write_text("{}")
    if step is not None:
        (path / STATE_FILE).write_text(json.dumps({"step": step, "consumed_samples": 0}))
    return path


def _run(root: Path, steps=(2, 4), latest: int | None = 4) -> Path:
    """A training run directory: `<root>/checkpoints/step_*` (complete) and `latest`."""
    ckpts = root / "checkpoints"
    for s in steps:
        _fake_dist(ckpts / step_name(s), step=s)
    if latest is not None:
        (ckpts / LATEST).write_text(step_name(latest) + "\n")
    return root


def test_an_hf_directory_is_its_own_assets(models):
    hf, _ = models
    found = locate(hf)
    assert found == Located("hf", hf, hf)
    assert found.config == hf / "config.json" and found.tokenizer == hf


def test_a_converted_checkpoint_has_its_assets_under_hf(models):
    hf, converted = models
    found = locate(converted)
    assert (found.kind, found.dir, found.assets) == ("mcore", converted, converted / "hf")
    assert found.config == converted / "hf" / "config.json"
    assert found.tokenizer == converted / "hf"  # hf_to_mcore carried the tokenizer over
    assert locate(converted, kind="mcore") == found and locate(hf, kind="hf").kind == "hf"
    with pytest.raises(CheckpointError, match=f"{converted}: a Megatron checkpoint, expected an HF model directory"):
        locate(converted, kind="hf")
    with pytest.raises(CheckpointError, match=f"{hf}: an HF model directory, expected a Megatron checkpoint"):
        locate(hf, kind="mcore")


def test_a_dist_checkpoint_without_assets(tmp_path):
    ckpt = _fake_dist(tmp_path / "ckpt", hf=False)
    found = locate(ckpt)
    assert found == Located("mcore", ckpt, None) and found.config is None and found.tokenizer is None


def test_a_run_and_its_checkpoints_root_resolve_to_the_checkpoint_latest_names(tmp_path):
    from megatron_ernie.training.checkpoint import CheckpointManager

    run = _run(tmp_path / "run", steps=(2, 4, 6), latest=4)  # e.g. pointed back by hand: the pointer wins
    root = run / "checkpoints"
    want = root / step_name(4)
    assert locate(root) == locate(run) == Located("mcore", want, want / "hf")
    assert CheckpointManager(root).latest() == want  # the rule resume uses
    (root / LATEST).write_text(step_name(8) + "\n")  # names nothing complete: the newest complete one
    assert locate(run).dir == root / step_name(6) == CheckpointManager(root).latest()
    (root / LATEST).unlink()
    assert locate(root).dir == root / step_name(6) == CheckpointManager(root).latest()


def test_only_published_checkpoints_count(tmp_path):
    from megatron_ernie.training.checkpoint import CheckpointManager

    run = _run(tmp_path / "run", steps=(2,), latest=2)
    root = run / "checkpoints"
    _fake_dist(root / f".{step_name(4)}.tmp-123-abcd1234", step=4)  # a save killed before its rename
    _fake_dist(root / step_name(6))  # no trainer_state.json: not a complete training checkpoint
    assert locate(run).dir == root / step_name(2) == CheckpointManager(root).latest()


def test_a_root_with_only_a_half_written_temporary_is_refused(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    temp = _fake_dist(root / f".{step_name(2)}.tmp-99-0123abcd", step=2)
    for path in (root, root.parent):
        with pytest.raises(CheckpointError, match=f"{root}: no complete training checkpoint") as e:
            locate(path)
        assert STATE_FILE in str(e.value)
    with pytest.raises(CheckpointError, match=f"{temp}: the hidden temporary of an unfinished save"):
        locate(temp)


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such directory"),
    (lambda p: (p.mkdir(), p)[1], "not a checkpoint: looked for an HF model directory \\(config.json\\), a Megatron "
                                  "dist checkpoint \\(metadata.json \\+ .metadata\\)"),
    (lambda p: (p.write_text("x"), p)[1], "not a directory"),
    (lambda p: (p.mkdir(), (p / "metadata.json").write_text("{}"), p)[2], "metadata.json without .metadata"),
])
def test_what_is_not_a_checkpoint_is_named(tmp_path, make, message):
    path = make(tmp_path / "thing")
    with pytest.raises(CheckpointError, match=f"{path}: {message}") as e:
        locate(path)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_converters_and_merging_take_a_training_run(models, tmp_path):
    """mcore_to_hf and merge_checkpoints accept what locate accepts: a run converts its latest."""
    from megatron_ernie.conversion.convert import mcore_to_hf
    from megatron_ernie.conversion.merge import MergeSpec, merge_checkpoints
    from tests.test_conversion import assert_same_hf_tensors

    hf, converted = models
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(converted, root / step_name(3))
    (root / step_name(3) / STATE_FILE).write_text(json.dumps({"step": 3, "consumed_samples": 0}))
    (root / LATEST).write_text(step_name(3) + "\n")
    mcore_to_hf(tmp_path / "run", tmp_path / "back", progress=False)
    assert assert_same_hf_tensors(hf, tmp_path / "back") > 0
    with pytest.raises(CheckpointError, match="different checkpoint formats"):
        merge_checkpoints(hf, tmp_path / "run", tmp_path / "merged", MergeSpec(groups=("attention",)), progress=False)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nowhere'}: no such directory"):
        mcore_to_hf(tmp_path / "nowhere", tmp_path / "out", progress=False)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out").exists()
