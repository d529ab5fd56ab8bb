"""What a stage is to the one training loop: an algorithm object and the experience source it
builds.

- `Role`: one model of the run — its head (LM or scalar), trainable or frozen, where its weights
  start. SFT and reward models have one; PPO has actor, critic and a frozen reference.
- `ExperienceSource`: the next batch for a step, a hook after the step's updates (a rollout
  source pushes the new weights to its engine there), and its own state for checkpoints. The
  static source (a dataset + `GlobalBatches`) serves SFT, reward models and offline pairs; the
  rollout source (`rl/`) produces batches from the current policy.
- `Algorithm`: its roles, the source it reads, an optional `prepare` (forward-only passes before
  the update: reference / old log-probs, values), the updates a batch feeds (one or more
  optimizer steps per trainable role, each over micro-batches), each role's forward step (its
  loss), the keys its losses report, its curves and an optional evaluation.

The loop (`training/loop.py`) owns everything else: parallel state, building each role's model,
DDP, optimizer and LR schedule, Megatron's schedules, checkpoints, metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from megatron_ernie.errors import ConfigError
from megatron_ernie.training.step import LOSS_KEY

MAIN = "policy"  # the role whose weights a run exports (checkpoint keys "model"/"optimizer"/...)


@dataclass(frozen=True)
class Role:
    name: str
    head: str = "lm"  # "lm" | "scalar"
    trainable: bool = True
    keep_init: tuple[str, ...] = ()  # parameters an initial checkpoint may lack (a new head)
    init_from: str | None = None  # None: the run's model.init_from


@dataclass
class Update:
    """One optimizer step of one role over this DP rank's micro-batches."""

    role: str
    microbatches: list[dict]
    rows_per_microbatch: int  # sequences per micro-batch (Megatron's micro_batch_size)
    seq_length: int


@runtime_checkable
class ExperienceSource(Protocol):
    def next_batch(self, step: int) -> Any:
        """This DP rank's experience for `step` (the algorithm's `updates` turns it into micro-batches)."""

    def after_update(self, step: int, run: "Run") -> None:
        """Called once the step's updates are done (e.g. refit the rollout engine)."""

    def state_dict(self) -> dict:
        """Plain, picklable state; identical on every rank."""

    def load_state_dict(self, state: dict) -> None: ...


def rank_share(items: list, dp_size: int, dp_rank: int, mini_batches: int = 1) -> list:
    """This DP rank's share of a global batch that feeds `mini_batches` consecutive updates: the
    global batch splits into that many mini-batches, each split over the DP ranks, so that the
    rank's k-th part of its share belongs to the k-th global mini-batch — the same samples meet
    in each update whatever the DP size."""
    size = len(items) // mini_batches
    if size * mini_batches != len(items) or size % dp_size:
        raise ValueError(f"a batch of {len(items)} does not split into {mini_batches} mini-batches × {dp_size} ranks")
    per = size // dp_size
    return [x for m in range(mini_batches) for x in items[m * size + dp_rank * per:m * size + (dp_rank + 1) * per]]


