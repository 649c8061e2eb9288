"""Detection over seeds: ``spp-jax detect-train`` run for several seeds, each Table-9 row
as mean and standard deviation over them.

Usage::

    python experiments/detection_seeds.py --workdir runs/det_seeds            # seeds 0, 1, 2
    python experiments/detection_seeds.py --workdir runs/det_seeds --seeds 3  # one more
    python experiments/detection_seeds.py --report-only --readme docs/detection.md
    # an ablation, under a name of its own, beside the default's rows:
    python experiments/detection_seeds.py --workdir runs/det_seeds --name KEY_VALUE \\
        --set KEY=VALUE --seeds 0

Each run is ``python -m spp_jax detect-train --config CONFIG --workdir WORKDIR/NAME/seedS
--set seed=S`` (and the ``--set`` overrides) in a subprocess, its output appended to
``WORKDIR/NAME/seedS/run.log``. The run's seed also seeds its backbone
(:func:`spp_jax.detection.stages.backbone_config`), so the spread over seeds is the whole
pipeline's. A finished run (its ``stages/eval.json``) is not run again; a stopped one
resumes at its first unfinished stage.

**Records** (``--results``, default ``experiments/results/detection_seeds.json``): one per
finished run, written after each, with the headline (``map_voc07``: the last line of the
run's ``metrics.jsonl``), every test row's VOC07 and area mAP, the backbone's test top-1,
fine-tuning's best validation mAP,
each stage's seconds, the wall seconds of this script's attempts, and where the numbers
come from (commit, CPU model and ISA, cores, 1-minute load when the run started, and the
:data:`ISA_LIMITS` variables set, which emulate a CPU with fewer vector instructions).

**Report** (also ``--report-only``): ``detection_seeds.md`` beside the JSON: per name,
the Table-9 rows at 1 and 5 scales as mean ± std over seeds with the range, then one line
per run; ``--readme FILE`` splices it between FILE's marker lines
(``sweep.README_BEGIN`` / ``README_END`` with tool ``detection_seeds`` and grid ``default``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: experiments/ is on the path, not the repo
    sys.path.insert(0, str(REPO))

from experiments import sweep  # noqa: E402

RESULTS = REPO / "experiments" / "results" / "detection_seeds.json"
DEFAULT_NAME = "default"
LOG_FILE = "run.log"
ATTEMPTS_FILE = "seeds_attempts.json"
#: Environment variables that make XLA, oneDNN and PyTorch use fewer vector instructions
#: than the CPU has (``XLA_FLAGS=--xla_cpu_max_isa=AVX2``, ...; ``SPP_JAX_CPU_MARCH`` for
#: spp_jax's own CPU kernels): another CPU's floats.
ISA_LIMITS = ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "SPP_JAX_CPU_MARCH")
README_MARKERS = {"grid": "default", "tool": "detection_seeds"}  # for sweep.splice_readme

#: The Table-9 rows the report shows, in order (the pipeline's variant names).
ROWS = (
    "fc7 + SVM, no fine-tuning",
    "ft fc7 + SVM",
    "ft fc7 + SVM + bbox",
    "ft softmax",
    "ft fc7 + SVM + bbox, fc6/fc7 SVD rank 128",
)
ROW_TITLES = {
    "fc7 + SVM, no fine-tuning": "fc7 + SVM, no fine-tuning",
    "ft fc7 + SVM": "fine-tuned fc7 + SVM",
    "ft fc7 + SVM + bbox": "fine-tuned fc7 + SVM + box regression",
    "ft softmax": "fine-tuned softmax (fc8)",
    "ft fc7 + SVM + bbox, fc6/fc7 SVD rank 128": "+ fc6/fc7 as rank-128 truncated SVDs",
}


def run_dir(workdir: str | os.PathLike, name: str, seed: int) -> Path:
    return Path(workdir) / name / f"seed{seed}"


def command(config: str, directory: Path, seed: int, sets: list[str]) -> list[str]:
    """The ``spp-jax detect-train`` command line of one run."""
    cmd = [sys.executable, "-m", "spp_jax", "detect-train", "--config", config]
    cmd += ["--workdir", str(directory), "--set", f"seed={seed}"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def finished(directory: Path) -> bool:
    return (directory / "stages" / "eval.json").exists()


def execute(config: str, directory: Path, seed: int, sets: list[str]) -> bool:
    """Runs (or resumes) one run unless it has finished; each attempt's wall seconds,
    exit status and provenance go to ``RUN_DIR/seeds_attempts.json``. True if finished."""
    if finished(directory):
        return True
    directory.mkdir(parents=True, exist_ok=True)
    attempts_path = directory / ATTEMPTS_FILE
    attempts = json.loads(attempts_path.read_text()) if attempts_path.exists() else []
    cmd = command(config, directory, seed, sets)
    started = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        **sweep.provenance(),
        "isa_limits": {k: os.environ[k] for k in ISA_LIMITS if k in os.environ},
    }
    t0 = time.perf_counter()
    with open(directory / LOG_FILE, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=sweep.subprocess_env(), cwd=REPO
        ).returncode
    attempts.append({**started, "seconds": time.perf_counter() - t0, "rc": rc})
    attempts_path.write_text(json.dumps(attempts, indent=2) + "\n")
    return rc == 0 and finished(directory)


def _last_json_line(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])


def record(name: str, config: str, seed: int, sets: list[str], directory: Path) -> dict:
    """The record of a finished run (see the module docstring)."""
    metrics = _last_json_line(directory / "metrics.jsonl")
    attempts_path = directory / ATTEMPTS_FILE
    attempts = json.loads(attempts_path.read_text()) if attempts_path.exists() else []
    stages = {
        p.stem: round(json.loads(p.read_text())["seconds"], 1)
        for p in sorted((directory / "stages").glob("*.json"))
    }
    finetuned = directory / "stages" / "finetune.json"
    best = json.loads(finetuned.read_text()).get("best", {}) if finetuned.exists() else {}
    final = sweep.final_metrics(directory / "backbone") or {}  # a trained-here backbone
    backbone_top1 = {k: final[k] for k in ("center_112", "full_112") if k in final}
    first = attempts[0] if attempts else {}
    return {
        "name": name,
        "config": config,
        "seed": seed,
        "overrides": sets,
        "map_voc07": metrics["map_voc07"],
        "map_area": metrics["map_area"],
        "main": metrics["main"],
        "table": {
            row: {"map_voc07": v["map_voc07"], "map_area": v["map_area"]}
            for row, v in metrics["table"].items()
        },
        "backbone_top1": backbone_top1,
        "validation_map": best.get("map"),  # fine-tuning's best (softmax, 1 scale)
        "stage_seconds": stages,
        "seconds": sum(a["seconds"] for a in attempts) if attempts else None,
        "attempts": len(attempts),
        "peak_memory_gib": metrics.get("peak_memory_gib"),
        **{k: first.get(k) for k in ("commit", "cpu_model", "cpu_isa", "cpu_cores")},
        "isa_limits": first.get("isa_limits") or {},
        "cpu_load_1min": first.get("cpu_load_1min"),
        "run_dir": str(directory.resolve()),
    }


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_record(path: Path, new: dict) -> None:
    """Adds ``new`` to the records at ``path``, replacing one of the same name and seed."""
    records = [
        r for r in load_records(path) if (r["name"], r["seed"]) != (new["name"], new["seed"])
    ]
    records.append(new)
    records.sort(key=lambda r: (r["name"] != DEFAULT_NAME, r["name"], r["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")


def _stat(values: list[float]) -> str:
    """``mean ± std (min-max)`` in %, or the one value for one run."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f} (one run)"
    d = sweep.describe(values)
    return (
        f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f} "
        f"({100 * min(values):.1f}-{100 * max(values):.1f})"
    )


