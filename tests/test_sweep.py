"""experiments/sweep.py: the classification sweep on its ``tiny`` grid, end to end.

The sweep runs once per module (2 variants x 1 seed of the ``tiny`` config, one epoch
each, each run an ``spp-jax train`` subprocess); the tests check its records, report,
the runs' own final lines, and resuming: a second invocation runs nothing, and a run
whose final line is deleted is the only one run again. Plus the statistics, the
``--set`` formatting and the grids' definitions, without training.
"""

import contextlib
import importlib.util
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

_PATH = pathlib.Path(__file__).parents[1] / "experiments" / "sweep.py"


def _load():
    spec = importlib.util.spec_from_file_location("experiments_sweep", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sweep = _load()
grids = sweep.grids_lib


def _main(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = sweep.main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The ``tiny`` grid swept once: ``(workdir, results path, output)``."""
    pytest.importorskip("tensorflow_datasets")
    from spp_jax import data

    root = tmp_path_factory.mktemp("sweep")
    data_dir = str(root / "tfds")
    data.get_builder("spp_shapes/tiny", data_dir)
    with pytest.MonkeyPatch.context() as mp:
        # The runs' subprocesses inherit the environment (the compilation cache and strict
        # promotion of conftest.py), but see one CPU device: 4 forced host devices on a
        # loaded 2-core machine can miss XLA's 40 s all-reduce rendezvous and abort.
        mp.setenv("TFDS_DATA_DIR", data_dir)
        mp.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
        workdir, results = root / "runs", root / "results" / "classification_tiny.json"
        argv = ["--grid", "tiny", "--workdir", str(workdir), "--results", str(results)]
        argv += ["--jobs", "2"]  # the two variants side by side, then their second seeds
        rc, out = _main(argv)
        assert rc == 0, out
        yield workdir, results, out, argv


def _last_line(run_dir: pathlib.Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_records(swept):
    workdir, results, out, _ = swept
    assert "executed 2 run(s), skipped 0 finished, 0 failed" in out
    records = json.loads(results.read_text())
    grid = grids.get_grid("tiny")
    assert [(r["name"], r["seed"]) for r in records] == [
        (v.name, s) for v in grid.variants for s in grid.seeds
    ]
    for r in records:
        variant = grid.variant(r["name"])
        assert r["config"] == variant.config == "tiny"
        assert r["overrides"] == sweep.jsonable(variant.overrides)
        assert r["grid"] == "tiny"
        assert r["run_dir"] == str(workdir / r["name"] / f"seed{r['seed']}")
        assert set(r["metrics"]) == {"center_40", "full_40", "center_48", "full_48"}
        assert all(0.0 <= v <= 1.0 for v in r["metrics"].values()), r["metrics"]
        assert r["seconds"] > 0
        assert r["num_epochs"] == 1 and r["curve"] == []  # the tiny grid evaluates at the end
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_PATH.parents[1], capture_output=True, text=True
        ).stdout.strip()
        if commit:  # a checkout (not an sdist): the record names its commit
            assert r["commit"].removesuffix("+dirty") == commit
        assert r["cpu_model"] and r["cpu_isa"] and r["cpu_cores"] >= 1
        config = json.loads((pathlib.Path(r["run_dir"]) / "config.json").read_text())
        assert config["seed"] == r["seed"]
        assert config["num_epochs"] == 1
        assert tuple(config["model"]["levels"]) == tuple(
            r["overrides"].get("model.levels", (6, 3, 2, 1))
        )


def test_each_runs_final_line_holds_its_records_metrics(swept):
    _, results, _, _ = swept
    for r in json.loads(results.read_text()):
        last = _last_line(pathlib.Path(r["run_dir"]))
        assert last["metrics"] == r["metrics"]
        assert set(last["final"]) == {"40", "48"}


def test_report_and_report_only(swept):
    workdir, results, _, _ = swept
    md = results.with_suffix(".md")
    pngs = [results.parent / f"{results.stem}_{s}.png" for s in ("by_size", "differences")]
    text = md.read_text()
    assert "| tiny_levels21 |" in text and "(6,3,2,1) > (2,1) (centre 48)" in text
    assert "95 % interval" in text and "_by_size.png" in text
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    # --report-only rebuilds them from the JSON alone and runs nothing.
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("metrics.jsonl")}
    for p in [md, *pngs]:
        p.unlink()
    rc, out = _main(["--report-only", "--results", str(results)])
    assert rc == 0, out
    assert md.read_text() == text
    assert all(p.exists() for p in pngs)
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("metrics.jsonl")} == before
    # --readme splices the report between the grid's marker lines, and only there.
    readme = workdir / "README.md"
    begin, end = (
        m.format(grid="tiny", tool="sweep") for m in (sweep.README_BEGIN, sweep.README_END)
    )
    readme.write_text(f"intro\n### Results\n{begin}\nold table\n{end}\nrest\n")
    rc, out = _main(["--report-only", "--results", str(results), "--readme", str(readme)])
    assert rc == 0, out
    spliced = readme.read_text()
    assert spliced.startswith(f"intro\n### Results\n{begin}\n") and spliced.endswith(
        f"{end}\nrest\n"
    )
    assert "old table" not in spliced and "| tiny_levels21 |" in spliced
    assert "#### Paired differences" in spliced and "# Classification sweep" not in spliced
    rel = os.path.relpath(results.parent, workdir)
    assert f"]({rel}/{results.stem}_by_size.png)" in spliced
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no marker lines"):
        sweep.splice_readme(readme, md, "tiny")


def test_finished_runs_are_skipped_and_an_unfinished_one_runs_again(swept):
    workdir, results, _, argv = swept
    jsonl = sorted(workdir.rglob("metrics.jsonl"))
    assert len(jsonl) == 2
    stamp = lambda: {p: p.stat().st_mtime_ns for p in jsonl}
    before = stamp()
    records = json.loads(results.read_text())
    # (The environment of the swept fixture, TFDS_DATA_DIR and XLA_FLAGS, still holds.)
    rc, out = _main(argv)
    assert rc == 0, out
    assert "executed 0 run(s), skipped 2 finished, 0 failed" in out
    assert stamp() == before
    assert json.loads(results.read_text()) == records

    # The final line of one run deleted: that run (only) runs again, resuming from its
    # last checkpoint (the end of training), so it only evaluates again.
    victim = workdir / "tiny_levels21" / "seed0" / "metrics.jsonl"
    lines = victim.read_text().splitlines()
    victim.write_text("\n".join(lines[:-1]) + "\n")
    rc, out = _main(argv)
    assert rc == 0, out
    assert "executed 1 run(s), skipped 1 finished, 0 failed" in out
    assert "tiny_levels21/seed0: started" in out
    after = stamp()
    assert [p for p in jsonl if after[p] != before[p]] == [victim]
    again = victim.read_text().splitlines()
    assert again[:-1] == lines[:-1]  # no training epoch again
    assert json.loads(again[-1])["metrics"] == json.loads(lines[-1])["metrics"]
    saved = json.loads((victim.parent / "sweep.json").read_text())
    assert [a["rc"] for a in saved["attempts"]] == [0, 0]
    new = json.loads(results.read_text())
    assert [r["metrics"] for r in new] == [r["metrics"] for r in records]


def test_a_run_dir_of_other_settings_is_never_reused(swept):
    workdir, _, _, _ = swept
    grid = grids.get_grid("tiny")
    other = sweep.Variant("tiny", "tiny", {"num_epochs": 2})
    run = sweep.Run(other, 0, workdir / "tiny" / "seed0")
    with pytest.raises(sweep.RunDirMismatchError, match="the grid now asks for"):
        sweep.run_state(run)
    assert sweep.run_state(sweep.plan(grid, workdir, [0])[0]) == "done"


# ------------------------------------------------------------------ without training


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path):
    argv = ["--grid", "paper", "--workdir", str(tmp_path / "w"), "--dry-run"]
    rc, out = _main([*argv, "--results", str(tmp_path / "none.json")])
    assert rc == 0
    assert "25 run(s), 0 finished, 25 to run" in out
    assert "--config single --workdir" in out and "'model.levels=(4, 3, 2, 1)'" in out
    assert not (tmp_path / "w").exists()


def test_set_arguments_give_the_variants_configs(tmp_path):
    """Each paper variant's command, parsed by the CLI, is its config with its overrides."""
    from spp_jax import cli

    for run in sweep.plan(grids.get_grid("paper"), tmp_path, [2]):
        args = run.train_args()
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        config = cli.load_config(run.variant.config, sets)
        assert config.seed == 2
        for key, value in run.variant.overrides.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (run.label, key)


def test_paper_grid():
    from spp_jax.configs import get_config
    from spp_jax.datasets.spp_shapes import SIZE_RANGE

    grid = grids.get_grid("paper")
    assert len(grid.seeds) >= 5
    names = grid.names()
    assert len(set(names)) == len(names)
    assert {"nospp", "single", "default", "default_random", "single_30bin"} == set(names)
    sizes = grids.PAPER_EVAL_SIZES
    assert min(sizes) == SIZE_RANGE[0] and max(sizes) == SIZE_RANGE[1]
    assert grid.variant("default_random").overrides["train_sizes"] == (90, 112)
    assert grid.variant("single_30bin").overrides["model.levels"] == (4, 3, 2, 1)
    assert tuple(get_config("single").model.levels) == (6, 3, 2, 1)
    # One schedule for every variant.
    for v in grid.variants:
        assert {k: v.overrides[k] for k in grids.PAPER_SCHEDULE} == grids.PAPER_SCHEDULE, v

    def measures(name):
        v = grid.variant(name)
        c = get_config(v.config)
        eval_sizes = v.overrides.get("eval_sizes", c.eval_sizes)
        modes = ["center"] + (["full"] if c.model.head == "spp" and c.eval_full_image else [])
        out = {f"{m}_{s}" for m in modes for s in eval_sizes}
        if v.multiview:  # experiments/benchmarks/multiview.py's default test size
            size = round(c.crop_size * c.resize_ratio)
            out |= {f"{way}{n}_{size}" for way in ("fmap", "whole") for n in (1, 10, 18)}
        return out

    assert measures("nospp") == {"center_112"}
    for c in grid.comparisons:
        assert c.metric in measures(c.a), c
        assert c.b_metric in measures(c.b), c


def test_t_quantiles_and_intervals():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 31), 40, 60, 120, 1000):
        fallback = sweep._T975[df - 1] if df <= 30 else 1.959964 + 2.37 / df
        assert fallback == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=3e-3), df
    d = sweep.describe([0.1, 0.2, 0.3])
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.2) and d["std"] == pytest.approx(0.1)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert d["ci95"] == pytest.approx([0.2 - half, 0.2 + half], abs=1e-6)
    assert sweep.describe([0.5]) == {"n": 1, "mean": 0.5, "std": None, "ci95": None}


