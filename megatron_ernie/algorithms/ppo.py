"""PPO with online UPO (`recipe=ppo`): ERNIE 4.5's RL stage.

Roles:
- `policy` (the actor, trained);
- `critic`: the ERNIE decoder with a scalar head. It starts from `rl.ppo.critic_init` (a
  reward-model checkpoint) or else from the model's weights with a fresh head.
- `reference` (frozen): present when a KL term or UPO needs it.

Per step:
1. The rollout source gives this DP rank its prompt groups. The reward router scores and
   normalises them.
2. `prepare`:
   - The old log-probs of the policy (routing replayed), the reference's log-probs and the
     critic's values.
   - The token rewards: -β·KL per token (k1, `rl.ppo.kl_penalty`; fixed β, or adaptive towards
     `kl_target`, whose state is checkpointed), plus the sequence's reward on its last token.
   - GAE (γ, λ) gives advantages and returns. The advantages are whitened over the global batch.
   - Online UPO: per group, the best and the worst completion form a pair when their rewards
     differ by more than `upo_margin`. They are moved to the group's first two rows, so that a
     pair never straddles a micro-batch (micro_batch_size and samples_per_prompt are even).
3. `updates`: `rl.policy.epochs` × `mini_batches`, each a policy step (the clipped surrogate
   `policy_step.loss`, plus c·UPO) and a critic step (the clipped value loss). During the first
   `critic_warmup_steps` steps only the critic trains.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_ernie.algorithms import policy_step, rl_losses, sft
from megatron_ernie.errors import ConfigError
from megatron_ernie.models.ernie.hf_adapter import REWARD_HEAD
from megatron_ernie.training.algorithm import MAIN, Algorithm, Role, Update
from megatron_ernie.training.step import LOSS_KEY

CRITIC, REFERENCE = "critic", "reference"
VALUE_REPORTS = (LOSS_KEY, "value_clip_fraction", "ev_returns", "ev_returns_sq", "ev_error", "ev_error_sq")


def _value_forward_step(data_iterator, model, *, clip, aggregation):
    batch = next(data_iterator)
    values = model(batch["tokens"], batch["position_ids"], None)  # [b, s, 1]; the critic routes by itself
    return values, partial(_value_loss, batch, clip, aggregation)


def _value_loss(batch, clip, aggregation, output):
    return rl_losses.value_loss(output[..., 0].float(), batch["old_values"], batch["returns"], batch["loss_mask"],
                                clip=clip, aggregation=aggregation)


class PPO(Algorithm):
    name = "ppo"
    curves = ("rollout/reward_mean", "critic/loss", "critic/explained_variance", "ppo/kl", "ppo/kl_coef",
              "clip_fraction", "upo_loss", "upo/pairs")

    def build_tokenizer(self, cfg):
        self.policy, self.ppo, self.offline, self._offline_micro = cfg.rl.policy, cfg.rl.ppo, None, []
        self.upo = self.ppo if self.ppo.upo_coef > 0 else None
        needs_reference = self.ppo.kl_penalty > 0 or self.policy.kl_coef > 0 or self.upo is not None
        self.roles = (Role(MAIN), Role(CRITIC, head="scalar", keep_init=(REWARD_HEAD,), init_from=self.ppo.critic_init)) \
            + ((Role(REFERENCE, trainable=False),) if needs_reference else ())
        if self.ppo.kl_target is not None:
            self.kl = rl_losses.AdaptiveKLController(self.ppo.kl_penalty, self.ppo.kl_target, self.ppo.kl_horizon)
        else:
            self.kl = rl_losses.FixedKLController(self.ppo.kl_penalty)
        return sft.build_tokenizer(cfg)

    def states(self) -> dict:
        return {"kl_controller": self.kl, **({"offline_pairs": self.offline} if self.offline is not None else {})}

    def build_source(self, run):
        from megatron_ernie.rl.setup import build_rollout_source

        self.run = run
        r, mbs = run.cfg.rl.rollout, run.cfg.train.micro_batch_size
        policy_step.check_micro_batch(run, self.policy.mini_batches)
        if self.upo is not None and (mbs % 2 or r.samples_per_prompt % 2):
            raise ConfigError(f"online UPO (rl.ppo.upo_coef > 0) keeps each pair in one micro-batch: "
                              f"train.micro_batch_size ({mbs}) and rl.rollout.samples_per_prompt "
                              f"({r.samples_per_prompt}) must be even")
        source = build_rollout_source(run, mini_batches=self.policy.mini_batches)
        self.offline = self._offline_source(run)
        from megatron_ernie.rl.evaluate import HeldOut

        self.held_out = HeldOut.build(run, source)  # rl.eval; None when unset
        return source

    def _offline_source(self, run):
        """Offline UPO pairs (rl.ppo.offline_pairs): a seeded, resumable stream of
        `offline_pairs_per_step` pairs per step, whole micro-batches per rank and mini-batch."""
        if not self.ppo.offline_pairs:
            return None
        from megatron_ernie.algorithms.upo_offline import pair_dataset
        from megatron_ernie.training.algorithm import StaticSource

        n, per_micro = self.ppo.offline_pairs_per_step, run.cfg.train.micro_batch_size // 2
        if n % (run.dp_size * self.policy.mini_batches * per_micro):
            raise ConfigError(f"rl.ppo.offline_pairs_per_step={n} must be a multiple of DP × rl.policy.mini_batches × "
                              f"micro_batch_size/2 = {run.dp_size} × {self.policy.mini_batches} × {per_micro}")
        return StaticSource(pair_dataset(self.ppo.offline_pairs, run.cfg, run.tokenizer), n, seed=run.cfg.train.seed + 1,
                            dp_size=run.dp_size, dp_rank=run.dp_rank, mini_batches=self.policy.mini_batches)

    # --- before the updates ---
    def prepare(self, batch, run):
        from megatron_ernie.rl.logprobs import recompute
        from megatron_ernie.rl.rollout import collate
        from megatron_ernie.training.forward import per_token

        cfg, mbs = run.cfg, run.cfg.train.micro_batch_size
        if self.upo is not None:
            batch = _pairs_first(batch, self.ppo.upo_margin)
        replay = cfg.rl.router_replay.value == "rollout"
        old, mismatch = recompute(run, batch, replay=replay, micro_batch_size=mbs)
        run.metrics.update(mismatch)
        ref = recompute(run, batch, role=REFERENCE, replay=replay, micro_batch_size=mbs)[0] \
            if REFERENCE in run.models else None
        micro = [collate(batch[k:k + mbs], cfg.data.seq_length) for k in range(0, len(batch), mbs)]
        for m in micro:
            m.pop("routed_experts", None)  # the critic is another model: its own routing
        values = per_token(run.models[CRITIC].chunks, micro, what="values", seq_length=cfg.data.seq_length)
        if self.upo is not None:
            run.metrics["upo/pairs"] = policy_step.dp_sums([float(sum(e.extra.get("upo") == "chosen" for e in batch))],
                                                           run)[0]
        if old is not None:  # the last pipeline stage: the loss inputs live there
            self._loss_inputs(batch, old, ref, values, micro, run)
        self._update_kl(run)
        self._offline_micro = self._offline_pairs(run)
        return batch

    def _offline_pairs(self, run) -> list[dict]:
        if self.offline is None:
            return []
        from megatron_ernie.algorithms.upo_offline import pair_microbatches

        pairs = self.offline.next_batch(run.step)
        run.metrics["upo/offline_pairs"] = float(self.ppo.offline_pairs_per_step)
        return pair_microbatches(pairs, run, REFERENCE, pairs=run.cfg.train.micro_batch_size // 2, scale=0.0,
                                 count_pairs=False)

    def _loss_inputs(self, batch, old, ref, values, micro, run) -> None:
        masks = torch.cat([m["loss_mask"] for m in micro])
        values = torch.cat(values) * masks
        lp = _pad(old, masks)
        rp = _pad(ref, masks) if ref is not None else lp  # no reference: no KL
        scores = torch.tensor([e.reward for e in batch], dtype=torch.float32)
        kl = (lp - rp) * masks
        rewards = rl_losses.kl_penalised_rewards(scores, lp, rp, masks, self.kl.value, "k1")
        advantages, returns = rl_losses.gae(rewards, values, masks, self.ppo.gamma, self.ppo.lam)
        if self.ppo.whiten_advantages:
            from megatron.core import parallel_state as ps

            advantages = rl_losses.whiten(advantages, masks, group=ps.get_data_parallel_group() if run.dp_size > 1
                                          else None)
        kl_mean = policy_step.dp_mean(kl.sum(), masks.sum(), run)
        run.metrics.update({"ppo/kl": kl_mean, "ppo/kl_coef": self.kl.value,
                            "ppo/value_mean": policy_step.dp_mean(values.sum(), masks.sum(), run),
                            "ppo/return_mean": policy_step.dp_mean(returns.sum(), masks.sum(), run)})
        for i, e in enumerate(batch):
            m = masks[i].bool()
            e.extra.update(old_logprobs=old[i], advantages=advantages[i][m], returns=returns[i][m],
                           old_values=values[i][m])
            if ref is not None:
                e.extra["ref_logprobs"] = ref[i]
        self._kl_mean = kl_mean

    def _update_kl(self, run) -> None:
        """The controller moves on every rank by the last stage's measured KL (one state everywhere)."""
        from megatron.core import parallel_state as ps

        kl = torch.tensor([getattr(self, "_kl_mean", 0.0)], dtype=torch.float64)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(kl, src=ps.get_pipeline_model_parallel_last_rank(),
                                        group=ps.get_pipeline_model_parallel_group())
        r = run.cfg.rl.rollout
        self.kl.update(float(kl), n_steps=r.prompts_per_step * r.samples_per_prompt)

    def microbatch(self, experiences, upo_scale: float = 0.0) -> dict:
        """One micro-batch for both updates (the critic reads old_values/returns, the policy the rest)."""
        extras = ("old_logprobs", "advantages", "returns", "old_values") + \
            (("ref_logprobs",) if REFERENCE in self.run.models else ())
        batch = policy_step.training_batch(self.run, experiences, extras)
        if self.upo is not None:
            rows = [i for i, e in enumerate(experiences) if e.extra.get("upo") == "chosen"]
            batch["upo_chosen"] = torch.tensor(rows, dtype=torch.long)
            batch["upo_rejected"] = torch.tensor([i + 1 for i in rows], dtype=torch.long)
            batch["upo_scale"] = torch.tensor(upo_scale, dtype=torch.float64)
        return batch

    def updates(self, batch, run) -> list[Update]:
        c = run.cfg
        mbs, seq = c.train.micro_batch_size, c.data.seq_length
        offline = self._offline_micro
        per = len(offline) // self.policy.mini_batches
        parts = []
        for k, part in enumerate(policy_step.mini_batches(batch, self.policy.mini_batches, mbs)):
            pairs = offline[k * per:(k + 1) * per]  # this mini-batch's offline pairs, beside its online ones
            scale = self._upo_scale([e for m in part for e in m], sum(len(m["tokens"]) // 2 for m in pairs), run) \
                if self.upo is not None else 0.0
            for m in pairs:
                m["upo_scale"] = torch.tensor(scale, dtype=torch.float64)
            parts.append(([self.microbatch(m, scale) for m in part], pairs))
        train_policy = run.step > self.ppo.critic_warmup_steps
        out = []
        for _ in range(self.policy.epochs):
            for micro, pairs in parts:
                if train_policy:
                    out.append(Update(MAIN, micro + pairs, mbs, seq))
                out.append(Update(CRITIC, micro, mbs, seq))
        return out

    def _upo_scale(self, part, offline_pairs: int, run) -> float:
        """The update's surrogate count (tokens or sequences, every DP rank) over its pairs, online
        and offline."""
        lengths = [len(e.response_ids) for e in part]
        count = sum(lengths) if self.policy.aggregation == "token-mean" else sum(n > 0 for n in lengths)
        pairs = sum(e.extra.get("upo") == "chosen" for e in part) + offline_pairs
        total_count, total_pairs = policy_step.dp_sums([float(count), float(pairs)], run)
        return total_count / total_pairs if total_pairs else 0.0

    def forward_step(self, role):
        if role == CRITIC:
            return partial(_value_forward_step, clip=self.ppo.value_clip, aggregation=self.policy.aggregation)
        return partial(policy_step.forward_step, policy=self.policy, upo=self.upo)

    def report_keys(self, role):
        if role == CRITIC:
            return VALUE_REPORTS
        return policy_step.report_keys(self.policy, self.upo)

    def evaluate(self, run):
        from megatron_ernie.rl.evaluate import held_out_metrics

        return held_out_metrics(self, run)  # rl.eval: held-out accuracy / pass@k; None when unset

    def step_metrics(self, row: dict) -> dict:
        """Explained variance from the critic's reported sums."""
        means = {k.removeprefix("critic/"): v for k, v in row.items() if k.startswith("critic/ev_")}
        return {"critic/explained_variance": rl_losses.explained_variance(means)} if means else {}


def _pairs_first(batch: list, margin: float) -> list:
    """Per group (consecutive rows), its best and worst completion first when their rewards differ
    by more than `margin` (marked chosen / rejected; `rl.pairs.pick_pair`: ties keep the first sampled)."""
    from megatron_ernie.rl.pairs import pick_pair
    out, start = [], 0
    while start < len(batch):
        end = start
        while end < len(batch) and batch[end].group == batch[start].group:
            end += 1
        group = batch[start:end]
        for e in group:
            e.extra.pop("upo", None)
        picked = pick_pair(group, [e.reward for e in group], margin)
        if picked is not None:
            best, worst = picked
            group[best].extra["upo"], group[worst].extra["upo"] = "chosen", "rejected"
            rest = [e for i, e in enumerate(group) if i not in (best, worst)]
            group = [group[best], group[worst], *rest]
        out += group
        start = end
    return out


def _pad(rows: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Per-experience response values -> [n, s] at the mask's positions."""
    out = torch.zeros_like(masks)
    for i, r in enumerate(rows):
        out[i, masks[i].bool()] = r.to(out.dtype)
    return out

