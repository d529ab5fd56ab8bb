"""DAPO's dynamic sampling: an experience source over a rollout source that drops the prompt
groups a group-relative advantage learns nothing from, and samples more prompts until the step
has as many informative groups as asked.

The decision is the reward system's group filter (`rewards.filters.filter_groups`): here a group
is dropped when its rewards' variance is below `min_variance`. All-correct and all-wrong
groups of a verifier are such groups. Each round is a full rollout of the inner source
(`prompts_per_step` new prompts), so prompt order, seeds and resume stay the inner source's.
Rounds are collective: rollouts, refits and reward gathering are collectives, so every DP rank
runs a round while any rank still lacks groups. Each rank keeps its own first groups up to its
share. When `max_rounds` rounds leave a rank short, the step fails with a message that says what
to change; it does not loop forever.
"""
from __future__ import annotations

import torch

from megatron_ernie.errors import DataError


SUMMED = ("rollout/generate_s", "rollout/reward_s", "rollout/time_s", "rollout/reward_failures",
          "rollout/prompts_truncated")


class DynamicSampling:
    def __init__(self, inner, *, max_rounds: int, min_variance: float):
        self.inner, self.max_rounds, self.min_variance = inner, max_rounds, min_variance
        self.dp_group, self.dp_size = inner.dp_group, inner.dp_size  # rounds are collective over these
        self.groups_per_rank = inner.prompts_per_step // inner.dp_size
        self.last_metrics: dict[str, float] = {}

    @property
    def prompts(self):
        return self.inner.prompts

    def next_batch(self, step: int) -> list:
        from megatron_ernie.rewards.filters import filter_groups

        kept: list[list] = []
        dropped = 0.0
        summed = dict.fromkeys(SUMMED, 0.0)  # over the rounds; the other rollout metrics are the last round's
        rounds = 0
        while True:
            batch = self.inner.next_batch(step)
            rounds += 1
            for k in summed:
                summed[k] += self.inner.last_metrics.get(k, 0.0)
            groups = [str(e.group) for e in batch]
            result = filter_groups(groups, [e.reward for e in batch], drop_all_correct=False, drop_all_wrong=False,
                                   min_variance=self.min_variance)
            by_group: dict[str, list] = {}
            for i in result.kept_indices:
                by_group.setdefault(groups[i], []).append(batch[i])
            kept += [by_group[g] for g in result.kept_groups]
            dropped += len(result.dropped)
            if not self._anyone_short(len(kept)):
                break
            if rounds >= self.max_rounds:
                raise DataError(
                    f"dynamic sampling: {rounds} rounds of {self.inner.prompts_per_step} prompts left "
                    f"{min(len(kept), self.groups_per_rank)} of {self.groups_per_rank} groups per rank with "
                    f"varied rewards (all others scored alike); raise rl.grpo.max_rounds, sample more per prompt "
                    f"(rl.rollout.samples_per_prompt), pre-filter the prompts (megatron-ernie-prefilter), "
                    f"or set rl.grpo.dynamic_sampling=false")
        self.last_metrics = {**self.inner.last_metrics, **summed, "dynamic/rounds": float(rounds),
                             **self._counts(dropped, len(kept))}
        return [e for group in kept[:self.groups_per_rank] for e in group]

    def _anyone_short(self, have: int) -> bool:
        short = torch.tensor([int(have < self.groups_per_rank)])
        if self.dp_size > 1:
            torch.distributed.all_reduce(short, op=torch.distributed.ReduceOp.MAX, group=self.dp_group)
        return bool(short.item())

    def _counts(self, dropped: float, kept: int) -> dict[str, float]:
        n = torch.tensor([dropped, float(kept)], dtype=torch.float64)
        if self.dp_size > 1:
            torch.distributed.all_reduce(n, group=self.dp_group)
        return {"dynamic/groups_dropped": float(n[0]), "dynamic/groups_sampled": float(n[0] + n[1])}

    def after_update(self, step: int, run) -> None:
        self.inner.after_update(step, run)
        self.last_metrics["rollout/refit_s"] = self.inner.last_metrics["rollout/refit_s"]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
