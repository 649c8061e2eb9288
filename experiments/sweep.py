"""Classification sweep: a grid of (config, overrides) x seeds, with intervals over seeds.

Run (from the repository root; grids in ``experiments/grids.py``)::

    python experiments/sweep.py --grid paper --workdir runs/paper            # everything
    python experiments/sweep.py --grid paper --workdir runs/paper --dry-run  # what would run
    python experiments/sweep.py --grid paper --workdir runs/paper --only nospp single
    python experiments/sweep.py --grid paper --report-only                   # tables, plots
    python experiments/sweep.py --grid paper --report-only --readme README.md  # and README

Compute: see ``experiments/grids.py`` (``paper``: 25 runs of 48 epochs, about 7.5 hours
on 2 CPU cores; ``tiny``: 2 runs of seconds). ``--dry-run`` prints the estimate for the
runs still to do. ``--jobs N`` runs N at once (for a machine with cores to spare: every run
already uses all cores it sees). The runs share a persistent XLA compilation cache
(``--xla-cache``, default ``WORKDIR/xla_cache``), so a variant's later seeds skip
compiling.

**Each run** is ``python -m spp_jax train --config CONFIG --workdir WORKDIR/NAME/seedS
--set seed=S --set KEY=VALUE ...`` (:func:`spp_jax.train.train_and_evaluate`) in a
subprocess of its own, so every run starts with fresh JAX state and a crash loses only
that run. Its output goes to ``RUN_DIR/train.log``; ``RUN_DIR/sweep.json`` names the
variant, config, seed and overrides (checked on every later invocation: a run directory
made for other settings is an error, never reused) and the seconds spent on it.

**Resuming.** A run is finished when the last line of ``RUN_DIR/metrics.jsonl`` is the
final evaluation (``{"final": ..., "metrics": ...}``); finished runs are not run again.
Any other run is started (again): ``train_and_evaluate`` resumes from the run's latest
checkpoint, so an interrupted sweep loses at most an epoch per run, and a run whose final
line was deleted only evaluates again. The results file is the durable record (run
directories are scratch, ignored by git): a run of the grid that has a record in
``--results`` and no run directory counts as finished, and its record is kept, so a sweep
continues on a fresh checkout from the committed records. A failed run is retried
``--retries`` times (from its checkpoints); the sweep goes on with the other runs and
exits 1 if any failed.

**Results** (``--results``, default ``experiments/results/classification.json`` for the
``paper`` grid, ``classification_GRID.json`` for the others): a JSON list with one record
per finished run of the grid found under ``--workdir`` (every ``seedS`` directory, not
only this invocation's ``--seeds``), in grid order::

    {"name": "single_30bin", "config": "single", "seed": 0,
     "overrides": {"eval_sizes": [64, ...], "model.levels": [4, 3, 2, 1]},
     "metrics": {"center_64": 0.61, "full_64": 0.66, ..., "center_176": ..., ...},
     "seconds": 241.3, "num_epochs": 16, "curve": [[2, 0.41], [4, 0.55], ...],
     "last_quarter_range": 0.008, "converged": true,
     "commit": "88a03ca...", "cpu_model": "AMD EPYC", "cpu_isa": "avx2", "cpu_cores": 2,
     "cpu_load_1min": 0.4, "grid": "paper", "run_dir": "/abs/path/single_30bin/seed0"}

``metrics`` is top-1 in [0, 1] on the test split, ``{mode}_{size}`` for mode ``center``
(centre crop) and ``full`` (full image; SPP heads only) at every test size of the run's
``eval_sizes``: the ``"metrics"`` of the run's last ``metrics.jsonl`` line
(:func:`spp_jax.train.flat_metrics`), so any record can be checked by re-running
``spp-jax train --config CONFIG --set seed=SEED`` with its overrides. ``seconds``: wall
time of the run's ``spp-jax train`` processes, summed over attempts. ``curve``: the
centre-crop test top-1 of every evaluation during training (``eval_every_epochs``);
``converged``: its range over the last quarter of the epochs is at most
``CONVERGED_RANGE`` (1 point). ``commit`` and ``cpu_*``: the checkout, CPU and load of
the attempt that finished the run (:func:`provenance`): float results differ between
CPUs, so a record says where it was made.

A ``multiview`` variant's finished run is also scored with multi-view testing
(``experiments/benchmarks/multiview.py``: 1, 10 and 18 views, from the feature map and
through the whole network, into ``RUN_DIR/multiview.json``), and its record's metrics
gain ``fmap{V}_{S}`` and ``whole{V}_{S}``. The records are written after every finished
run, so a stopped sweep keeps them.

**Report** (:func:`write_report`, also ``--report-only``, which reads the JSON and runs
nothing), beside the JSON: ``classification.md`` (mean and standard deviation over seeds
per variant, metric and test size; for each comparison of the grid the paired per-seed
differences ``a - b``: mean, standard deviation and a 95 % t-interval),
``classification_by_size.png`` (top-1 against test size, mean +- std over seeds: the
scale-robustness curves) and ``classification_differences.png`` (the paired differences
with their intervals).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: experiments/ is on the path, not the repo
    sys.path.insert(0, str(REPO))

from experiments import grids as grids_lib  # noqa: E402
from experiments.grids import Grid, Variant  # noqa: E402
from spp_jax._cpu import tune  # noqa: E402

RESULTS_DIR = REPO / "experiments" / "results"
SWEEP_FILE = "sweep.json"
MULTIVIEW_FILE = "multiview.json"
MULTIVIEW_SCRIPT = REPO / "experiments" / "benchmarks" / "multiview.py"
LOG_FILE = "train.log"
XLA_CACHE = "xla_cache"
METRICS_FILE = "metrics.jsonl"
MODES = ("center", "full")
MODE_TITLES = {"center": "centre crop", "full": "full image"}

_print_lock = threading.Lock()


def say(*parts: Any) -> None:
    with _print_lock:
        print(*parts, flush=True)


# ------------------------------------------------------------------------------ runs


def format_value(value: Any) -> str:
    """``value`` as ``spp-jax train --set KEY=VALUE`` reads it back (a Python literal,
    or a bare string).

    >>> format_value((4, 3, 2, 1)), format_value([112]), format_value("random")
    ('(4, 3, 2, 1)', '(112,)', 'random')
    >>> format_value("None"), format_value(0.5)
    ("'None'", '0.5')
    """
    if isinstance(value, str):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
        return repr(value)
    if isinstance(value, list | tuple):
        return repr(tuple(value))
    return repr(value)


def jsonable(overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(overrides))


@dataclasses.dataclass(frozen=True)
class Run:
    variant: Variant
    seed: int
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.variant.name,
            "config": self.variant.config,
            "seed": self.seed,
            "overrides": jsonable(self.variant.overrides),
        }

    def train_args(self) -> list[str]:
        """``train --config ... --workdir ... --set seed=S --set KEY=VALUE ...``."""
        sets = [f"seed={self.seed}"]
        sets += [f"{k}={format_value(v)}" for k, v in self.variant.overrides.items()]
        args = ["train", "--config", self.variant.config, "--workdir", str(self.run_dir)]
        for s in sets:
            args += ["--set", s]
        return args

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", "spp_jax", *self.train_args()]


def plan(grid: Grid, workdir: str | os.PathLike, seeds: Iterable[int], only=None) -> list[Run]:
    """The runs of ``grid`` (its variants named in ``only``, default all) x ``seeds``,
    seed-major: every variant's first seed before any second seed, so a partial sweep
    covers every variant early, and (``--jobs``) runs that compile the same programs do
    not start together (the persistent compilation cache then serves the later ones)."""
    names = grid.names()
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise SystemExit(f"--only {unknown}: grid {grid.name!r} has variants {names}")
    variants = [v for v in grid.variants if not only or v.name in only]
    root = Path(workdir).absolute()
    return [Run(v, int(s), root / v.name / f"seed{int(s)}") for s in seeds for v in variants]


class RunDirMismatchError(Exception):
    """A run directory holds a run of other settings (or not the sweep's)."""


def read_sweep_file(run_dir: Path) -> dict | None:
    path = run_dir / SWEEP_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def final_metrics(run_dir: str | os.PathLike) -> dict[str, float] | None:
    """The flat top-1 metrics of the last line of ``run_dir/metrics.jsonl`` if that line
    is the final evaluation, else ``None`` (the run is not finished).

    The line's ``"metrics"`` (written by ``train_and_evaluate``) must equal
    :func:`spp_jax.train.flat_metrics` of its ``"final"``; a line without ``"metrics"``
    (a run from before that key existed) gets it computed here.
    """
    from spp_jax.train import flat_metrics

    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    try:
        last = json.loads(lines[-1])
    except json.JSONDecodeError:  # a line cut short by a crash
        return None
    if "final" not in last:
        return None
    flat = flat_metrics(last["final"])
    if "metrics" in last and last["metrics"] != flat:
        raise ValueError(f"{path}: the last line's 'metrics' {last['metrics']} != {flat}")
    return flat


#: A run has converged when its test accuracy (centre crop at the crop size, evaluated
#: every ``eval_every_epochs``) varies by at most this much over the last quarter of
#: its epochs.
CONVERGED_RANGE = 0.01


def learning_curve(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """``(epoch, test top-1)`` of every evaluation during training, from the run's
    ``metrics.jsonl`` (the lines with ``test_top1``)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    curve = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "epoch" in rec and "test_top1" in rec:
            curve.append((int(rec["epoch"]), float(rec["test_top1"])))
    return curve


def convergence(curve: Sequence[tuple[int, float]], num_epochs: int) -> dict[str, Any]:
    """The range (max - min) of the test accuracy over the evaluations in the last
    quarter of the run (epochs above ``0.75 * num_epochs``) and whether it is at most
    CONVERGED_RANGE; None where fewer than two evaluations fall there."""
    tail = [acc for epoch, acc in curve if epoch > 0.75 * num_epochs]
    if len(tail) < 2:
        return {"last_quarter_range": None, "converged": None}
    spread = round(max(tail) - min(tail), 9)  # accuracies differ by whole test images
    return {"last_quarter_range": spread, "converged": spread <= CONVERGED_RANGE}


def run_state(run: Run) -> str:
    """``"done"``, ``"resume"`` (started, not finished) or ``"new"``.

    Raises:
      RunDirMismatchError: the directory was made for another variant, config, seed or
        overrides, or holds files without the sweep's ``sweep.json``.
    """
    if not run.run_dir.exists() or not any(run.run_dir.iterdir()):
        return "new"
    saved = read_sweep_file(run.run_dir)
    if saved is None:
        raise RunDirMismatchError(
            f"{run.run_dir} is not empty and has no {SWEEP_FILE}: not a run of this sweep; "
            "move it away or use another --workdir"
        )
    mine = run.identity()
    theirs = {k: saved.get(k) for k in mine}
    if theirs != mine:
        raise RunDirMismatchError(
            f"{run.run_dir} holds a run of {theirs}, the grid now asks for {mine}: delete "
            "the directory or use another --workdir"
        )
    return "done" if _trained(run) and _multiview_done(run) else "resume"


def _trained(run: Run) -> bool:
    return final_metrics(run.run_dir) is not None


def _multiview_done(run: Run) -> bool:
    return not run.variant.multiview or (run.run_dir / MULTIVIEW_FILE).exists()


def multiview_metrics(run_dir: str | os.PathLike) -> dict[str, float]:
    """Top-1 of the run's multi-view test (``RUN_DIR/multiview.json``, written by
    ``experiments/benchmarks/multiview.py``) as flat metrics: ``fmap{V}_{S}`` (V views
    pooled from the feature map, images of short side S) and ``whole{V}_{S}`` (the same
    views cropped and run through the whole network); ``{}`` without that file."""
    path = Path(run_dir) / MULTIVIEW_FILE
    if not path.exists():
        return {}
    out = {}
    for row in json.loads(path.read_text())["rows"]:
        out[f"fmap{row['views']}_{row['size']}"] = float(row["feature_map"]["top1"])
        out[f"whole{row['views']}_{row['size']}"] = float(row["whole_net"]["top1"])
    return out


def provenance() -> dict[str, Any]:
    """What a run's numbers depend on besides its config and seed: the checkout's commit
    (``+dirty`` with uncommitted changes), the CPU model, its vector ISA, the cores and
    the 1-minute load average when the run started (float results differ between CPUs)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = tune.cpu_description()
    return {"commit": commit, **{f"cpu_{k}": v for k, v in cpu.items()}}


def _update_sweep_file(
    run: Run, seconds: float, returncode: int, started: dict[str, Any] | None = None
) -> None:
    saved = read_sweep_file(run.run_dir) or {**run.identity(), "seconds": 0.0, "attempts": []}
    saved["seconds"] = float(saved.get("seconds", 0.0)) + seconds
    saved.setdefault("attempts", []).append(
        {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": seconds,
            "rc": returncode,
            **(started or {}),
        }
    )
    (run.run_dir / SWEEP_FILE).write_text(json.dumps(saved, indent=2) + "\n")


def subprocess_env(xla_cache: str | os.PathLike | None = None) -> dict[str, str]:
    """This process's environment, with this checkout first on ``PYTHONPATH`` and, if
    the environment names none, ``xla_cache`` as JAX's persistent compilation cache
    (``JAX_COMPILATION_CACHE_DIR``): the runs of a variant compile the same programs,
    so its second and third seeds load them instead."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")
    if xla_cache and "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = str(Path(xla_cache).absolute())
    return env


def _logged(cmd: list[str], run: Run, env) -> int:
    """Runs ``cmd`` from the repository root, its output appended to the run's log."""
    with open(run.run_dir / LOG_FILE, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else subprocess_env(),
            cwd=REPO,
            check=False,
        )
    return proc.returncode


def multiview_command(run: Run, python: str = sys.executable) -> list[str]:
    """Scores the run's checkpoint with 1, 10 and 18 views, both ways, on the whole
    test split, into ``RUN_DIR/multiview.json``."""
    out = run.run_dir / MULTIVIEW_FILE
    return [python, str(MULTIVIEW_SCRIPT), "--workdir", str(run.run_dir), "--out", str(out)]


def execute(run: Run, *, python: str = sys.executable, env=None) -> bool:
    """Runs ``spp-jax train`` for ``run`` in a subprocess (unless it has finished), then,
    for a ``multiview`` variant, its multi-view test; True if both finished."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if read_sweep_file(run.run_dir) is None:
        (run.run_dir / SWEEP_FILE).write_text(
            json.dumps({**run.identity(), "seconds": 0.0, "attempts": []}, indent=2) + "\n"
        )
    rc = 0
    if not _trained(run):
        started = provenance()
        t0 = time.perf_counter()
        rc = _logged(run.command(python), run, env)
        seconds = time.perf_counter() - t0
        _update_sweep_file(run, seconds, rc, started)
    else:
        seconds = 0.0
    if rc == 0 and _trained(run) and not _multiview_done(run):
        t0 = time.perf_counter()
        rc = _logged(multiview_command(run, python), run, env)
        seconds += time.perf_counter() - t0
    finished = rc == 0 and _trained(run) and _multiview_done(run)
    if not finished:
        say(
            f"  {run.label}: FAILED (exit {rc}) after {seconds:.0f} s; see {run.run_dir / LOG_FILE}"
        )
    else:
        say(f"  {run.label}: done in {seconds:.0f} s")
    return finished


def recorded_runs(path: str | os.PathLike, grid: Grid) -> dict[str, dict]:
    """The records of ``grid``'s runs in the results file ``path``, by run label
    (``NAME/seedS``); ``{}`` without the file. A record whose variant the grid no longer
    has, or whose config or overrides differ from the grid's, is left out (its run is
    then run again)."""
    path = Path(path)
    if not path.exists():
        return {}
    names = {v.name: v for v in grid.variants}
    out = {}
    for record in json.loads(path.read_text()):
        variant = names.get(record.get("name"))
        if variant is None or record.get("grid", grid.name) != grid.name:
            continue
        run = Run(variant, int(record["seed"]), Path())
        if {k: record.get(k) for k in run.identity()} == run.identity():
            out[run.label] = record
    return out


def run_sweep(
    grid: Grid,
    workdir: str | os.PathLike,
    *,
    seeds: Sequence[int] | None = None,
    only: Sequence[str] | None = None,
    jobs: int = 1,
    retries: int = 1,
    dry_run: bool = False,
    python: str = sys.executable,
    xla_cache: str | os.PathLike | None = "",
    on_finished: Callable[[], None] | None = None,
    recorded: Mapping[str, dict] | None = None,
) -> dict[str, list[str]]:
    """Runs the unfinished runs of ``grid`` x ``seeds`` under ``workdir``.

    ``recorded``: records by run label (:func:`recorded_runs`); a run among them without a
    run directory counts as finished.

    ``xla_cache``: the runs' compilation cache (:func:`subprocess_env`); ``""`` (the
    default) is ``WORKDIR/xla_cache``, ``None`` none. ``on_finished`` is called (one call
    at a time) after every run that finishes, e.g. to write the records so far.

    Returns:
      ``{"executed": [...], "skipped": [...], "failed": [...], "planned": [...]}`` of run
      labels (``NAME/seedS``): executed and finished, already finished, failed (or a
      run directory of other settings), and (``dry_run``) would run.
    """
    runs = plan(grid, workdir, grid.seeds if seeds is None else seeds, only)
    out: dict[str, list[str]] = {"executed": [], "skipped": [], "failed": [], "planned": []}
    todo: list[Run] = []
    for run in runs:
        try:
            state = run_state(run)
        except RunDirMismatchError as e:
            say(f"  {run.label}: {e}")
            out["failed"].append(run.label)
            continue
        if state == "new" and run.label in (recorded or {}):
            state = "done"
        if state == "done":
            out["skipped"].append(run.label)
        else:
            todo.append(run)
        if dry_run:
            action = {"done": "finished, skipped", "resume": "resume", "new": "run"}[state]
            say(f"  {run.label}: {action}")
            if state != "done":
                say(f"    {shlex.join(run.command(python))}")
    minutes = sum(r.variant.minutes for r in todo)
    say(
        f"grid {grid.name}: {len(runs)} run(s), {len(out['skipped'])} finished, "
        f"{len(todo)} to run (estimate {minutes:.0f} min on 2 CPU cores)"
    )
    if dry_run:
        out["planned"] = [r.label for r in todo]
        return out
    if xla_cache == "":
        xla_cache = Path(workdir) / XLA_CACHE
    env = subprocess_env(xla_cache)
    finished_lock = threading.Lock()

    def attempt(run: Run) -> bool:
        for i in range(1 + max(0, retries)):
            if i:
                say(f"  {run.label}: retry {i} of {retries} (resumes from its checkpoints)")
            else:
                say(f"  {run.label}: started -> {run.run_dir}")
            if execute(run, python=python, env=env):
                if on_finished is not None:
                    with finished_lock:
                        on_finished()
                return True
        return False

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(attempt, todo))
    for run, ok in zip(todo, results, strict=True):
        out["executed" if ok else "failed"].append(run.label)
    return out


def collect_records(
    grid: Grid, workdir: str | os.PathLike, recorded: Mapping[str, dict] | None = None
) -> list[dict]:
    """One record per finished run of ``grid`` under ``workdir`` (every ``seedS``
    directory of every variant), plus the ``recorded`` runs (:func:`recorded_runs`) that
    have no run directory there, in grid order, then by seed."""
    root = Path(workdir).absolute()
    recorded = recorded or {}
    records = []
    for variant in grid.variants:
        vdir = root / variant.name
        on_disk = set()
        if vdir.is_dir():
            on_disk = {
                int(p.name[4:]) for p in vdir.iterdir() if p.name.startswith("seed") and p.is_dir()
            }
        kept = {
            int(r["seed"]): r
            for label, r in recorded.items()
            if label.split("/")[0] == variant.name and int(r["seed"]) not in on_disk
        }
        for seed in sorted(on_disk | set(kept)):
            if seed in kept:
                records.append(kept[seed])
                continue
            run = Run(variant, seed, vdir / f"seed{seed}")
            try:
                if run_state(run) != "done":
                    continue
            except RunDirMismatchError:
                continue
            saved = read_sweep_file(run.run_dir) or {}
            curve = learning_curve(run.run_dir)
            try:
                saved_config = json.loads((run.run_dir / "config.json").read_text())
                num_epochs = int(saved_config["num_epochs"])
            except (OSError, ValueError, KeyError):
                num_epochs = max((epoch for epoch, _ in curve), default=0)
            records.append(
                {
                    "name": variant.name,
                    "config": variant.config,
                    "seed": seed,
                    "overrides": jsonable(variant.overrides),
                    "metrics": {
                        **(final_metrics(run.run_dir) or {}),
                        **multiview_metrics(run.run_dir),
                    },
                    "seconds": saved.get("seconds"),
                    "num_epochs": num_epochs,
                    "curve": [[epoch, acc] for epoch, acc in curve],
                    **convergence(curve, num_epochs),
                    # The provenance of the attempt that finished the run.
                    **{
                        k: v
                        for k, v in (saved.get("attempts") or [{}])[-1].items()
                        if k == "commit" or k.startswith("cpu_")
                    },
                    "grid": grid.name,
                    "run_dir": str(run.run_dir),
                }
            )
    return records


def default_results_path(grid_name: str) -> Path:
    stem = "classification" if grid_name == "paper" else f"classification_{grid_name}"
    return RESULTS_DIR / f"{stem}.json"


def write_results(records: list[dict], path: str | os.PathLike) -> Path:
    """Writes the records atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- statistics

