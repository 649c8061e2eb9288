"""What a training run writes about itself: metric files, TensorBoard events, plots.

Under the run's ``workdir`` (process 0 only):

* ``metrics.jsonl``: one JSON line per epoch (``epoch``, ``step``, ``size``,
  ``train_loss``, ``train_accuracy``, ``lr``, ``epoch_seconds``, ``train_compiles`` and,
  on evaluation epochs, ``test_top1``, ``test_top5``, ``test_loss``, ``test_count``),
  then ``{"final": {size: {"center" | "full": {...}}}}``; read back with
  :func:`read_metrics`.
* TensorBoard event files (``events.out.tfevents.*``) beside it, written through
  ``clu.metric_writers`` as the Flax examples do: every number of every line as a scalar
  at the line's training step, under the same name (``train_loss``, ``test_top1``; the
  final evaluation as ``final/{size}/{center|full}/{top1|top5|loss}``). View with
  ``tensorboard --logdir WORKDIR``.
* ``curves.png`` (:func:`plot_metrics`): loss and accuracy per epoch, final accuracy by
  test size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from spp_jax._io import atomic_write_text

__all__ = ["METRICS_FILE", "MetricsWriter", "plot_metrics", "read_metrics", "scalars"]

METRICS_FILE = "metrics.jsonl"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic | jax.Array):
        return np.asarray(x).item()
    return x


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record as ``{"a/b/c": float}``; other values are left out.

    >>> scalars({"train_loss": 1.5, "size": 48, "final": {"48": {"center": {"top1": 0.5}}}})
    {'train_loss': 1.5, 'size': 48.0, 'final/48/center/top1': 0.5}
    """
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
            continue
        value = _jsonable(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class MetricsWriter:
    """Appends records to ``workdir/metrics.jsonl`` and to TensorBoard event files.

    Only process 0 writes; on other processes every method does nothing.

    Args:
      workdir: the run's output directory (must exist).
      tensorboard: also write event files (needs ``clu``, part of the ``train`` extra).
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = jax.process_index() == 0
        self._summary = None
        if self.enabled and tensorboard:
            from clu import metric_writers

            # SummaryWriter rather than create_default_writer: the latter also logs every
            # scalar through absl, and the training loop logs its own line per epoch.
            self._summary = metric_writers.SummaryWriter(workdir)

    def write(self, record: Mapping[str, Any], step: int) -> None:
        """One JSON line, and each number of ``record`` as a scalar at ``step``."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(dict(record))) + "\n")
        if self._summary is not None:
            values = scalars(record)
            if values:
                self._summary.write_scalars(int(step), values)
            self._summary.flush()

    def truncate(self, step: int) -> None:
        """Keeps the records up to ``step`` (a resumed run's checkpoint), drops the later
        ones, any final evaluation and a line cut short by a crash: a run killed after
        its last checkpoint writes those again, so ``metrics.jsonl`` ends as an
        uninterrupted run's would. Rewrites the file atomically."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in _records(self.path) if "final" not in r and r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        """Flushes and closes the event file (the JSON file is closed after each line)."""
        if self._summary is not None:
            self._summary.close()
            self._summary = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` in order (``[]`` if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    return _records(path)


def _records(path: str) -> list[dict]:
    """The JSON lines of ``path``; a last line cut short by a crash is left out."""
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


def plot_metrics(workdir: str) -> str | None:
    """Writes ``workdir/curves.png``: loss and accuracy per epoch, final accuracy by size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    epochs = [r for r in records if "epoch" in r]
    if not epochs:
        return None
    finals = [r["final"] for r in records if "final" in r]
    fig, axes = plt.subplots(1, 3 if finals else 2, figsize=(15 if finals else 10, 4))
    x = [r["epoch"] for r in epochs]
    axes[0].plot(x, [r["train_loss"] for r in epochs], marker="o", label="train loss")
    if any("test_loss" in r for r in epochs):
        ex = [r for r in epochs if "test_loss" in r]
        axes[0].plot(
            [r["epoch"] for r in ex], [r["test_loss"] for r in ex], marker="s", label="test loss"
        )
    axes[0].set_xlabel("epoch")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(x, [r["train_accuracy"] for r in epochs], marker="o", label="train top-1")
    if any("test_top1" in r for r in epochs):
        ex = [r for r in epochs if "test_top1" in r]
        axes[1].plot(
            [r["epoch"] for r in ex],
            [r["test_top1"] for r in ex],
            marker="s",
            label="test top-1 (centre crop)",
        )
    for r in epochs:
        axes[1].annotate(
            str(r["size"]),
            (r["epoch"], r["train_accuracy"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
        )
    axes[1].set_xlabel("epoch (labels: training size)")
    axes[1].set_title("accuracy")
    axes[1].legend()
    if finals:
        final = finals[-1]
        sizes = list(final)
        pos = np.arange(len(sizes))
        axes[2].bar(
            pos - 0.2, [final[s]["center"]["top1"] for s in sizes], 0.4, label="centre crop"
        )
        if all("full" in final[s] for s in sizes):
            axes[2].bar(
                pos + 0.2, [final[s]["full"]["top1"] for s in sizes], 0.4, label="full image"
            )
        axes[2].set_xticks(pos, sizes)
        axes[2].set_xlabel("test size")
        axes[2].set_title("final test top-1")
        axes[2].legend()
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