def _isa(record: dict) -> str:
    """The CPU's vector ISA, and the limit the run was given, if any."""
    limits = record.get("isa_limits") or {}
    flags = limits.get("XLA_FLAGS", "")
    cap = next(
        (f.split("=", 1)[1] for f in flags.split() if f.startswith("--xla_cpu_max_isa=")), ""
    )
    cap = cap or limits.get("ONEDNN_MAX_CPU_ISA", "")
    return f"{record.get('cpu_isa')}" + (f", limited to {cap}" if cap else "")


def _table(runs: list[dict]) -> list[str]:
    """The Table-9 rows at 1 and 5 scales over ``runs``."""
    out = ["", "| method | 1 scale | 5 scales |", "|---|---|---|"]
    for row in ROWS:
        cells = []
        for n in (1, 5):
            key = f"{row}, {n} scale{'s' if n > 1 else ''}"
            values = [r["table"][key]["map_voc07"] for r in runs if key in r["table"]]
            cells.append(_stat(values) if len(values) == len(runs) else "-")
        out.append(f"| {ROW_TITLES[row]} | {cells[0]} | {cells[1]} |")
    return out


def markdown(records: list[dict], source: str) -> str:
    """The report (see the module docstring)."""
    out = [
        "# Detection over seeds",
        "",
        f"Generated from `{source}` by `experiments/detection_seeds.py`. Test split of "
        "`spp_scenes`, VOC07 mAP in %: mean ± standard deviation over seeds (ddof 1), the "
        "range in brackets. Each run is `spp-jax detect-train --config CONFIG --set "
        "seed=SEED` with its overrides; its seed also seeds its backbone.",
    ]
    names = list(dict.fromkeys(r["name"] for r in records))
    for name in names:
        runs = [r for r in records if r["name"] == name]
        seeds = ", ".join(str(r["seed"]) for r in runs)
        workdir = str(Path(runs[0]["run_dir"]).parents[1])  # shown as WORKDIR
        shown = [s.replace(workdir, "WORKDIR") for s in runs[0]["overrides"]]
        sets = " ".join(f"`--set {s}`" for s in shown) or "none"
        out += ["", f"## `{name}`: config `{runs[0]['config']}`, overrides {sets}, seeds {seeds}"]
        out += _table(runs)
        out += [
            "",
            "| seed | headline mAP | backbone top-1, full 112 | minutes | CPU | load | commit |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            top1 = r["backbone_top1"].get("full_112")
            minutes = f"{r['seconds'] / 60:.1f}" if r["seconds"] else "-"
            if r.get("attempts", 1) > 1:
                minutes += f" ({r['attempts']} attempts)"
            load = r.get("cpu_load_1min")
            out.append(
                f"| {r['seed']} | {100 * r['map_voc07']:.1f} | "
                f"{'-' if top1 is None else f'{100 * top1:.1f}'} | {minutes} | "
                f"{r.get('cpu_model')} ({_isa(r)}) | "
                f"{'-' if load is None else f'{load:.1f}'} | {str(r.get('commit'))[:7]} |"
            )
    # Runs of one config without overrides under several names (e.g. the same seeds with
    # other ISA limits) measure one thing: the spread a user of that config can expect.
    for config in dict.fromkeys(r["config"] for r in records):
        plain = [r for r in records if r["config"] == config and not r["overrides"]]
        if len({r["name"] for r in plain}) > 1:
            which = ", ".join(f"{r['name']} seed {r['seed']}" for r in plain)
            out += ["", f"## Every run of `{config}` without overrides ({which})"]
            out += _table(plain)
    out += [
        "",
        "Headline: `map_voc07`, the last line of the run's `metrics.jsonl` (fine-tuned fc7 + "
        "SVM + box regression at 1 scale). Minutes: wall time of the whole run, backbone "
        "included, with the machine's 1-minute load average when it started (other work on "
        "the same 2 cores slows it).",
    ]
    return "\n".join(out) + "\n"


def write_report(results: Path) -> Path:
    path = results.with_suffix(".md")
    path.write_text(markdown(load_records(results), results.name))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="run directories: WORKDIR/NAME/seedS")
    parser.add_argument("--config", default="detection", help="detection config (detection)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default=DEFAULT_NAME, help="the runs' name in the records")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", default=str(RESULTS), help="the JSON of records")
    parser.add_argument("--readme", help="also splice the report into this markdown file")
    parser.add_argument("--report-only", action="store_true", help="run nothing")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not args.report_only:
        if not args.workdir:
            parser.error("--workdir is required (except with --report-only)")
        if args.name == DEFAULT_NAME and (args.sets or args.config != "detection"):
            parser.error("--set or --config other than 'detection' need a --name of their own")
        failed = []
        for seed in args.seeds:
            directory = run_dir(args.workdir, args.name, seed)
            sweep.say(f"{args.name}/seed{seed}: running -> {directory}")
            if execute(args.config, directory, seed, args.sets):
                save_record(results, record(args.name, args.config, seed, args.sets, directory))
                sweep.say(f"{args.name}/seed{seed}: done; wrote {results}")
            else:
                failed.append(seed)
                sweep.say(f"{args.name}/seed{seed}: FAILED; see {directory / LOG_FILE}")
        if failed:
            return 1
    if not results.exists():
        parser.error(f"{results} does not exist")
    sweep.say(f"wrote {write_report(results)}")
    if args.readme:
        spliced = sweep.splice_readme(args.readme, results.with_suffix(".md"), **README_MARKERS)
        sweep.say(f"wrote {spliced}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