# Two-sided 95 % quantiles t_{0.975, df} for df = 1..30 (for when SciPy is missing).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom: SciPy's, else :data:`_T975`
    (beyond 30: ``1.96 + 2.37 / df``, the first Cornish-Fisher term, within 0.003)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    try:
        from scipy import stats
    except ImportError:
        return _T975[df - 1] if df <= len(_T975) else 1.959964 + 2.37 / df
    return float(stats.t.ppf(0.975, df))


def describe(values: Sequence[float]) -> dict[str, Any]:
    """``n``, ``mean``, ``std`` (ddof 1; None for n < 2) and the 95 % t-interval of the
    mean (``ci95``: ``[low, high]``, None for n < 2)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def split_metric(key: str) -> tuple[str, int]:
    """``"center_112"`` -> ``("center", 112)``."""
    mode, _, size = key.rpartition("_")
    return mode, int(size)


def _metric_order(key: str) -> tuple[int, int]:
    mode, size = split_metric(key)
    return (MODES.index(mode) if mode in MODES else len(MODES), size)


def summarize(records: list[dict], grid: Grid | None = None) -> dict[str, Any]:
    """Per variant and metric: :func:`describe` over seeds (plus the per-seed values);
    per comparison of ``grid``: :func:`describe` of the paired differences ``a - b``
    over the seeds both have (plus those seeds and differences)."""
    names = [v.name for v in grid.variants] if grid else []
    names += [r["name"] for r in records if r["name"] not in names]
    by_name: dict[str, dict[int, dict[str, float]]] = {n: {} for n in names}
    for r in records:
        by_name[r["name"]][int(r["seed"])] = r["metrics"]
    variants = {}
    for name in names:
        runs = by_name[name]
        keys = sorted({k for m in runs.values() for k in m}, key=_metric_order)
        metrics = {}
        for key in keys:
            seeds = sorted(s for s, m in runs.items() if key in m)
            stats = describe([runs[s][key] for s in seeds])
            metrics[key] = {**stats, "seeds": seeds, "values": [runs[s][key] for s in seeds]}
        seconds = [r["seconds"] for r in records if r["name"] == name and r.get("seconds")]
        variants[name] = {
            "seeds": sorted(runs),
            "metrics": metrics,
            "seconds": describe(seconds)["mean"],
        }
    comparisons = []
    for c in grid.comparisons if grid else ():
        a, b = by_name.get(c.a, {}), by_name.get(c.b, {})
        seeds = sorted(s for s in a if s in b and c.metric in a[s] and c.b_metric in b[s])
        diffs = [a[s][c.metric] - b[s][c.b_metric] for s in seeds]
        comparisons.append(
            {**dataclasses.asdict(c), "metric_b": c.b_metric, "seeds": seeds, "diffs": diffs}
            | describe(diffs)
        )
    return {"variants": variants, "comparisons": comparisons}


#: A paired difference whose 95 % interval contains 0 and is narrower than this on
#: each side says "no difference beyond this margin" rather than "not resolved".
EQUIVALENCE_MARGIN = 0.02

VERDICT_COLORS = {"holds": "tab:green", "reversed": "tab:red", "no difference": "tab:blue"}


def verdict(stats: dict) -> str:
    """What a paired difference's 95 % interval says of the claim ``a > b``:

    * ``holds``: the interval lies above 0;
    * ``reversed``: it lies below 0;
    * ``no difference``: it contains 0 and its half-width is under
      :data:`EQUIVALENCE_MARGIN` (no difference beyond 2 points on this benchmark);
    * ``not resolved``: it contains 0 and is wider (more seeds would narrow it).

    >>> verdict({"n": 5, "ci95": [0.01, 0.05]}), verdict({"n": 5, "ci95": [-0.01, 0.015]})
    ('holds', 'no difference')
    >>> verdict({"n": 5, "ci95": [-0.05, 0.01]}), verdict({"n": 5, "ci95": [-0.06, -0.01]})
    ('not resolved', 'reversed')
    """
    if stats["n"] == 0:
        return "no data"
    if stats["ci95"] is None:
        return "n < 2"
    lo, hi = stats["ci95"]
    if lo > 0:
        return "holds"
    if hi < 0:
        return "reversed"
    if (hi - lo) / 2 < EQUIVALENCE_MARGIN:
        return "no difference"
    return "not resolved"


# ------------------------------------------------------------------------------ report


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}"


def _mean_std(stats: dict) -> str:
    if not stats or stats["n"] == 0:
        return ""
    if stats["std"] is None:
        return f"{_pct(stats['mean'])} (n=1)"
    return f"{_pct(stats['mean'])} ± {_pct(stats['std'])}"


def _overrides_text(overrides: dict, common: dict) -> str:
    items = [f"`{k}={format_value(v)}`" for k, v in overrides.items() if common.get(k) != v]
    return " ".join(items) or "-"


def markdown(records: list[dict], summary: dict, grid: Grid | None, source: str) -> str:
    seeds = sorted({int(r["seed"]) for r in records})
    # Overrides every record shares (e.g. eval_sizes) are stated once.
    common = dict(records[0]["overrides"]) if records else {}
    for r in records[1:]:
        common = {k: v for k, v in common.items() if r["overrides"].get(k) == v}
    lines = [
        f"# Classification sweep{f': grid `{grid.name}`' if grid else ''}",
        "",
        f"Generated from `{source}` ({len(records)} runs; seeds "
        f"{', '.join(map(str, seeds))}) by `experiments/sweep.py`. Top-1 accuracy (%) on the "
        "test split: mean ± standard deviation over seeds (ddof 1). Each run is "
        "`spp-jax train --config CONFIG --set seed=SEED` with its overrides; the last line "
        "of its `metrics.jsonl` holds the same `metrics` as its record.",
    ]
    if common:
        lines += ["", "Overrides of every run: " + _overrides_text(common, {}) + "."]
    lines += [
        "",
        "## Variants",
        "",
        "| variant | config | overrides | seeds | min/run | description |",
        "|---|---|---|---|---|---|",
    ]
    first = {r["name"]: r for r in reversed(records)}
    for name, v in summary["variants"].items():
        if not v["seeds"]:
            continue
        desc = ""
        if grid is not None and name in grid.names():
            desc = grid.variant(name).description
        minutes = "" if v["seconds"] is None else f"{v['seconds'] / 60:.1f}"
        lines.append(
            f"| {name} | {first[name]['config']} | "
            f"{_overrides_text(first[name]['overrides'], common)} | "
            f"{', '.join(map(str, v['seeds']))} | {minutes} | {desc} |"
        )
    for mode in MODES:
        sizes = sorted(
            {
                split_metric(k)[1]
                for v in summary["variants"].values()
                for k in v["metrics"]
                if split_metric(k)[0] == mode
            }
        )
        if not sizes:
            continue
        lines += [
            "",
            f"## {MODE_TITLES[mode].capitalize()}: top-1 (%) by test size",
            "",
            "| variant | " + " | ".join(map(str, sizes)) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for name, v in summary["variants"].items():
            cells = [_mean_std(v["metrics"].get(f"{mode}_{s}", {})) for s in sizes]
            if any(cells):
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        lines += [
            "",
            "## Paired differences (a - b, percentage points, paired by seed)",
            "",
            "95 % t-interval of the mean difference over seeds (t with n - 1 degrees of "
            "freedom). *Verdict*: **holds** (the interval lies above 0), **reversed** (below "
            "0), **no difference** (it contains 0 and its half-width is under "
            f"{100 * EQUIVALENCE_MARGIN:.0f} points), **not resolved** (it contains 0 and is "
            "wider).",
            "",
            "| claim | a | b | n | mean | std | 95 % interval | per seed | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in summary["comparisons"]:
            a = f"{c['a']} {c['metric']}"
            b = f"{c['b']} {c['metric_b']}"
            ci = "" if c["ci95"] is None else f"[{_pct(c['ci95'][0])}, {_pct(c['ci95'][1])}]"
            per_seed = ", ".join(
                f"{s}: {_pct(d)}" for s, d in zip(c["seeds"], c["diffs"], strict=True)
            )
            lines.append(
                f"| {c['label']} | {a} | {b} | {c['n']} | {_pct(c['mean'])} | "
                f"{_pct(c['std'])} | {ci} | {per_seed} | {verdict(c)} |"
            )
    return "\n".join(lines) + "\n"


def plot_by_size(summary: dict, path: Path) -> Path:
    """Top-1 against test size per variant, mean ± std over seeds; one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODES), figsize=(6 * len(MODES), 4.5), sharey=True)
    for ax, mode in zip(axes, MODES, strict=True):
        all_sizes: set[int] = set()
        for name, v in summary["variants"].items():
            rows = sorted(
                (split_metric(k)[1], s)
                for k, s in v["metrics"].items()
                if split_metric(k)[0] == mode and s["n"]
            )
            if not rows:
                continue
            sizes = [size for size, _ in rows]
            all_sizes.update(sizes)
            ax.errorbar(
                sizes,
                [100 * s["mean"] for _, s in rows],
                yerr=[100 * (s["std"] or 0.0) for _, s in rows],
                marker="o",
                capsize=3,
                label=f"{name} (n={max(s['n'] for _, s in rows)})",
            )
        ax.set_title(MODE_TITLES[mode])
        ax.set_xlabel("test size (crop side / image short side, px)")
        if all_sizes:
            ax.set_xticks(sorted(all_sizes))
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%), mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_differences(summary: dict, path: Path) -> Path:
    """The paired differences per comparison with their 95 % t-intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = summary["comparisons"]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.5 * max(1, len(comps))))
    for i, c in enumerate(comps):
        y = len(comps) - 1 - i
        if c["n"] == 0:
            ax.text(0, y, "no data", va="center", fontsize=8)
            continue
        mean = 100 * c["mean"]
        err = None
        if c["ci95"] is not None:
            err = [[mean - 100 * c["ci95"][0]], [100 * c["ci95"][1] - mean]]
        color = VERDICT_COLORS.get(verdict(c), "tab:gray")
        ax.barh(y, mean, xerr=err, color=color, alpha=0.7, capsize=4)
        ax.plot([100 * d for d in c["diffs"]], [y] * len(c["diffs"]), "k.", markersize=4, zorder=3)
    ax.set_yticks(
        range(len(comps)), [f"{c['label']} (n={c['n']})" for c in reversed(comps)], fontsize=8
    )
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_xlabel(
        "a - b, top-1 percentage points (bar: mean, whiskers: 95 % t-interval, dots: seeds)"
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(records: list[dict], path: Path) -> Path | None:
    """Test top-1 (centre crop) against epoch, one panel per variant, a line per seed."""
    with_curves = [r for r in records if r.get("curve")]
    if not with_curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["name"] for r in with_curves))
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for r in (r for r in with_curves if r["name"] == name):
            epochs, accs = zip(*r["curve"], strict=True)
            flag = {True: "", False: " (not converged)", None: ""}[r.get("converged")]
            ax.plot(epochs, [100 * a for a in accs], marker=".", label=f"seed {r['seed']}{flag}")
        num_epochs = max(r.get("num_epochs") or 0 for r in with_curves if r["name"] == name)
        if num_epochs:
            ax.axvspan(0.75 * num_epochs, num_epochs, color="0.9", zorder=0)
        ax.set_title(name)
        ax.set_xlabel("epoch (shaded: the last quarter)")
        ax.set_ylabel("test top-1 (%), centre crop")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def convergence_markdown(records: list[dict]) -> str:
    """A table: per run, its last-quarter range and whether it converged."""
    rows = [r for r in records if r.get("curve")]
    if not rows:
        return ""
    lines = [
        "## Convergence",
        "",
        f"Range (max - min) of the centre-crop test top-1 over the evaluations in the last "
        f"quarter of each run; converged: at most {100 * CONVERGED_RANGE:.0f} point.",
        "",
        "| variant | seed | epochs | last evaluation (%) | last-quarter range (points) "
        "| converged |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = r.get("last_quarter_range")
        lines.append(
            f"| {r['name']} | {r['seed']} | {r.get('num_epochs', '')} | "
            f"{100 * r['curve'][-1][1]:.1f} | "
            f"{'' if spread is None else f'{100 * spread:.1f}'} | "
            f"{ {True: 'yes', False: 'no', None: 'n/a'}[r.get('converged')] } |"
        )
    return "\n".join(lines) + "\n"


def write_report(results: str | os.PathLike, grid: Grid | None = None) -> list[Path]:
    """Writes the markdown table and the plots beside ``results`` (the JSON list of
    records), from that file alone. ``grid`` (for the comparisons and descriptions)
    defaults to the one the records name.

    Returns:
      The paths written: ``STEM.md``, ``STEM_by_size.png``, ``STEM_differences.png``
      (if the grid has comparisons) and ``STEM_curves.png`` (if the runs evaluated
      during training: the learning curves).
    """
    results = Path(results)
    records = json.loads(results.read_text())
    if grid is None:
        names = {r.get("grid") for r in records}
        if len(names) == 1 and next(iter(names)) in grids_lib.GRIDS:
            grid = grids_lib.get_grid(next(iter(names)))
    summary = summarize(records, grid)
    stem = results.with_suffix("")
    md = Path(f"{stem}.md")
    report = markdown(records, summary, grid, results.name)
    md.write_text(report + "\n" + convergence_markdown(records))
    paths = [md, plot_by_size(summary, Path(f"{stem}_by_size.png"))]
    if summary["comparisons"]:
        paths.append(plot_differences(summary, Path(f"{stem}_differences.png")))
    curves = plot_curves(records, Path(f"{stem}_curves.png"))
    if curves is not None:
        paths.append(curves)
    with md.open("a") as f:
        f.write("\n## Plots\n\n")
        for p in paths[1:]:
            f.write(f"![{p.stem}]({p.name})\n\n")
    return paths


README_BEGIN = (
    "<!-- BEGIN {tool} {grid}: generated by experiments/{tool}.py --readme; do not edit -->"
)
README_END = "<!-- END {tool} {grid} -->"


def splice_readme(
    readme: str | os.PathLike, report: str | os.PathLike, grid: str, tool: str = "sweep"
) -> Path:
    """Replaces the text between ``README_BEGIN`` and ``README_END`` (for ``grid`` and
    the script ``experiments/TOOL.py`` that writes the report) in
    the markdown file ``readme`` with the report markdown ``report``: its title dropped,
    its ``##`` headings one level below the heading that encloses the markers (``##``
    without one), its image links made relative to ``readme``.

    Raises:
      ValueError: the README lacks the two marker lines.
    """
    readme, report = Path(readme), Path(report)
    begin, end = (m.format(grid=grid, tool=tool) for m in (README_BEGIN, README_END))
    text = readme.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{readme} has no marker lines {begin!r} ... {end!r}")
    prefix = os.path.relpath(report.parent, readme.parent)
    head, _, rest = text.partition(begin)
    enclosing = [len(m) for m in re.findall(r"^(#{1,6}) ", head, flags=re.MULTILINE)]
    depth = min(6, enclosing[-1] + 1) if enclosing else 2
    body = []
    for line in report.read_text().splitlines():
        if line.startswith("# "):
            continue
        if line.startswith("## "):
            line = "#" * depth + " " + line[3:]
        if line.startswith("![") and "](" in line:
            alt, _, target = line.partition("](")
            line = f"{alt}]({prefix}/{target}"
        body.append(line)
    _, _, tail = rest.partition(end)
    readme.write_text(head + begin + "\n" + "\n".join(body).strip() + "\n" + end + tail)
    return readme


# -------------------------------------------------------------------------------- main


def _grid_name(grid: Grid | None, results: Path) -> str:
    if grid is not None:
        return grid.name
    names = {r.get("grid") for r in json.loads(results.read_text())}
    return str(names.pop()) if len(names) == 1 else "paper"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(grids_lib.GRIDS), help="the grid to run")
    parser.add_argument("--workdir", help="run directories: WORKDIR/VARIANT/seedS")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the grid's")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants")
    parser.add_argument("--results", help="the JSON of records (default: see the docstring)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--retries", type=int, default=1, help="per failed run (default 1)")
    parser.add_argument("--python", default=sys.executable, help="for the runs' subprocesses")
    parser.add_argument(
        "--xla-cache",
        default="",
        help="JAX compilation cache of the runs (default WORKDIR/xla_cache; 'none': no "
        "cache); JAX_COMPILATION_CACHE_DIR in the environment wins",
    )
    parser.add_argument(
        "--readme",
        help="also splice the report into this markdown file, between its marker lines "
        "(README_BEGIN / README_END for the grid)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would run; run none")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="regenerate the markdown and plots from --results; run nothing",
    )
    args = parser.parse_args(argv)
    grid = grids_lib.get_grid(args.grid) if args.grid else None
    results = Path(args.results or default_results_path(args.grid or "paper"))
    if args.report_only:
        if not results.exists():
            parser.error(f"--report-only: {results} does not exist")
        for p in write_report(results, grid):
            say(f"wrote {p}")
        if args.readme:
            name = _grid_name(grid, results)
            say(f"wrote {splice_readme(args.readme, results.with_suffix('.md'), name)}")
        return 0
    if grid is None or not args.workdir:
        parser.error("--grid and --workdir are required (except with --report-only)")

    recorded = recorded_runs(results, grid)

    def save_records() -> None:
        """The records of every finished run so far: a stopped sweep keeps them."""
        write_results(collect_records(grid, args.workdir, recorded), results)

    out = run_sweep(
        grid,
        args.workdir,
        seeds=args.seeds,
        only=args.only,
        jobs=args.jobs,
        retries=args.retries,
        dry_run=args.dry_run,
        python=args.python,
        xla_cache=None if args.xla_cache == "none" else args.xla_cache,
        on_finished=save_records,
        recorded=recorded,
    )
    if args.dry_run:
        return 0
    records = collect_records(grid, args.workdir, recorded)
    write_results(records, results)
    say(f"wrote {results} ({len(records)} records)")
    for p in write_report(results, grid):
        say(f"wrote {p}")
    if args.readme:
        say(f"wrote {splice_readme(args.readme, results.with_suffix('.md'), grid.name)}")
    say(
        f"executed {len(out['executed'])} run(s), skipped {len(out['skipped'])} finished, "
        f"{len(out['failed'])} failed" + (f": {', '.join(out['failed'])}" if out["failed"] else "")
    )
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
