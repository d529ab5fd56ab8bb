"""Held-out evaluation of a policy: prompts → a rollout engine → raw rewards → accuracy per domain.

    evaluate(engine, prompts, router, render, decode, samples=k, max_new_tokens=N) -> {"eval/...": float}

Per prompt, one greedy completion (temperature 0) and, with `samples=k > 1`, k seeded samples at
`temperature` (seeds from (seed, the prompt's position, the sample index): the same completions
whatever the DP layout, on a deterministic engine). Each completion is scored by the reward
router's sources and routes on the RAW rewards: the router's running normalisation is not applied
and its statistics and counters are never touched (`raw_router` scores through a view with
normalisation off and counters of its own), so evaluating never changes a training run.

A completion is correct when its raw combined reward is >= `threshold` (default `CORRECT` =
1 - 1e-6: fully correct for 0/1 verifiers; a partial score such as a sandbox's pass fraction
counts only at 1). Keys (every domain of the prompts, always; `eval/<d>/...` per domain):

    eval/accuracy, eval/<d>/accuracy        greedy completions correct (share of prompts)
    eval/reward, eval/<d>/reward            mean raw reward of the greedy completions
    eval/response_len                       mean greedy response length (tokens)
    eval/truncated_share                    greedy completions that hit max_new_tokens / the context
    eval/reward_failures                    completions a reward source could not score (reward 0)
    eval/prompts, eval/<d>/prompts          counts
    eval/pass@k, eval/<d>/pass@k            (k > 1) prompts with at least one correct sample of k
    eval/sample_accuracy, eval/<d>/sample_accuracy   (k > 1) samples correct (share)

pass@k uses the unbiased estimator 1 - C(n-c, k)/C(n, k) with n = k samples: "any correct".

Under data parallelism each DP rank generates for its share of the prompts (i % DP); each batch's
completions are gathered and scored on every rank in prompt order, as the rollout source scores
its global batch (a reward model's collectives then line up on every rank). Every rank returns the
same numbers, equal to a one-process evaluation's; every rank calls the engine's `generate` the
same number of times (possibly with no requests), as collective engines need.

`HeldOut` is the RL stages' evaluation (`rl.eval`, training/config.py EvalCfg): the rollout
source's engine (refit with the current policy after each step's update, before the loop
evaluates), its prompt rendering, and the run's reward config.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from megatron_ernie.errors import ConfigError, DataError
from megatron_ernie.rl.engine import FINISH_LENGTH, SamplingParams
from megatron_ernie.rl.rollout import CORRECT, Prompt, _all_gather, completion_seed



def raw_router(router):
    """A router scoring with `router`'s sources and routes, without normalisation and with its own
    counters: scoring through it leaves `router`'s state (its `state_dict`) unchanged. The
    sources are shared (a judge or reward model is not loaded twice)."""
    from megatron_ernie.rewards.router import RewardRouter

    return RewardRouter(router.sources, router.routes, None, router.concurrency)


def _name(p: Prompt, i: int) -> str:
    return p.where or (f"prompt {i}" + (f" (uid {p.uid})" if p.uid else ""))


def check_routes(prompts: Sequence[Prompt], router) -> None:
    """Every prompt has a reward route (else DataError naming the first without one)."""
    from megatron_ernie.rewards.types import RewardSample

    for i, p in enumerate(prompts):
        if router.route_for(RewardSample(prompt=p.text, response="", domain=p.domain, task=p.task)) is None:
            routes = ", ".join(r.label for r in router.routes)
            raise DataError(f"{_name(p, i)}: no reward route for domain={p.domain!r}, task={p.task!r} "
                            f"(routes: {routes}); add one to the reward config or fix the prompt's domain/task")


@dataclass
class _Record:
    """One prompt's outcome."""

    index: int
    domain: str
    reward: float  # greedy completion's raw reward
    correct: bool
    length: int
    truncated: bool
    failures: int  # completions (greedy + samples) whose scoring failed
    samples: list  # correctness of each sampled completion


