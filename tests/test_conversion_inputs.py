"""Conversion and merging without a model: bad inputs, atomic outputs, MTP, dtypes, expert merging."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ernie.conversion.cli import convert_main, merge_main
from megatron_ernie.conversion.convert import hf_to_mcore, mcore_to_hf
from megatron_ernie.conversion.mcore_format import McoreCheckpoint
from megatron_ernie.conversion.merge import MergeSpec, merge_checkpoints
from megatron_ernie.conversion.safetensors_io import CheckpointError, SafetensorsCheckpoint
from megatron_ernie.models.ernie import ConfigError
from tests.helpers import TEST_DENSE, TEST_MOE, save_hf_model
from tests.test_conversion import assert_same_hf_tensors

MOE = TEST_MOE.replace(moe_num_shared_experts=2)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """Two tiny MoE checkpoints of one shape (A, B), sharded with an index, and a dense one."""
    root = tmp_path_factory.mktemp("inputs")
    for name, seed in (("a", 1), ("b", 2)):
        model = __import__("tests.helpers", fromlist=["hf_model"]).hf_model(MOE, seed)
        model.save_pretrained(root / name, max_shard_size="300KB")
    save_hf_model(TEST_DENSE, root / "dense", seed=3)
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _untouched(out: Path, marker: bytes | None) -> None:
    """Output dir as before the failure (absent, or holding only our marker), no temp dirs left."""
    if marker is None:
        assert not out.exists()
    else:
        assert sorted(p.name for p in out.iterdir()) == ["marker"]
        assert (out / "marker").read_bytes() == marker
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


def _fails(src: Path, tmp_path: Path, match: str, with_existing_output: bool) -> None:
    out = tmp_path / "out"
    marker = None
    if with_existing_output:
        out.mkdir()
        marker = b"previous checkpoint"
        (out / "marker").write_bytes(marker)
    with pytest.raises((CheckpointError, ConfigError), match=match):
        hf_to_mcore(src, out, overwrite=with_existing_output, progress=False)
    _untouched(out, marker)


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", [False, True])
def test_missing_shard_is_named(hf_pair, tmp_path, existing):
    src = _copy(hf_pair / "a", tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    _fails(src, tmp_path, rf"{shard.name}: shard listed in model.safetensors.index.json is missing", existing)


@pytest.mark.parametrize("existing", [False, True])
def test_truncated_file_is_named(hf_pair, tmp_path, existing):
    src = _copy(hf_pair / "a", tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    _fails(src, tmp_path, rf"{shard.name}: truncated safetensors file: tensor '.+' ends at byte", existing)


def test_truncated_header_is_named(hf_pair, tmp_path):
    src = _copy(hf_pair / "a", tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    os.truncate(shard, 50)
    _fails(src, tmp_path, rf"{shard.name}: truncated or corrupt safetensors file", False)


def _rewrite_tensor(src: Path, name: str, fn) -> Path:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    tensors = fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


@pytest.mark.parametrize("existing", [False, True])
def test_shape_disagreeing_with_config_is_named(hf_pair, tmp_path, existing):
    src = _copy(hf_pair / "a", tmp_path / "src")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"

    def widen(t):
        t[name] = torch.zeros(t[name].shape[0] + 1, t[name].shape[1])
        return t

    shard = _rewrite_tensor(src, name, widen)
    _fails(src, tmp_path, rf"{shard.name}: tensor '{name}' has shape \(33, 64\), config.json implies \(32, 64\)", existing)


def test_unknown_tensor_is_listed_not_dropped(hf_pair, tmp_path):
    src = _copy(hf_pair / "a", tmp_path / "src")
    name = "model.layers.0.mlp.gate_proj.weight"

    def add(t):
        t["model.layers.0.mlp.mystery.weight"] = torch.zeros(2, 2)
        t["model.extra_head.weight"] = torch.zeros(2)
        return t

    _rewrite_tensor(src, name, add)
    _fails(src, tmp_path, r"2 tensors are not part of .*'model.extra_head.weight', 'model.layers.0.mlp.mystery.weight'", False)


@pytest.mark.parametrize("model_type", ["llama", "ernie4_5_vl_moe"])
def test_unhandled_family_is_refused(hf_pair, tmp_path, model_type):
    src = _copy(hf_pair / "a", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = model_type
    (src / "config.json").write_text(json.dumps(cfg))
    _fails(src, tmp_path, rf"config.json: model_type '{model_type}' is not an ERNIE 4.5 text model", True)


def test_mcore_checkpoint_of_another_model_is_refused(hf_pair, tmp_path):
    hf_to_mcore(hf_pair / "dense", tmp_path / "mc", progress=False)
    with pytest.raises(CheckpointError, match=r"tensors of .* are missing from the checkpoint: .*'decoder.layers.1.mlp.router.weight'"):
        mcore_to_hf(tmp_path / "mc", tmp_path / "out", config=hf_pair / "a" / "config.json", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_in_one_line(hf_pair, tmp_path, capsys):
    rc = convert_main(["hf-to-mcore", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_interrupted_conversion_leaves_no_complete_looking_checkpoint(hf_pair, tmp_path):
    """kill -9 in the middle of writing: only a hidden temporary directory remains."""
    out = tmp_path / "mc"
    script = f"""