def test_paired_differences():
    grid = grids.get_grid("paper")
    records = [
        {"name": "single", "seed": s, "metrics": {"center_112": a, "full_112": a + 0.05}}
        for s, a in enumerate((0.80, 0.82, 0.81))
    ] + [
        {"name": "nospp", "seed": s, "metrics": {"center_112": b}}
        for s, b in ((0, 0.70), (1, 0.75), (3, 0.99))  # seed 3 has no partner
    ]
    for r in records:
        r["seconds"] = 60.0
    summary = sweep.summarize(records, grid)
    spp = next(c for c in summary["comparisons"] if c["a"] == "single" and c["b"] == "nospp")
    assert spp["seeds"] == [0, 1] and spp["diffs"] == pytest.approx([0.10, 0.07])
    assert spp["mean"] == pytest.approx(0.085) and spp["n"] == 2
    full = next(c for c in summary["comparisons"] if c["label"].startswith("full image > cen"))
    assert full["diffs"] == pytest.approx([0.05] * 3) and sweep.verdict(full) == "holds"
    multi = next(c for c in summary["comparisons"] if c["a"] == "default")
    assert multi["n"] == 0 and sweep.verdict(multi) == "no data"
    single = summary["variants"]["single"]["metrics"]["center_112"]
    assert single["mean"] == pytest.approx(0.81) and single["std"] == pytest.approx(0.01)
    assert list(summary["variants"]["single"]["metrics"]) == ["center_112", "full_112"]


