"""Run metrics: one JSONL line and TensorBoard scalars per step, PNG curves at the end."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsWriter:
    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        """`resume_step`: continue a run resumed after that step: earlier rows are kept (and
        plotted), rows of the steps being redone are dropped."""
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.history: list[dict] = []
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / "metrics.jsonl"
            if resume_step is not None and path.exists():
                self.history = [r for r in _read_jsonl(path) if r.get("step", 0) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            os.replace(tmp, path)
            self._jsonl = open(path, "a")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)

    def log(self, step: int, **values: float) -> None:
        row = {"step": step, **values}
        self.history.append(row)
        if self.enabled:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def close(self, curves: tuple[str, ...] = ("loss",)) -> Path | None:
        """Flush and draw `curves` (one panel each) to curves.png; returns its path."""
        if not self.enabled:
            return None
        self._jsonl.close()
        self._tb.close()
        return plot_curves(self.history, curves, self.out_dir / "curves.png")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: what follows is not trusted
    return rows


def plot_curves(history: list[dict], keys: tuple[str, ...], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in row for row in history)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.5 * max(len(keys), 1), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in history if key in r and math.isfinite(r[key])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
