"""GRPO with DAPO's techniques (`recipe=grpo`): no critic, advantages relative to each prompt's
group of completions.

Per step:
1. The rollout source gives this DP rank `prompts_per_step / DP` prompt groups of
   `samples_per_prompt` completions. They are scored by the reward router, which also
   normalises per domain. With `rl.grpo.dynamic_sampling`, groups whose rewards are all alike are
   dropped and more prompts are sampled until the step is full (`rl/dynamic_sampling.py`).
2. `prepare`:
   - DAPO's overlong penalty is added to each reward (`rl.grpo.overlong_buffer` > 0).
   - Group advantages come from the rewards (`rl_losses.group_advantages`, std-normalised unless
     `rl.grpo.normalize_std=false`).
   - The trainer recomputes the old log-probs, replaying the rollout's routing by default, and
     logs the rollout mismatch.
   - With `rl.policy.kl_coef` > 0, it also computes the frozen reference's log-probs.
3. `updates`: `rl.policy.epochs` passes over the batch, each split into `rl.policy.mini_batches`
   optimizer steps.
4. The loss per token (`policy_step.loss`, shared with PPO) is the clipped surrogate. The clip is
   clip-higher (ε_low 0.2, ε_high 0.28), with an optional dual clip. It is weighted by the
   truncated importance ratio of trainer and rollout log-probs (`rl.policy.tis_cap`) and
   aggregated `token-mean` (DAPO) or per sequence. With a KL term, k3 against the reference is
   added, aggregated the same way.

Log-probs stay vocab-parallel (`training.forward.token_logprobs`): no full logits are gathered.
The roles are the policy and, with a KL term, a frozen `reference`.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_ernie.algorithms import policy_step, rl_losses, sft
from megatron_ernie.errors import ConfigError
from megatron_ernie.training.algorithm import MAIN, Algorithm, Role, Update

REFERENCE = "reference"


class GRPO(Algorithm):
    name = "grpo"
    curves = ("rollout/reward_mean", "rollout/response_len", "clip_fraction", "approx_kl",
              "rollout/logp_abs_diff", "dynamic/groups_dropped")

    def build_tokenizer(self, cfg):
        # the roles follow from the config: a frozen reference only when a KL term needs it
        self.policy = cfg.rl.policy
        self.roles = (Role(MAIN),) + ((Role(REFERENCE, trainable=False),) if self.policy.kl_coef > 0 else ())
        return sft.build_tokenizer(cfg)

    def build_source(self, run):
        from megatron.core import parallel_state as ps

        from megatron_ernie.rl.dynamic_sampling import DynamicSampling
        from megatron_ernie.rl.setup import build_rollout_source

        self.run = run
        r, minis = run.cfg.rl.rollout, self.policy.mini_batches
        rows = r.prompts_per_step // max(run.dp_size * minis, 1) * r.samples_per_prompt  # per rank and update
        if rows % run.cfg.train.micro_batch_size:
            raise ConfigError(f"train.micro_batch_size={run.cfg.train.micro_batch_size} does not divide the "
                              f"{rows} completions of a rank's mini-batch (rl.rollout.prompts_per_step / "
                              f"(DP × rl.policy.mini_batches) × rl.rollout.samples_per_prompt)")
        source = build_rollout_source(run, mini_batches=minis)
        g = run.cfg.rl.grpo
        if not g.dynamic_sampling:
            return source
        return DynamicSampling(source, max_rounds=g.max_rounds, min_variance=g.min_variance, dp_size=run.dp_size,
                               dp_group=ps.get_data_parallel_group() if run.dp_size > 1 else None)

    # --- before the updates ---
    def prepare(self, batch, run):
        from megatron_ernie.rl.logprobs import recompute

        cfg = run.cfg
        g, r = cfg.rl.grpo, cfg.rl.rollout
        rewards = torch.tensor([e.reward for e in batch], dtype=torch.float64)
        if g.overlong_buffer > 0:
            lengths = torch.tensor([len(e.response_ids) for e in batch])
            penalty = rl_losses.overlong_penalty(lengths, r.max_new_tokens, g.overlong_buffer, g.overlong_factor)
            rewards = rewards + penalty
            run.metrics["rollout/overlong_penalty"] = _global_mean(penalty, run)
        advantages = rl_losses.group_advantages(rewards, [e.group for e in batch], normalize_std=g.normalize_std)
        replay = cfg.rl.router_replay.value == "rollout"
        old, mismatch = recompute(run, batch, replay=replay, micro_batch_size=cfg.train.micro_batch_size)
        run.metrics.update(mismatch)
        ref = None
        if self.policy.kl_coef > 0:
            ref, _ = recompute(run, batch, role=REFERENCE, replay=replay, micro_batch_size=cfg.train.micro_batch_size)
        for i, e in enumerate(batch):
            e.extra["advantage"] = float(advantages[i])
            if old is not None:  # the last pipeline stage (the loss lives there)
                e.extra["old_logprobs"] = old[i]
            if ref is not None:
                e.extra["ref_logprobs"] = ref[i]
        run.metrics["rollout/advantage_abs"] = _global_mean(advantages.abs(), run)
        return batch

    def microbatch(self, experiences) -> dict:
        from megatron_ernie.rl.rollout import collate

        seq = self.run.cfg.data.seq_length
        batch = collate(experiences, seq)
        if self.run.cfg.rl.router_replay.value != "rollout":
            batch.pop("routed_experts", None)
        names = ["old_logprobs"] + (["ref_logprobs"] if self.policy.kl_coef > 0 else [])
        for name in ("advantages", *names):
            batch[name] = torch.zeros(len(experiences), seq)
        for i, e in enumerate(experiences):
            m = batch["loss_mask"][i].bool()
            batch["advantages"][i, m] = e.extra["advantage"]
            for name in names:
                if name in e.extra:
                    batch[name][i, m] = e.extra[name]
        return batch

    def updates(self, batch, run) -> list[Update]:
        c = run.cfg
        mbs, minis = c.train.micro_batch_size, self.policy.mini_batches
        size = len(batch) // minis  # the source shares the batch so that part k belongs to mini-batch k
        parts = [batch[k * size:(k + 1) * size] for k in range(minis)]
        out = []
        for _ in range(self.policy.epochs):
            for part in parts:
                micro = [self.microbatch(part[j:j + mbs]) for j in range(0, len(part), mbs)]
                out.append(Update(MAIN, micro, mbs, c.data.seq_length))
        return out

    def forward_step(self, role):
        return partial(policy_step.forward_step, policy=self.policy)

    def report_keys(self, role):
        return policy_step.report_keys(self.policy)


def _global_mean(values: torch.Tensor, run) -> float:
    """Mean over every DP rank's values (each rank holds its own groups)."""
    from megatron.core import parallel_state as ps

    sums = torch.tensor([float(values.sum()), float(values.numel())], dtype=torch.float64)
    if run.dp_size > 1:
        torch.distributed.all_reduce(sums, group=ps.get_data_parallel_group())
    return float(sums[0] / sums[1].clamp(min=1))
