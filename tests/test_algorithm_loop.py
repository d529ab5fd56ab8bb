"""The generalised loop with several roles: a trainable policy, a frozen reference used in a
forward-only prepare step (per-token log-probs, vocab-parallel), a trainable value model, several
updates per step. Same losses at TP=2 / PP=2 / EP=2 as on one process; a kill -9 resumes bit-exact
with every role's state; the reference never moves."""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch

from megatron_ernie.algorithms import sft
from megatron_ernie.models.ernie.hf_adapter import REWARD_HEAD
from megatron_ernie.training.algorithm import Algorithm, Role, Update, microbatches
from megatron_ernie.training.step import LOSS_KEY
from tests.helpers import TEST_MOE, save_hf_model, spawn

BETA = 0.5
QUICK = ["recipe=sft", "data.seq_length=64", "train.global_batch_size=4", "train.micro_batch_size=1",
         "optim.lr=1e-3", "optim.warmup_steps=0", "optim.eps=1e-6", "train.steps=4", "checkpoint.interval=2"]


def kl_nll_loss(batch, output):
    """Token NLL + β·k3(π, π_ref) on the loss mask; reports the KL."""
    mask = batch["loss_mask"].float()
    logp = -output.float()
    log_ratio = batch["ref_logprobs"] - logp
    k3 = torch.exp(log_ratio) - log_ratio - 1
    loss = ((output.float() + BETA * k3) * mask).sum()
    n = mask.sum()
    return loss, n.to(torch.int), {LOSS_KEY: torch.stack([loss.detach(), n]),
                                   "kl": torch.stack([(k3.detach() * mask).sum(), n])}


def value_loss(batch, output):
    """Values regress to 1 on trained tokens, 0 elsewhere (mean squared error per token)."""
    values = output[..., 0].float()
    err = ((values - batch["loss_mask"].float()) ** 2).sum()
    n = torch.tensor(float(values.numel()))
    return err, n.to(torch.int), {LOSS_KEY: torch.stack([err.detach(), n])}


def _step(loss_fn, data_iterator, model, labels=True):
    batch = next(data_iterator)
    out = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                **({"labels": batch["labels"]} if labels else {}))
    return out, partial(loss_fn, batch)


class KLRegularisedSFT(Algorithm):
    name = "kl_sft"
    roles = (Role("policy"), Role("reference", trainable=False), Role("critic", head="scalar", keep_init=(REWARD_HEAD,)))
    mini_batches = 2  # two policy updates per step, each on the same global samples at every DP size
    curves = ("kl",)

    def build_tokenizer(self, cfg):
        return sft.build_tokenizer(cfg)

    def build_dataset(self, cfg, tokenizer):
        return sft.build_dataset(cfg, tokenizer)

    def microbatch(self, items):
        return sft.microbatch(items)

    def prepare(self, batch, run):
        from megatron_ernie.training.forward import per_token

        self.run = run
        micro = microbatches(batch, 1, self.microbatch)
        ref = per_token(run.models["reference"].chunks, micro, what="logprobs", seq_length=run.cfg.data.seq_length)
        if run.step == 1:  # the policy starts as the reference: same log-probs, bit for bit
            mine = per_token(run.models["policy"].chunks, micro, what="logprobs", seq_length=run.cfg.data.seq_length)
            self.start_gap = max((float((a - b).abs().max()) for a, b in zip(ref, mine)), default=None)
        if not ref:  # not the last pipeline stage: the loss never runs here
            return batch
        return [dict(item, ref_logprobs=lp[0]) for item, lp in zip(batch, ref)]

    def updates(self, batch, run):
        seq, half = run.cfg.data.seq_length, len(batch) // 2
        mb = partial(microbatches, size=1, make_batch=self.microbatch)
        return [Update("policy", mb(batch[:half]), 1, seq), Update("policy", mb(batch[half:]), 1, seq),
                Update("critic", mb(batch), 1, seq)]

    def forward_step(self, role):
        return partial(_step, kl_nll_loss) if role == "policy" else partial(_step, value_loss, labels=False)

    def report_keys(self, role):
        return (LOSS_KEY, "kl") if role == "policy" else (LOSS_KEY,)