def evaluate(engine, prompts: Sequence[Prompt], router, render: Callable, decode: Callable, *, samples: int = 1,
             max_new_tokens: int, temperature: float = 1.0, seed: int = 0, threshold: float = CORRECT,
             top_p: float = 1.0, top_k: int = 0, batch_size: int = 8, progress: bool = False,
             dp_size: int = 1, dp_rank: int = 0, dp_group=None) -> dict[str, float]:
    """Evaluate `engine` on `prompts` (see the module docstring for what is measured and the keys).

    `router`: a RewardRouter (the training one may be passed: only a raw view of it scores);
    `render(messages) -> prompt ids`; `decode(ids) -> text`; `batch_size`: prompts per generate
    call (each with 1 + k requests). Raises DataError naming a prompt without a reward route or
    one that does not fit the engine's context."""
    from megatron_ernie.rewards.types import RewardSample

    if samples < 1:
        raise ConfigError(f"samples={samples}: must be >= 1")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    prompts = list(prompts)
    if not prompts:
        raise DataError("evaluation: no prompts")
    if router is None:
        raise ConfigError("evaluation needs a reward config (a router) to tell correct answers")
    scorer = raw_router(router)
    check_routes(prompts, scorer)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    k = samples if samples > 1 else 0
    limit = getattr(engine, "max_model_len", None)
    refuses = getattr(engine, "overlong", "refuse") == "refuse"
    rendered = [render(p.messages) for p in prompts]  # every prompt on every rank: errors fail all ranks alike
    for i, ids in enumerate(rendered):
        if limit is not None and refuses and len(ids) > limit - 1:
            raise DataError(f"{_name(prompts[i], i)}: the prompt has {len(ids)} tokens; the engine's context is "
                            f"{limit} and needs room for one new token")

    from tqdm import tqdm

    mine = list(range(dp_rank, len(prompts), dp_size))
    per_rank = -(-len(prompts) // dp_size)
    calls = -(-per_rank // batch_size)  # the same on every rank (collective engines)
    records: list[_Record] = []
    bar = tqdm(total=len(prompts), disable=not progress, desc="eval", unit="prompt")
    for c in range(calls):
        part = mine[c * batch_size:(c + 1) * batch_size]
        requests, params = [], []
        for i in part:
            requests += [rendered[i]] * (1 + k)
            params += [greedy] + [replace(sampled, seed=completion_seed(seed, i, s)) for s in range(k)]
        completions = engine.generate(requests, params)
        # (prompt, sample (-1: greedy), response, tokens, hit the length limit), every rank's
        done = [(part[j // (1 + k)], j % (1 + k) - 1, decode(comp.token_ids), len(comp.token_ids),
                 comp.finish_reason == FINISH_LENGTH) for j, comp in enumerate(completions)]
        done = sorted(_all_gather(done, dp_size, dp_group))
        batch = [RewardSample(prompt=prompts[i].text, response=text, domain=prompts[i].domain, task=prompts[i].task,
                              reference=prompts[i].reference, tests=prompts[i].tests, checklist=prompts[i].checklist,
                              group=str(i), uid=f"{i}/{s}") for i, s, text, _, _ in done]
        scored = scorer.score(batch) if batch else []
        for n in range(0, len(done), 1 + k):
            i, _, _, length, truncated = done[n]
            rewards = [r.reward for r in scored[n:n + 1 + k]]
            records.append(_Record(i, prompts[i].domain, float(rewards[0]), rewards[0] >= threshold, length, truncated,
                                   sum(bool(r.failed) for r in scored[n:n + 1 + k]),
                                   [x >= threshold for x in rewards[1:]]))
        bar.update(len(done) // (1 + k))
    bar.close()
    return summarize(sorted(records, key=lambda r: r.index), samples)




def summarize(records: Sequence[_Record], samples: int) -> dict[str, float]:
    """The metrics of per-prompt records, in their order (deterministic)."""
    def block(rows: list[_Record], prefix: str) -> dict[str, float]:
        n = len(rows)
        out = {f"{prefix}accuracy": sum(r.correct for r in rows) / n,
               f"{prefix}reward": sum(r.reward for r in rows) / n,
               f"{prefix}prompts": float(n)}
        if samples > 1:
            out[f"{prefix}pass@{samples}"] = sum(any(r.samples) for r in rows) / n
            out[f"{prefix}sample_accuracy"] = sum(sum(r.samples) for r in rows) / (n * samples)
        return out

    records = list(records)
    out = block(records, "eval/")
    n = len(records)
    out["eval/response_len"] = sum(r.length for r in records) / n
    out["eval/truncated_share"] = sum(r.truncated for r in records) / n
    out["eval/reward_failures"] = float(sum(r.failures for r in records))
    for domain in sorted({r.domain for r in records}):
        out.update(block([r for r in records if r.domain == domain], f"eval/{domain}/"))
    return out


# --- the RL stages' evaluation (rl.eval) -----------------------------------------------------------
class HeldOut:
    """`rl.eval` of a GRPO / PPO run: its prompts loaded (and their routes checked) when the
    stage builds its source; `evaluate(run)` at the loop's evaluation points."""

    def __init__(self, source, prompts: list[Prompt], router):
        self.source = getattr(source, "inner", source)  # the RolloutSource (dynamic sampling wraps it)
        self.prompts, self.router = prompts, router

    @classmethod
    def build(cls, run, source) -> "HeldOut | None":
        """None when `rl.eval.prompts` is unset."""
        from megatron_ernie.rl.rollout import load_prompts

        e = run.cfg.rl.eval
        if not e.prompts:
            return None
        inner = getattr(source, "inner", source)
        if inner.router is None:
            raise ConfigError("rl.eval.prompts: the evaluation scores answers with the run's reward config; "
                              "set rl.rewards")
        router = raw_router(inner.router)
        prompts = load_prompts([p.strip() for p in e.prompts.split(",")])
        check_routes(prompts, router)
        return cls(source, prompts, router)

    def evaluate(self, run) -> dict[str, float]:
        e, r = run.cfg.rl.eval, run.cfg.rl.rollout
        src = self.source
        if not src.synced:  # the loop evaluates after a step's refit; this covers any other caller
            src._refit(run)
        return evaluate(src.engine, self.prompts, self.router, src.render, src.decode, samples=e.samples,
                        max_new_tokens=e.max_new_tokens or r.max_new_tokens, temperature=e.temperature,
                        top_p=r.top_p, top_k=r.top_k, seed=run.cfg.train.seed, threshold=e.threshold,
                        dp_size=run.dp_size, dp_rank=run.dp_rank, dp_group=src.dp_group)


def held_out_metrics(algorithm, run) -> dict[str, float] | None:
    """An RL algorithm's `evaluate`: its `held_out` (set in build_source), None without rl.eval."""
    held = getattr(algorithm, "held_out", None)
    return held.evaluate(run) if held is not None else None


__all__ = ["CORRECT", "HeldOut", "check_routes", "evaluate", "held_out_metrics", "raw_router", "summarize"]