import megatron_ernie.conversion.safetensors_io as io
from megatron_ernie.conversion.convert import hf_to_mcore
real, n = io.read_tensor, [0]
def slow(entry):
    n[0] += 1
    if n[0] == 40:
        print("HALFWAY", flush=True)
        time.sleep(60)
    return real(entry)
io.read_tensor = slow
if __name__ == "__main__":
    hf_to_mcore({str(hf_pair / 'a')!r}, {str(out)!r}, progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "HALFWAY"
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".mc.tmp-")]
        assert len(leftovers) == 1 and any(leftovers[0].glob("*.distcp"))  # data was being written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    with pytest.raises(CheckpointError, match="not a Megatron-Core dist checkpoint"):
        McoreCheckpoint(leftovers[0])  # metadata is written last


# --- MTP layers, dtypes --------------------------------------------------------------------------
def test_mtp_layer_round_trips_bit_exact(hf_pair, tmp_path):
    """The 300B's MTP tensors (model.mtp_*) map to Megatron's mtp.layers.* and back."""
    src = _copy(hf_pair / "b", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    tensors = {}
    g = torch.Generator().manual_seed(0)
    h = MOE.hidden_size
    ck = SafetensorsCheckpoint(src)
    for name in ck.keys():  # MTP block 0 follows ERNIE's layer rule for index 0: a dense layer
        if name.startswith("model.layers.0."):
            tensors["model.mtp_block.0." + name[len("model.layers.0."):]] = torch.randn(ck.entries[name].shape, generator=g)
    tensors["model.mtp_emb_norm.0.weight"] = torch.randn(h, generator=g)
    tensors["model.mtp_hidden_norm.0.weight"] = torch.randn(h, generator=g)
    tensors["model.mtp_linear_proj.0.weight"] = torch.randn(h, 2 * h, generator=g)
    save_file(tensors, src / "mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "mtp.safetensors" for k in tensors})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))

    hf_to_mcore(src, tmp_path / "mc", progress=False)
    keys = McoreCheckpoint(tmp_path / "mc").tensors
    assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
            "mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight",
            "mtp.layers.0.transformer_layer.mlp.linear_fc1.layer_norm_weight"} <= set(keys)
    mcore_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    assert assert_same_hf_tensors(src, tmp_path / "back") == len(ck.keys()) + len(tensors)


def test_dtype_cast_both_ways(hf_pair, tmp_path):
    hf_to_mcore(hf_pair / "a", tmp_path / "mc", dtype="bf16", progress=False)
    ck = McoreCheckpoint(tmp_path / "mc")
    assert {ck.dtype(k) for k in ck.tensors} == {torch.bfloat16}
    mcore_to_hf(tmp_path / "mc", tmp_path / "fp32", dtype="fp32", progress=False)
    src, back = SafetensorsCheckpoint(hf_pair / "a"), SafetensorsCheckpoint(tmp_path / "fp32")
    for name in src.keys():
        assert torch.equal(back.get(name), src.get(name).to(torch.bfloat16).float()), name
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


# --- expert merging -----------------------------------------------------------------------------
def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    ck = SafetensorsCheckpoint(path)
    return {k: ck.get(k).clone() for k in ck.keys()}


def test_merge_takes_experts_of_chosen_layers_exactly(hf_pair, tmp_path, capsys):
    rc = merge_main(["--a", str(hf_pair / "a"), "--b", str(hf_pair / "b"), "--out", str(tmp_path / "m"),
                     "--groups", "experts,bias", "--layers", "2-3", "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "experts" in table and "bias" in table and "2-3" in table
    a, b, m = _hf_tensors(hf_pair / "a"), _hf_tensors(hf_pair / "b"), _hf_tensors(tmp_path / "m")
    taken = [k for k in m if (".mlp.experts." in k or "e_score_correction_bias" in k)
             and k.startswith(("model.layers.2.", "model.layers.3."))]
    assert len(taken) == 2 * (MOE.num_experts * 3 + 1)
    for k in m:
        want = a[k] if k in taken else b[k]
        assert torch.equal(m[k], want), k
        if k not in taken:
            assert not torch.equal(m[k], a[k]) or k.endswith("norm.weight"), k  # B really differs from A
    assert (tmp_path / "m" / "config.json").read_text() == (hf_pair / "b" / "config.json").read_text()


def test_merge_interpolates_exactly_and_selects_expert_rows(hf_pair, tmp_path):
    spec = MergeSpec(groups=("experts", "router"), experts=(1, 5), alpha=0.25)
    report = merge_checkpoints(hf_pair / "a", hf_pair / "b", tmp_path / "m", spec, progress=False)
    a, b, m = _hf_tensors(hf_pair / "a"), _hf_tensors(hf_pair / "b"), _hf_tensors(tmp_path / "m")
    changed = 0
    for k in m:
        if ".mlp.experts.1." in k or ".mlp.experts.5." in k:
            assert torch.equal(m[k], torch.lerp(b[k].float(), a[k].float(), 0.25).to(b[k].dtype)), k
            changed += 1
        elif k.endswith("mlp.gate.weight"):
            rows = torch.zeros(MOE.num_experts, dtype=torch.bool)
            rows[[1, 5]] = True
            assert torch.equal(m[k][rows], torch.lerp(b[k].float(), a[k].float(), 0.25)[rows].to(b[k].dtype))
            assert torch.equal(m[k][~rows], b[k][~rows])
        else:
            assert torch.equal(m[k], b[k]), k
    assert changed == 3 * 2 * 3  # 3 MoE layers x 2 experts x (gate, up, down)
    assert "B+0.25(A-B) (expert rows)" in report.table()


def test_merge_alpha_one_is_a_and_zero_is_b(hf_pair, tmp_path):
    for alpha, want in ((1.0, "a"), (0.0, "b")):
        out = tmp_path / f"m{alpha}"
        merge_checkpoints(hf_pair / "a", hf_pair / "b", out, MergeSpec(alpha=alpha), progress=False)
        got, ref = _hf_tensors(out), _hf_tensors(hf_pair / want)
        assert all(torch.equal(got[k], ref[k]) for k in got if ".mlp.experts." in k)


def test_merge_on_megatron_checkpoints_matches_hf_merge(hf_pair, tmp_path):
    for name in ("a", "b"):
        hf_to_mcore(hf_pair / name, tmp_path / f"{name}_mc", progress=False)
    spec = MergeSpec(groups=("experts", "router", "bias"), layers=(1, 2), experts=(0, 7), alpha=0.5)
    merge_checkpoints(tmp_path / "a_mc", tmp_path / "b_mc", tmp_path / "m_mc", spec, progress=False)
    merge_checkpoints(hf_pair / "a", hf_pair / "b", tmp_path / "m_hf", spec, progress=False)
    mcore_to_hf(tmp_path / "m_mc", tmp_path / "m_mc_hf", progress=False)
    assert_same_hf_tensors(tmp_path / "m_hf", tmp_path / "m_mc_hf")
    assert not torch.equal(_hf_tensors(tmp_path / "m_hf")["model.layers.1.mlp.experts.0.up_proj.weight"],
                           _hf_tensors(hf_pair / "b")["model.layers.1.mlp.experts.0.up_proj.weight"])


def test_merge_refuses_mismatched_models(hf_pair, tmp_path):
    with pytest.raises(CheckpointError, match="different models, refusing to merge: .*hidden_size|different models"):
        merge_checkpoints(hf_pair / "dense", hf_pair / "b", tmp_path / "m", MergeSpec(), progress=False)
    other = _copy(hf_pair / "a", tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["moe_k"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"moe_k: 3 vs 2"):
        merge_checkpoints(other, hf_pair / "b", tmp_path / "m", MergeSpec(), progress=False)
    with pytest.raises(CheckpointError, match="expert pool 'vision' does not exist"):
        MergeSpec(expert_pool="vision")
    with pytest.raises(CheckpointError, match="matched no tensor"):
        merge_checkpoints(hf_pair / "a", hf_pair / "b", tmp_path / "m", MergeSpec(layers=(0, 0)), progress=False)
    assert not (tmp_path / "m").exists()


def test_cli_converts_both_ways(hf_pair, tmp_path, capsys):
    src = _copy(hf_pair / "a", tmp_path / "src")
    assets = {"tokenizer.model": b"\x00sentencepiece bytes\xff", "tokenizer_config.json": b'{"chat_template": "{{ x }}"}',
              "special_tokens_map.json": b"{}"}
    for name, data in assets.items():
        (src / name).write_bytes(data)
    assert convert_main(["hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "mc"), "--tp", "2",
                         "--ep", "2", "--no-progress"]) == 0
    assert convert_main(["mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "hf"),
                         "--max-shard-size", "200KB", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert_same_hf_tensors(src, tmp_path / "hf")
    for name, data in assets.items():  # tokenizer files travel with the weights, both ways
        assert (tmp_path / "mc" / "hf" / name).read_bytes() == data
        assert (tmp_path / "hf" / name).read_bytes() == data
    assert json.loads((tmp_path / "mc" / "megatron_ernie.json").read_text())["layout_checked"] == {"tp": 2, "pp": 1, "ep": 2}
    # a layout the model cannot take is refused before anything is written
    assert convert_main(["hf-to-mcore", "--hf", str(hf_pair / "a"), "--out", str(tmp_path / "bad"), "--ep", "3",
                         "--no-progress"]) == 2
    assert "EP=3" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_prefetch_keeps_order_bounds_memory_and_reraises():
    from megatron_ernie.conversion.prefetch import prefetch

    ahead = []

    def produce():
        for i in range(20):
            ahead.append(i)
            yield torch.full((i + 1,), float(i))

    seen, budget = [], 3 * 4 * 20
    for t in prefetch(produce(), size_of=lambda t: t.nbytes, max_bytes=budget):
        seen.append(int(t[0]))
        # items produced and not yet consumed (the newest may be waiting for room) fit the budget
        queued = sum(4 * (j + 1) for j in range(seen[-1] + 1, ahead[-1]))
        assert queued <= budget
    assert seen == list(range(20))

    def broken():
        yield torch.zeros(1)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(broken(), size_of=lambda t: t.nbytes))


def test_megatron_stacked_layer_checkpoint_exports_bit_exact(hf_pair, world1, tmp_path):
    """Megatron-Core's own default for models of identical layers (dense): every layer's tensor is
    one slice of a leading layer axis (`decoder.layers.self_attention.linear_qkv.weight`)."""
    from megatron.core import dist_checkpointing

    from megatron_ernie.conversion.mcore_format import sync_save_strategy
    from megatron_ernie.conversion.mcore_model import load_model_checkpoint
    from megatron_ernie.models.ernie import from_hf_config, to_hf_config
    from megatron_ernie.models.ernie.model import build_model
    from megatron_ernie.runtime import ParallelLayout, initialize

    args = from_hf_config(hf_pair / "dense")
    hf_to_mcore(hf_pair / "dense", tmp_path / "mc", progress=False)
    initialize(ParallelLayout(), args, environ={"RANK": "0", "WORLD_SIZE": "1"})
    model = build_model(args)
    load_model_checkpoint(model, tmp_path / "mc")
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(stacked), sharded_strategy=sync_save_strategy())
    (stacked / "hf").mkdir()
    (stacked / "hf" / "config.json").write_text(json.dumps(to_hf_config(args)))
    keys = McoreCheckpoint(stacked).tensors
    assert "decoder.layers.self_attention.linear_qkv.weight" in keys
    assert keys["decoder.layers.self_attention.linear_qkv.weight"].size[0] == args.num_layers
    mcore_to_hf(stacked, tmp_path / "back", progress=False)
    assert_same_hf_tensors(hf_pair / "dense", tmp_path / "back")