class StaticSource:
    """A dataset's items in seeded, resumable global batches; this DP rank's share per step
    (see `rank_share` for `mini_batches`)."""

    def __init__(self, dataset, global_batch_size: int, *, seed: int, dp_size: int, dp_rank: int,
                 mini_batches: int = 1):
        from megatron_ernie.data.sft import GlobalBatches

        self.dataset = dataset
        self.batches = GlobalBatches(dataset, global_batch_size, seed=seed)
        self.dp_size, self.dp_rank, self.mini_batches = dp_size, dp_rank, mini_batches

    def next_batch(self, step: int) -> list:
        indices = rank_share(next(self.batches), self.dp_size, self.dp_rank, self.mini_batches)
        return [self.dataset[i] for i in indices]

    def after_update(self, step: int, run: "Run") -> None:
        pass

    def state_dict(self) -> dict:
        return {"consumed_samples": self.batches.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.batches.consumed_samples = int(state["consumed_samples"])


@dataclass
class RoleModel:
    """A role's live parts: its model chunks (DDP-wrapped when trainable), optimizer, LR schedule."""

    role: Role
    chunks: list
    optimizer: Any = None
    scheduler: Any = None

    @property
    def trainable(self) -> bool:
        return self.role.trainable


@dataclass
class Run:
    """What an algorithm sees of the running job."""

    cfg: Any
    args: Any  # ErnieArgs
    layout: Any
    tokenizer: Any
    models: dict[str, RoleModel]
    dp_size: int
    dp_rank: int
    step: int = 0
    metrics: dict = field(default_factory=dict)  # what the algorithm measured this step (logged, then cleared)


def microbatches(items: list, size: int, make_batch: Callable[[list], dict]) -> list[dict]:
    return [make_batch(items[k:k + size]) for k in range(0, len(items), size)]


class Algorithm:
    """Defaults serve a one-role stage over a static source; subclasses override what differs."""

    name: str = "algorithm"
    roles: tuple[Role, ...] = (Role(MAIN),)
    rows_per_item: int = 1  # sequences per source item (a preference pair: 2)
    mini_batches: int = 1  # optimizer steps of the main role per batch (each on its global share)
    curves: tuple[str, ...] = ()

    def build_tokenizer(self, cfg):
        raise NotImplementedError

    def build_source(self, run: Run) -> ExperienceSource:
        c = run.cfg
        gbs, mbs = c.train.global_batch_size, c.train.micro_batch_size
        if gbs % (mbs * run.dp_size):  # a rollout source sizes its batch by rl.rollout instead
            raise ConfigError(f"train.global_batch_size={gbs} is not a multiple of micro_batch_size×DP = "
                              f"{mbs}×{run.dp_size}")
        return StaticSource(self.build_dataset(run.cfg, run.tokenizer), c.train.global_batch_size,
                            seed=c.train.seed, dp_size=run.dp_size, dp_rank=run.dp_rank,
                            mini_batches=self.mini_batches)

    def build_dataset(self, cfg, tokenizer):
        raise NotImplementedError(f"{self.name}: no dataset (override build_source)")

    def microbatch(self, items: list) -> dict:
        raise NotImplementedError

    def prepare(self, batch, run: Run):
        """Forward-only passes before the updates (reference / old log-probs, values); default none."""
        return batch

    def updates(self, batch, run: Run) -> list[Update]:
        """Default: one optimizer step of the main role over the batch, micro_batch_size items each."""
        c = run.cfg
        micro = microbatches(batch, c.train.micro_batch_size, self.microbatch)
        return [Update(MAIN, micro, c.train.micro_batch_size * self.rows_per_item, c.data.seq_length)]

    def forward_step(self, role: str) -> Callable:
        raise NotImplementedError

    def report_keys(self, role: str) -> tuple[str, ...]:
        return (LOSS_KEY,)

    def step_metrics(self, row: dict) -> dict[str, float]:
        """Metrics derived from the step's reduced reports (e.g. explained variance); default none."""
        return {}

    def states(self) -> dict:
        """The algorithm's own resumable state ({name: object with state_dict/load_state_dict},
        e.g. an adaptive KL controller), checkpointed beside the source's; default none."""
        return {}

    def evaluate(self, run: Run) -> dict[str, float] | None:
        """Held-out metrics at `train.eval_interval` and at the end; None: the stage has none."""
        return None

    def source_stats(self, source) -> str:
        if hasattr(source, "prompts"):  # a rollout source
            return f"{len(source.prompts)} prompts"
        stats = getattr(getattr(source, "dataset", None), "stats", {})
        keys = [k for k in ("samples", "pairs", "dropped_overlong", "truncated", "loss_tokens") if k in stats]
        n = len(source.dataset) if hasattr(source, "dataset") else 0
        return f"{n} sequences (" + (", ".join(f"{k} {stats[k]}" for k in keys) or "no stats") + ")"