def test_doctests():
    import doctest

    assert doctest.testmod(sweep).failed == 0


def test_a_failed_run_is_retried_then_reported(tmp_path):
    """A run whose process fails (here ``/bin/false`` as the runs' Python) is retried,
    reported, and makes the sweep exit 1; no record is written for it."""
    results = tmp_path / "r.json"
    argv = ["--grid", "tiny", "--workdir", str(tmp_path / "w"), "--results", str(results)]
    rc, out = _main([*argv, "--only", "tiny", "--seeds", "0", "--python", "/bin/false"])
    assert rc == 1
    assert "retry 1 of 1" in out and "1 failed: tiny/seed0" in out
    saved = json.loads((tmp_path / "w" / "tiny" / "seed0" / "sweep.json").read_text())
    assert [a["rc"] for a in saved["attempts"]] == [1, 1]
    assert json.loads(results.read_text()) == []


def test_learning_curves_and_convergence(tmp_path):
    lines = [{"epoch": e, "step": 10 * e, "test_top1": a} for e, a in [(2, 0.3), (4, 0.5)]]
    lines += [{"epoch": 5, "step": 50}]  # an epoch without evaluation
    lines += [{"epoch": e, "step": 10 * e, "test_top1": a} for e, a in [(6, 0.905), (8, 0.9)]]
    lines += [{"final": {}, "metrics": {"center_112": 0.9}}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    curve = sweep.learning_curve(tmp_path)
    assert curve == [(2, 0.3), (4, 0.5), (6, 0.905), (8, 0.9)]
    got = sweep.convergence(curve, 8)  # the last quarter: epochs 7 and 8 -> one point
    assert got == {"last_quarter_range": None, "converged": None}
    got = sweep.convergence(curve, 7)  # epochs 6 and 7: 6 > 5.25 -> 0.905 and 0.9
    assert got["converged"] and math.isclose(got["last_quarter_range"], 0.005)
    assert not sweep.convergence([(6, 0.8), (7, 0.9)], 7)["converged"]
    assert sweep.convergence([(6, 0.907), (7, 0.917)], 7)["converged"]  # 1 point, in floats
    records = [
        {"name": "a", "seed": s, "num_epochs": 7, "curve": [[6, 0.8], [7, 0.8 + s / 100]],
         **sweep.convergence([(6, 0.8), (7, 0.8 + s / 100)], 7)}
        for s in (0, 2)
    ]  # fmt: skip
    table = sweep.convergence_markdown(records)
    assert "| a | 0 | 7 | 80.0 | 0.0 | yes |" in table
    assert "| a | 2 | 7 | 82.0 | 2.0 | no |" in table
    assert sweep.plot_curves(records, tmp_path / "curves.png").stat().st_size > 0


def test_multiview_step_after_training_and_its_records(tmp_path):
    """A ``multiview`` variant's run is done only once its multi-view test has written
    ``multiview.json``; a trained run is not trained again for it, and its record holds
    the multi-view top-1s beside the final evaluation's."""
    variant = grids.Variant("mv", "tiny", {"num_epochs": 1}, multiview=True)
    grid = grids.Grid("mv_test", (variant,), (), seeds=(0,))
    run = sweep.plan(grid, tmp_path / "w", [0])[0]
    run.run_dir.mkdir(parents=True)
    identity = {**run.identity(), "seconds": 5.0, "attempts": [{"rc": 0, "commit": "abc"}]}
    (run.run_dir / "sweep.json").write_text(json.dumps(identity))
    final = {"final": {"48": {"center": {"top1": 0.5}}}, "metrics": {"center_48": 0.5}}
    (run.run_dir / "metrics.jsonl").write_text(json.dumps(final) + "\n")
    assert sweep.run_state(run) == "resume"  # trained, not yet scored with views

    rows = [
        {"size": 55, "views": v, "feature_map": {"top1": 0.6 + v / 100},
         "whole_net": {"top1": 0.55 + v / 100}}
        for v in (1, 10)
    ]  # fmt: skip
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$1" = "-m" ] && exit 3\n'  # training again would be a bug
        'while [ "$#" -gt 0 ]; do [ "$1" = "--out" ] && out="$2"; shift; done\n'
        f"printf '%s' '{json.dumps({'rows': rows})}' > \"$out\"\n"
    )
    fake.chmod(0o755)
    failing = tmp_path / "failing_python"
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)

    out = sweep.run_sweep(grid, tmp_path / "w", python=str(failing), retries=0, xla_cache=None)
    assert out["failed"] == ["mv/seed0"] and sweep.run_state(run) == "resume"
    saved = []
    out = sweep.run_sweep(
        grid, tmp_path / "w", python=str(fake), xla_cache=None, on_finished=lambda: saved.append(1)
    )
    assert out["executed"] == ["mv/seed0"] and saved == [1]
    assert sweep.run_state(run) == "done"
    (record,) = sweep.collect_records(grid, tmp_path / "w")
    assert record["metrics"] == pytest.approx(
        {"center_48": 0.5, "fmap1_55": 0.61, "whole1_55": 0.56, "fmap10_55": 0.7,
         "whole10_55": 0.65}
    )  # fmt: skip
    assert record["commit"] == "abc"


