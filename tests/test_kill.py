"""Kill at any moment, lose nothing: ``spp-jax train`` killed with SIGKILL at several
moments and rerun with the same command ends exactly as an uninterrupted run.

Real processes and real signals (``tests/killing.py``); the detection pipeline's
equivalent is in ``tests/test_detection_pipeline.py``.
"""

from __future__ import annotations

import json

import pytest

from tests import killing

pytest.importorskip("tensorflow_datasets")

SETS = ["num_epochs=2", "eval_every_epochs=1", "eval_sizes=(48,)", "eval_full_image=False"]


def _train_args(workdir) -> list[str]:
    args = ["train", "--config", "tiny", "--workdir", str(workdir)]
    for s in SETS:
        args += ["--set", s]
    return args


def _records(workdir) -> list[dict]:
    """metrics.jsonl without what differs between processes (time, compile counts)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:
        r.pop("epoch_seconds", None)
        r.pop("train_compiles", None)
    return records


def test_train_killed_at_any_moment_ends_as_an_uninterrupted_run(tmp_path):
    from spp_jax import data

    data_dir = str(tmp_path / "tfds")
    data.get_builder("spp_shapes/tiny", data_dir)
    env = killing.one_device_env(TFDS_DATA_DIR=data_dir)
    killing.run(_train_args(tmp_path / "whole"), env)

    kills = [
        ("train step for bucket", 0.3),  # in epoch 1, before any checkpoint
        ("saved checkpoint at step 5", 0.0),  # just after epoch 1 was saved
        ("final test accuracy", 0.0),  # the final line written
    ]
    outputs = killing.run_killed(_train_args(tmp_path / "killed"), env, kills)
    assert "resumed from checkpoint at step 5" in outputs[2]
    assert "resumed from checkpoint at step 10" in outputs[-1]
    whole, killed = _records(tmp_path / "whole"), _records(tmp_path / "killed")
    assert [r.get("epoch") for r in killed] == [1, 2, None]
    assert killed == whole  # every epoch's record and the final evaluation, bit for bit


def test_a_resumed_run_drops_what_was_written_after_its_checkpoint(tmp_path):
    """What a killed run wrote after its last checkpoint (later epochs, a final line, a
    line cut short) is dropped when the run resumes; a cut line is never read."""
    from spp_jax import metrics

    path = tmp_path / "metrics.jsonl"
    lines = [{"epoch": 1, "step": 5}, {"epoch": 2, "step": 10}, {"final": {}, "metrics": {}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 3, "st')
    assert metrics.read_metrics(str(tmp_path)) == lines
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    writer.truncate(5)
    assert metrics.read_metrics(str(tmp_path)) == lines[:1]
    writer.write({"epoch": 2, "step": 10}, 10)
    assert metrics.read_metrics(str(tmp_path)) == lines[:2]
    path.write_text('{"epoch": 1, "st\n{"epoch": 2, "step": 10}\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        metrics.read_metrics(str(tmp_path))
