"""The rollout source: the experience source of RL (training/algorithm.py's contract).

Per step: the step's prompts (seeded, resumable, like the static source's global batches) → this
DP rank's share → `samples_per_prompt` completions each from the rollout engine (token level) →
the reward router scores the decoded responses → one `Experience` per completion. After the
step's updates, the policy's new weights go to the engine (bucketed refit).

Seeds are per completion, derived from (run seed, prompt's global position, sample index), so
the same prompt gets the same completions whatever the DP layout (on a deterministic engine).
Groups (a prompt's completions) stay on one rank: group statistics (GRPO's baseline) are local.

Rewards are computed on the whole global batch on every DP rank (the completions are gathered):
the router's per-(domain, source) normalisation then sees every sample in the same order on
every rank, so its statistics — saved with the checkpoint — are identical everywhere and equal to
a one-process run's. The cost is scoring the batch DP times; splitting raw scoring from
normalisation would remove it (later).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_ernie.errors import DataError
from megatron_ernie.rl.engine import Completion, SamplingParams


@dataclass
class Prompt:
    """One RL prompt: the chat messages up to the assistant turn, and what scores the answer."""

    messages: list[dict]
    domain: str = "general"
    task: str = "default"
    reference: str | None = None
    tests: list | None = None
    checklist: list | None = None
    uid: str = ""
    where: str = ""  # "file:line" it was read from (load_prompts), for error messages

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


def load_prompts(paths: str | Sequence[str]) -> list[Prompt]:
    """JSONL rows: {"prompt": str} or {"messages": [...]} (ending with a user turn), optional
    domain, task, reference, tests, checklist, uid. Errors name the file and line."""
    from megatron_ernie.data.sft import data_path

    out = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = data_path(path)
        if not path.exists():
            raise DataError(f"{path}: prompt file not found")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg})") from None
            out.append(_prompt(row, where))
    if not out:
        raise DataError(f"{paths}: no prompts")
    return out


def _prompt(row: Any, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object")
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "user"):
            raise DataError(f"{where}: 'messages' must be a non-empty list ending with a user turn")
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        raise DataError(f"{where}: needs a non-empty 'prompt' string or 'messages'")
    # pass_rate: what megatron-ernie-prefilter adds to the prompts it keeps (its output is a prompt file)
    known = {"prompt", "messages", "domain", "task", "reference", "tests", "checklist", "uid", "pass_rate"}
    extra = sorted(set(row) - known)
    if extra:
        raise DataError(f"{where}: unknown keys {extra}")
    return Prompt(messages, str(row.get("domain", "general")), str(row.get("task", "default")),
                  row.get("reference"), row.get("tests"), row.get("checklist"), str(row.get("uid", "")), where)


@dataclass
class Experience:
    """One sampled completion on its way from the engine to the loss."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    finish_reason: str
    group: int  # the prompt's global position in the run (all its samples share it)
    sample: int
    domain: str
    reward: float = 0.0
    reward_record: dict = field(default_factory=dict)
    routed_experts: torch.Tensor | None = None  # [len(prompt)+len(response)-1, moe layers, k]
    prompt_truncated: bool = False
    extra: dict = field(default_factory=dict)  # what an algorithm's prepare adds (advantages, ...)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def completion_seed(seed: int, group: int, sample: int) -> int:
    """A per-completion seed independent of the layout (splitmix-style mixing, 63 bits)."""
    x = (seed * 0x9E3779B97F4A7C15 + group * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def collate(experiences: Sequence[Experience], seq_length: int, extras: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """[b, seq_length] rows: inputs = tokens[:-1], labels = tokens[1:], loss mask on the response's
    tokens, the rollout's log-probs aligned with labels, routed experts aligned with inputs.
    `extras`: names in each experience's `extra` laid out like the rollout log-probs (a value per
    response token, or one number for all of them); an experience without one gets zeros."""
    b = len(experiences)
    tokens = torch.zeros(b, seq_length, dtype=torch.long)
    labels = torch.zeros(b, seq_length, dtype=torch.long)
    mask = torch.zeros(b, seq_length)
    rollout = torch.zeros(b, seq_length)
    added = {name: torch.zeros(b, seq_length) for name in extras}
    for i, e in enumerate(experiences):
        full = e.tokens
        n = len(full) - 1
        if n > seq_length:
            raise DataError(f"experience {i}: {len(full)} tokens do not fit seq_length={seq_length} + 1")
        tokens[i, :n] = torch.tensor(full[:-1])
        labels[i, :n] = torch.tensor(full[1:])
        start = len(e.prompt_ids) - 1  # the label at position start is the first response token
        mask[i, start:n] = 1.0
        rollout[i, start:n] = torch.tensor(e.rollout_logprobs, dtype=torch.float32)
        for name, t in added.items():
            if name in e.extra:
                t[i, start:n] = torch.as_tensor(e.extra[name], dtype=torch.float32)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": mask, "rollout_logprobs": rollout,
             "position_ids": torch.arange(seq_length).expand(b, -1).contiguous(), **added}
    if experiences and all(e.routed_experts is not None for e in experiences):
        from megatron_ernie.rl.replay import pad_routed

        layers, k = experiences[0].routed_experts.shape[1:]
        batch["routed_experts"] = pad_routed([e.routed_experts for e in experiences], seq_length, k, layers)
    return batch


class PromptOrder:
    """Endless seeded order over prompts; resumable by the number consumed."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.consumed = n, seed, 0

    def take(self, count: int) -> list[int]:
        out = []
        for k in range(self.consumed, self.consumed + count):
            epoch, pos = divmod(k, self.n)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(perm[pos]))
        self.consumed += count
        return out


class RolloutSource:
    """prompts → engine → rewards → experiences; pushes the policy's weights after each update.

    `engine`: a RolloutEngine (token level); `router`: the reward router (None: rewards 0);
    `render(messages) -> ids`: the prompt's token ids up to the assistant's turn; `decode(ids)`."""

    def __init__(self, prompts: list[Prompt], engine, router, *, render, decode, prompts_per_step: int,
                 samples_per_prompt: int, sampling: SamplingParams, seed: int, dp_size: int, dp_rank: int,
                 dp_group=None, refit_bucket_mb: float = 512, policy_role: str = "policy", run=None,
                 mini_batches: int = 1):
        if prompts_per_step % (dp_size * mini_batches):
            raise DataError(f"rl.rollout.prompts_per_step={prompts_per_step} is not a multiple of DP × mini-batches "
                            f"= {dp_size} × {mini_batches}")
        self.mini_batches = mini_batches
        self.prompts, self.engine, self.router = prompts, engine, router
        self.render, self.decode = render, decode
        self.prompts_per_step, self.samples_per_prompt = prompts_per_step, samples_per_prompt
        self.sampling, self.seed = sampling, seed
        self.dp_size, self.dp_rank, self.dp_group = dp_size, dp_rank, dp_group
        self.refit_bucket_mb, self.policy_role = refit_bucket_mb, policy_role
        self.order = PromptOrder(len(prompts), seed)
        self.last_metrics: dict[str, float] = {}
        self.run = run  # the running job (its policy): the engine is refit from it
        self.synced = False  # the engine holds the policy's current weights

    # --- the experience source contract ---
    def next_batch(self, step: int) -> list[Experience]:
        if not self.synced:  # first rollout of this process (fresh start or resume)
            self._refit(self.run)
        t0 = time.perf_counter()
        start = self.order.consumed
        chosen = self.order.take(self.prompts_per_step)
        from megatron_ernie.training.algorithm import rank_share

        mine = rank_share(list(range(self.prompts_per_step)), self.dp_size, self.dp_rank, self.mini_batches)
        requests, params, meta = [], [], []
        for j in mine:
            p = self.prompts[chosen[j]]
            ids = self.render(p.messages)
            for s in range(self.samples_per_prompt):
                requests.append(ids)
                params.append(_with_seed(self.sampling, completion_seed(self.seed, start + j, s)))
                meta.append((start + j, s, p))
        completions = self.engine.generate(requests, params)
        t_gen = time.perf_counter() - t0
        experiences = [self._experience(c, g, s, p) for c, (g, s, p) in zip(completions, meta)]
        t_score = time.perf_counter()
        self._score(experiences, [p for _, _, p in meta])
        now = time.perf_counter()
        self.last_metrics = {**self._metrics(experiences, t_gen, now - t0), "rollout/reward_s": now - t_score,
                             **getattr(self, "_domains", {})}
        return experiences

    def after_update(self, step: int, run) -> None:
        self.last_metrics["rollout/refit_s"] = self._refit(run)

    def _refit(self, run) -> float:
        from megatron_ernie.rl.refit import refit

        if run is None:
            raise RuntimeError("RolloutSource needs the run (its policy) to refit the engine")
        stats = refit(self.engine, run.models[self.policy_role].chunks, run.args, self.refit_bucket_mb)
        self.synced = True
        return stats.seconds

    def state_dict(self) -> dict:
        return {"consumed_prompts": self.order.consumed,
                "rewards": self.router.state_dict() if self.router is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.order.consumed = int(state["consumed_prompts"])
        if self.router is not None and state.get("rewards") is not None:
            self.router.load_state_dict(state["rewards"])

    # --- parts ---
    def _experience(self, c: Completion, group: int, sample: int, p: Prompt) -> Experience:
        return Experience(list(c.prompt_ids), list(c.token_ids), list(c.logprobs), c.finish_reason, group, sample,
                          p.domain, routed_experts=c.routed_experts, prompt_truncated=c.prompt_truncated)

    def _score(self, experiences: list[Experience], prompts: list[Prompt]) -> None:
        if self.router is None:
            return
        from megatron_ernie.rewards.types import RewardSample

        local = [(e.group, e.sample, p.text, self.decode(e.response_ids), p.domain, p.task, p.reference,
                  p.tests, p.checklist) for e, p in zip(experiences, prompts)]
        everyone = _all_gather(local, self.dp_size, self.dp_group)
        samples = [RewardSample(prompt=t, response=r, domain=d, task=k, reference=ref,
                                tests=tests, checklist=cl, group=str(g), uid=f"{g}/{s}")
                   for g, s, t, r, d, k, ref, tests, cl in everyone]
        scored = self.router.score(samples)
        self._domains = _domain_metrics(samples, scored)  # the global batch: the same on every rank
        by_uid = {s.uid: r for s, r in zip(samples, scored)}
        for e in experiences:
            routed = by_uid[f"{e.group}/{e.sample}"]
            e.reward, e.reward_record = routed.reward, routed.record()

    def _metrics(self, experiences: list[Experience], t_gen: float, t_all: float) -> dict[str, float]:
        n = torch.tensor([len(experiences), sum(len(e.response_ids) for e in experiences),
                          sum(e.reward for e in experiences), sum(e.finish_reason == "length" for e in experiences),
                          sum(e.prompt_truncated for e in experiences),
                          sum(bool(e.reward_record.get("failed")) for e in experiences)], dtype=torch.float64)
        if self.dp_size > 1:
            torch.distributed.all_reduce(n, group=self.dp_group)
        count = max(float(n[0]), 1.0)
        return {"rollout/reward_mean": float(n[2]) / count, "rollout/response_len": float(n[1]) / count,
                "rollout/truncated_share": float(n[3]) / count, "rollout/prompts_truncated": float(n[4]),
                # samples a reward source could not score (raised, timed out, NaN/inf): scored 0 by the router
                "rollout/reward_failures": float(n[5]),
                "rollout/generate_s": t_gen, "rollout/tokens_per_s": float(n[1]) / max(t_gen, 1e-9),
                "rollout/time_s": t_all}


CORRECT = 1.0 - 1e-6  # a raw combined reward of 1 (up to rounding): the response is correct


def _domain_metrics(samples, scored, correct: float = CORRECT) -> dict[str, float]:
    """Per domain: the mean raw (un-normalised) reward and the share fully correct (raw ≥ 1)."""
    by: dict[str, list[float]] = {}
    for s, r in zip(samples, scored):
        by.setdefault(s.domain, []).append(r.raw)
    out = {}
    for domain, raws in sorted(by.items()):
        out[f"rollout/{domain}/reward_raw"] = sum(raws) / len(raws)
        out[f"rollout/{domain}/accuracy"] = sum(x >= correct for x in raws) / len(raws)
    return out


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)


def _all_gather(local: list, size: int, group) -> list:
    if size == 1:
        return local
    parts = [None] * size
    torch.distributed.all_gather_object(parts, local, group=group)
    return [x for part in parts for x in part]