def test_recorded_runs_without_run_directories_count_as_finished(swept, tmp_path):
    """A fresh checkout has the committed records and no run directories: the sweep
    keeps those records and runs only what no record covers."""
    _, results, _, _ = swept
    records = json.loads(results.read_text())
    grid = grids.get_grid("tiny")
    kept = tmp_path / "results.json"
    kept.write_text(json.dumps(records[:1]))
    assert list(sweep.recorded_runs(kept, grid)) == [f"{records[0]['name']}/seed0"]
    # A record of other settings is not a record of the grid's run.
    stale = [{**records[0], "overrides": {"num_epochs": 7}}]
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    assert sweep.recorded_runs(tmp_path / "stale.json", grid) == {}
    # The other run's directory is there, the recorded one's is not.
    fresh = tmp_path / "runs"
    other = pathlib.Path(records[1]["run_dir"])
    (fresh / records[1]["name"]).mkdir(parents=True)
    os.symlink(other, fresh / records[1]["name"] / "seed0")
    rc, out = _main(["--grid", "tiny", "--workdir", str(fresh), "--results", str(kept)])
    assert rc == 0, out
    assert "executed 0 run(s), skipped 2 finished, 0 failed" in out
    again = json.loads(kept.read_text())
    assert again[0] == records[0]
    assert again[1]["metrics"] == records[1]["metrics"]
    assert again[1]["run_dir"] == str(fresh / records[1]["name"] / "seed0")
