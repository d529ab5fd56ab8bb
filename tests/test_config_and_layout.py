"""Presets, HF config.json translation, layout validation and launch-variable parsing."""
from __future__ import annotations


import pytest

from megatron_ernie.models.ernie import PRESETS, ConfigError, from_hf_config, preset, to_hf_config
from megatron_ernie.runtime import LayoutError, ParallelLayout, initialize, launch_env
from tests.helpers import TEST_DENSE, TEST_MOE


@pytest.mark.parametrize("name,total,active", [
    ("ernie45_0.3b", (0.30e9, 0.40e9), (0.30e9, 0.40e9)),
    ("ernie45_21b_a3b", (20.5e9, 22.5e9), (2.8e9, 3.6e9)),
    ("ernie45_300b_a47b", (295e9, 305e9), (46e9, 49e9)),
])
def test_published_presets_have_their_advertised_size(name, total, active):
    n_total, n_active = preset(name).parameter_counts()
    assert total[0] <= n_total <= total[1]
    assert active[0] <= n_active <= active[1]


def test_moe_layer_rule_matches_published_layouts():
    assert preset("ernie45_21b_a3b").moe_layer_pattern() == [0] + [1] * 27
    assert preset("ernie45_300b_a47b").moe_layer_pattern() == [0, 0, 0] + [1] * 51
    assert TEST_MOE.replace(moe_layer_interval=2).moe_layer_pattern() == [0, 1, 0, 1]
    assert preset("ernie45_0.3b").moe_layer_pattern() == [0] * 18


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    args = PRESETS[name]
    assert from_hf_config(to_hf_config(args), name=name) == args


def test_hf_config_accepts_transformers_saved_files(tmp_path):
    from tests.helpers import save_hf_model

    save_hf_model(TEST_MOE, tmp_path)
    assert from_hf_config(tmp_path, name=TEST_MOE.name) == TEST_MOE


def test_unknown_hf_fields_are_named():
    cfg = dict(to_hf_config(TEST_MOE), moe_fancy_routing=True, zzz=1)
    with pytest.raises(ConfigError, match=r"\['moe_fancy_routing', 'zzz'\]"):
        from_hf_config(cfg)
    with pytest.warns(UserWarning, match="moe_fancy_routing"):
        assert from_hf_config(cfg, name=TEST_MOE.name, strict=False) == TEST_MOE


@pytest.mark.parametrize("change,message", [
    ({"use_bias": True}, "use_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "llama"}, "not an ERNIE 4.5 text model"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling"),
    ({"moe_k": 9}, "moe_k=9"),
])
def test_unsupported_hf_values_are_rejected(change, message):
    with pytest.raises(ConfigError, match=message):
        from_hf_config(dict(to_hf_config(TEST_MOE), **change))


def test_bad_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        from_hf_config(tmp_path / "missing.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{bad}: not valid JSON"):
        from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        preset("nope")


@pytest.mark.parametrize("args,layout,world,message", [
    (TEST_MOE, ParallelLayout(tp=3, sequence_parallel=True), 3, "num_attention_heads=4 is not divisible by TP=3"),
    (TEST_DENSE, ParallelLayout(tp=4), 4, r"num_key_value_heads \(query groups\)=2 is not divisible by TP=4"),
    (TEST_MOE, ParallelLayout(ep=3), 3, "num_experts=8 is not divisible by EP=3"),
    (TEST_DENSE, ParallelLayout(pp=3), 3, "num_layers=4 is not divisible by PP=3"),
    (TEST_DENSE, ParallelLayout(tp=2), 3, r"world size 3 is not a multiple of TP×PP×CP = 2×1×1 = 2"),
    (TEST_MOE, ParallelLayout(tp=2, ep=2, sequence_parallel=True), 2, r"world size 2 is not a multiple of ETP×EP×PP = 2×2×1 = 4"),
    (TEST_MOE, ParallelLayout(tp=2), 2, "needs sequence_parallel=True"),
    (TEST_DENSE, ParallelLayout(ep=2), 2, "EP=2 needs a MoE model"),
    (TEST_DENSE, ParallelLayout(sequence_parallel=True), 1, "sequence_parallel=True needs TP > 1"),
])
def test_bad_layouts_name_the_constraint(args, layout, world, message):
    with pytest.raises(LayoutError, match=message):
        layout.validate(args, world)


def test_initialize_validates_before_touching_the_network():
    """A bad layout fails at once: no process group is created, nothing waits for peers."""
    import torch

    env = {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    was = torch.distributed.is_initialized()
    with pytest.raises(LayoutError, match="num_layers=4 is not divisible by PP=3"):
        initialize(ParallelLayout(pp=3), TEST_DENSE, environ=env)
    assert torch.distributed.is_initialized() == was


def test_good_layouts_pass():
    ParallelLayout(tp=2, ep=2, sequence_parallel=True, distributed_optimizer=True).validate(TEST_MOE, 8)
    ParallelLayout(tp=8, pp=6, ep=8, sequence_parallel=True).validate(preset("ernie45_300b_a47b"), 384)


def test_launch_env_from_torchrun_slurm_or_nothing():
    assert launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                       "MASTER_PORT": "1234"}) == (3, 8, 1, "n1", 1234)
    slurm = launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank) == (5, 16, 5)
    # torchrun inside an sbatch allocation: torchrun's variables win
    both = launch_env({"RANK": "2", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (both.rank, both.world_size) == (2, 4)
    assert launch_env({})[:3] == (0, 1, 0)
