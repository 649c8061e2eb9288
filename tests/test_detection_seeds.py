"""experiments/detection_seeds.py: records of finished detection runs and the mean ± std
report, from run directories laid out as ``spp-jax detect-train`` writes them (the runs
themselves are the pipeline's, tested in test_detection_pipeline.py)."""

import importlib.util
import json
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).parents[1] / "experiments" / "detection_seeds.py"


def _load():
    spec = importlib.util.spec_from_file_location("experiments_detection_seeds", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


seeds = _load()


def _fake_run(directory: pathlib.Path, seed: int, headline: float, load: float) -> None:
    """A finished run's files: metrics.jsonl, stages/, the backbone's last line."""
    (directory / "stages").mkdir(parents=True)
    (directory / "backbone").mkdir()
    table = {}
    for k, row in enumerate(seeds.ROWS):
        for n in (1, 5):
            value = headline + 0.01 * k + (0.03 if n == 5 else 0.0)
            table[f"{row}, {n} scale{'s' if n > 1 else ''}"] = {
                "map_voc07": value,
                "map_area": value - 0.005,
                "ap_voc07": [value] * 3,
            }
    main = table["ft fc7 + SVM + bbox, 1 scale"]["map_voc07"]
    metrics = {
        "map_voc07": main,
        "map_area": main - 0.005,
        "main": "ft fc7 + SVM + bbox, 1 scale(s)",
    }
    lines = [
        json.dumps({"old": 1}),
        json.dumps({**metrics, "table": table, "peak_memory_gib": 9.0}),
    ]
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for name, sec in (("backbone", 500.0), ("eval", 900.0)):
        (directory / "stages" / f"{name}.json").write_text(json.dumps({"seconds": sec}))
    best = {"seconds": 100.0, "best": {"map": headline + 0.05, "step": 6000}}
    (directory / "stages" / "finetune.json").write_text(json.dumps(best))
    final = {"112": {m: {"top1": v} for m, v in (("center", 0.91), ("full", 0.97))}}
    (directory / "backbone" / "metrics.jsonl").write_text(json.dumps({"final": final}) + "\n")
    attempts = [
        {"seconds": 600.0, "rc": 1, "commit": "abc1234def", "cpu_model": "AMD EPYC",
         "cpu_isa": "avx2", "cpu_cores": 2, "cpu_load_1min": load},
        {"seconds": 400.0, "rc": 0},
    ]  # fmt: skip
    (directory / seeds.ATTEMPTS_FILE).write_text(json.dumps(attempts))


def test_records_and_report_over_seeds(tmp_path):
    results = tmp_path / "detection_seeds.json"
    for seed, headline in ((0, 0.50), (1, 0.54), (2, 0.52)):
        d = seeds.run_dir(tmp_path / "runs", "default", seed)
        _fake_run(d, seed, headline, load=1.5)
        assert seeds.finished(d)
        seeds.save_record(results, seeds.record("default", "detection", seed, [], d))
    d = seeds.run_dir(tmp_path / "runs", "align", 0)
    _fake_run(d, 0, 0.40, load=3.0)
    attempts = json.loads((d / seeds.ATTEMPTS_FILE).read_text())
    attempts[0]["isa_limits"] = {
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }
    (d / seeds.ATTEMPTS_FILE).write_text(json.dumps(attempts))
    sets = ["window_pool=align", f"backbone_workdir={tmp_path / 'runs' / 'default' / 'seed0'}"]
    seeds.save_record(results, seeds.record("align", "detection", 0, sets, d))
    # Saving a run again replaces its record.
    seeds.save_record(results, seeds.record("align", "detection", 0, sets, d))

    records = json.loads(results.read_text())
    assert [(r["name"], r["seed"]) for r in records] == [
        ("default", 0), ("default", 1), ("default", 2), ("align", 0)
    ]  # fmt: skip
    assert seeds.main(["--report-only", "--results", str(results)]) == 0
    assert "Every run of" not in results.with_suffix(".md").read_text()  # one name only
    r = records[1]
    assert r["map_voc07"] == pytest.approx(0.56)  # the bbox row at 1 scale (row 2)
    assert r["seconds"] == 1000.0 and r["attempts"] == 2
    assert (r["commit"], r["cpu_isa"], r["cpu_load_1min"]) == ("abc1234def", "avx2", 1.5)
    assert r["backbone_top1"] == {"center_112": 0.91, "full_112": 0.97}
    assert r["stage_seconds"] == {"backbone": 500.0, "eval": 900.0, "finetune": 100.0}
    assert r["validation_map"] == pytest.approx(0.59)

    d = seeds.run_dir(tmp_path / "runs", "default_avx2", 0)
    _fake_run(d, 0, 0.44, load=1.0)
    seeds.save_record(results, seeds.record("default_avx2", "detection", 0, [], d))

    assert seeds.main(["--report-only", "--results", str(results)]) == 0
    text = results.with_suffix(".md").read_text()
    # The headline row over seeds 0.52, 0.56, 0.54: mean 54.0, std 2.0, range 52.0-56.0.
    assert "| fine-tuned fc7 + SVM + box regression | 54.0 ± 2.0 (52.0-56.0) | 57.0 ± 2.0" in text
    assert "| fine-tuned fc7 + SVM + box regression | 42.0 (one run) |" in text
    # Pooled: default seeds 0-2 and default_avx2 seed 0 (0.52, 0.56, 0.54, 0.46), not align.
    pooled = text.split("## Every run of `detection` without overrides")[1]
    assert pooled.startswith(
        " (default seed 0, default seed 1, default seed 2, default_avx2 seed 0)"
    )
    assert "| fine-tuned fc7 + SVM + box regression | 52.0 ± 4.3 (46.0-56.0) |" in pooled
    assert "`--set window_pool=align` `--set backbone_workdir=WORKDIR/default/seed0`" in text
    assert "| 0 | 42.0 | 97.0 | 16.7 (2 attempts) | AMD EPYC (avx2, limited to AVX2) |" in text
    assert "| 1 | 56.0 | 97.0 | 16.7 (2 attempts) | AMD EPYC (avx2) | 1.5 | abc1234 |" in text

    readme = tmp_path / "README.md"
    begin = seeds.sweep.README_BEGIN.format(**seeds.README_MARKERS)
    end = seeds.sweep.README_END.format(**seeds.README_MARKERS)
    readme.write_text(f"# R\n\n## Detection\n\n{begin}\nold\n{end}\n\nafter\n")
    assert seeds.main(["--report-only", "--results", str(results), "--readme", str(readme)]) == 0
    spliced = readme.read_text()
    assert "old" not in spliced and "54.0 ± 2.0" in spliced and spliced.endswith("after\n")


def test_overrides_need_a_name_of_their_own(tmp_path, capsys):
    with pytest.raises(SystemExit):
        seeds.main(["--workdir", str(tmp_path), "--set", "window_pool=align"])
    assert "need a --name of their own" in capsys.readouterr().err
