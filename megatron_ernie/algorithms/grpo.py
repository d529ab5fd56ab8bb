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
        from megatron_ernie.rl.dynamic_sampling import DynamicSampling
        from megatron_ernie.rl.evaluate import HeldOut
        from megatron_ernie.rl.setup import build_rollout_source

        self.run = run
        minis = self.policy.mini_batches
        policy_step.check_micro_batch(run, minis)
        source = build_rollout_source(run, mini_batches=minis)
        self.held_out = HeldOut.build(run, source)  # rl.eval; None when unset
        g = run.cfg.rl.grpo
        if not g.dynamic_sampling:
            return source
        return DynamicSampling(source, max_rounds=g.max_rounds, min_variance=g.min_variance)

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
            run.metrics["rollout/overlong_penalty"] = policy_step.dp_mean(penalty.sum(), penalty.numel(), run)
        advantages = rl_losses.group_advantages(rewards, [e.group for e in batch], normalize_std=g.normalize_std)
        replay = cfg.rl.router_replay.value == "rollout"
        old, mismatch = recompute(run, batch, replay=replay, micro_batch_size=cfg.train.micro_batch_size)
        run.metrics.update(mismatch)
        ref = None
        if self.policy.kl_coef > 0:
            ref, _ = recompute(run, batch, role=REFERENCE, replay=replay, micro_batch_size=cfg.train.micro_batch_size)
        for i, e in enumerate(batch):
            e.extra["advantages"] = float(advantages[i])
            if old is not None:  # the last pipeline stage (the loss lives there)
                e.extra["old_logprobs"] = old[i]
            if ref is not None:
                e.extra["ref_logprobs"] = ref[i]
        run.metrics["rollout/advantage_abs"] = policy_step.dp_mean(advantages.abs().sum(), advantages.numel(), run)
        return batch

    def microbatch(self, experiences) -> dict:
        extras = ("advantages", "old_logprobs") + (("ref_logprobs",) if self.policy.kl_coef > 0 else ())
        return policy_step.training_batch(self.run, experiences, extras)

    def updates(self, batch, run) -> list[Update]:
        c = run.cfg
        parts = [[self.microbatch(m) for m in part]  # built once, read by every epoch
                 for part in policy_step.mini_batches(batch, self.policy.mini_batches, c.train.micro_batch_size)]
        return [Update(MAIN, micro, c.train.micro_batch_size, c.data.seq_length)
                for _ in range(self.policy.epochs) for micro in parts]

    def forward_step(self, role):
        return partial(policy_step.forward_step, policy=self.policy)

    def report_keys(self, role):
        return policy_step.report_keys(self.policy)

    def evaluate(self, run):
        from megatron_ernie.rl.evaluate import held_out_metrics

        return held_out_metrics(self, run)  # rl.eval: held-out accuracy / pass@k; None when unset