def _train(rank, world, overrides, out: Path, fault: str | None = None):
    from megatron_ernie.training.config import compose
    from megatron_ernie.training.loop import run

    if fault:
        os.environ["MEGATRON_ERNIE_FAULT"] = fault
    cfg = compose([*QUICK, *overrides, f"out_dir={out}"])
    algorithm = KLRegularisedSFT()
    result = run(cfg, algorithm, progress=False)
    reference = _reference_unchanged(algorithm.run.models["reference"].chunks[0], algorithm.run.layout,
                                     cfg.model.init_from)
    if rank == world - 1:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        (out / "result.json").write_text(json.dumps({"losses": {str(k): v.hex() for k, v in result.losses.items()},
                                                     "rows": rows, "reference_unchanged": reference,
                                                     "start_gap": getattr(algorithm, "start_gap", None)}))


def _reference_unchanged(model, layout, hf_dir) -> bool:
    """The frozen reference still holds exactly its initial (HF) weights."""
    from megatron_ernie.models.ernie.hf_adapter import load_hf_weights
    from megatron_ernie.models.ernie.model import build_model

    twin = build_model(model.ernie_args, layout)
    load_hf_weights(twin, hf_dir, model.ernie_args)
    loaded = twin.state_dict()
    return all(torch.equal(t, loaded[k]) for k, t in model.state_dict().items() if not k.endswith("_extra_state"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf_model(TEST_MOE, tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def single(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    spawn(_train, 1, [f"model.init_from={hf_dir}"], out)
    return json.loads((out / "result.json").read_text()), out


def test_roles_prepare_and_several_updates_per_step(single):
    result, out = single
    rows = result["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    first = rows[0]
    assert result["start_gap"] == 0.0 and first["updates"] == 2
    assert rows[-1]["kl"] > first["kl"]  # ... and moves away from it
    assert {"critic/loss", "critic/lr", "critic/grad_norm", "critic/loss_tokens"} <= set(first)
    assert rows[-1]["critic/loss"] < first["critic/loss"]
    ckpt = out / "checkpoints" / "step_00000004"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["roles"] == ["critic", "policy", "reference"]
    from megatron_ernie.conversion.mcore_format import McoreCheckpoint

    keys = McoreCheckpoint(ckpt).tensors
    assert "critic/reward_head.weight" in keys and "embedding.word_embeddings.weight" in keys
    assert not any(k.startswith("reference/") for k in keys)  # frozen: never saved
    assert result["reference_unchanged"]


def test_kill_and_resume_is_bit_exact_for_every_role(single, hf_dir, tmp_path):
    ref, _ = single
    out = tmp_path / "run"
    with pytest.raises(Exception, match="SIGKILL"):
        spawn(_train, 1, [f"model.init_from={hf_dir}"], out, "after_step:3")  # checkpoint at 2, killed after 3
    spawn(_train, 1, [f"model.init_from={hf_dir}"], out)
    got = json.loads((out / "result.json").read_text())
    assert got["losses"] == {k: v for k, v in ref["losses"].items() if int(k) > 2}  # this process's steps
    def timeless(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_s" and not k.startswith("time/")} for r in rows]

    assert timeless(got["rows"]) == timeless(ref["rows"])  # every role, every step
    assert got["reference_unchanged"]


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.tp=1"])  # last: DP=2
def test_same_losses_at_other_layouts(single, hf_dir, tmp_path, layout):
    ref, _ = single
    out = tmp_path / "run"
    spawn(_train, 2, [f"model.init_from={hf_dir}", layout], out)
    got = json.loads((out / "result.json").read_text())
    for a, b in zip(got["rows"], ref["rows"]):
        for key in ("loss", "kl", "critic/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (layout, a["step"], key)


def test_rank_share_keeps_each_mini_batch_global():
    from megatron_ernie.training.algorithm import rank_share

    items = list(range(8))
    assert rank_share(items, 2, 0) == [0, 1, 2, 3] and rank_share(items, 2, 1) == [4, 5, 6, 7]  # as before
    assert rank_share(items, 2, 0, 2) == [0, 1, 4, 5] and rank_share(items, 2, 1, 2) == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="does not split"):
        rank_share(items, 3, 0)
