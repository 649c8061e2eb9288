"""Lose nothing: ``spp-jax train`` killed with SIGKILL at several moments and rerun with
the same command ends exactly as an uninterrupted run; on a full or read-only file
system it stops with one line and the last good checkpoint stays readable.

Real processes, real signals (``tests/killing.py``) and real file systems (a small
tmpfs in a private mount namespace, ``unshare``); the detection pipeline's kill test
is in ``tests/test_detection_pipeline.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess

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


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run: ``(workdir, env)``."""
    from spp_jax import data

    root = tmp_path_factory.mktemp("lose_nothing")
    data_dir = str(root / "tfds")
    data.get_builder("spp_shapes/tiny", data_dir)
    env = killing.one_device_env(TFDS_DATA_DIR=data_dir)
    killing.run(_train_args(root / "whole"), env)
    return root / "whole", env


def test_train_killed_at_any_moment_ends_as_an_uninterrupted_run(whole, tmp_path):
    workdir, env = whole
    kills = [
        ("train step for bucket", 0.3),  # in epoch 1, before any checkpoint
        ("saved checkpoint at step 5", 0.0),  # just after epoch 1 was saved
        ("final test accuracy", 0.0),  # the final line written
    ]
    outputs = killing.run_killed(_train_args(tmp_path / "killed"), env, kills)
    assert "resumed from checkpoint at step 5" in outputs[2]
    assert "resumed from checkpoint at step 10" in outputs[-1]
    uninterrupted, killed = _records(workdir), _records(tmp_path / "killed")
    assert [r.get("epoch") for r in killed] == [1, 2, None]
    assert killed == uninterrupted  # every epoch's record and the final evaluation, bit for bit


# A private mount namespace (no root needed where user namespaces are enabled): a tmpfs
# just big enough for the finished run, then (a) one more epoch, whose checkpoint does
# not fit, and the evaluation of what is left; (b) the same read-only.
_FS_SCRIPT = """
set -u
mount -t tmpfs -o size=$((KB))k tmpfs "$MNT" || exit 77
cp -r "$SRC" "$MNT/w"
$PY -m spp_jax train --config tiny --workdir "$MNT/w" $SETS > "$OUT/full.txt" 2>&1
echo $? > "$OUT/full.rc"
$PY -m spp_jax eval --workdir "$MNT/w" > "$OUT/full_eval.txt" 2>&1
echo $? > "$OUT/full_eval.rc"
umount "$MNT" && mount -t tmpfs -o size=$((KB * 4))k tmpfs "$MNT" && cp -r "$SRC" "$MNT/w"
mount -o remount,ro "$MNT" || exit 78
$PY -m spp_jax train --config tiny --workdir "$MNT/w" $SETS > "$OUT/ro.txt" 2>&1
echo $? > "$OUT/ro.rc"
$PY -m spp_jax eval --workdir "$MNT/w" > "$OUT/ro_eval.txt" 2>&1
echo $? > "$OUT/ro_eval.rc"
$PY -m spp_jax extract --workdir "$SRC" --images "$MNT" --out "$MNT/f.npz" > "$OUT/ro_out.txt" 2>&1
echo $? > "$OUT/ro_out.rc"
"""


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower() or "Trace" in line]


def test_a_full_or_read_only_disk_is_one_line_and_keeps_the_last_checkpoint(whole, tmp_path):
    workdir, env = whole
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to mount a small tmpfs")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    used_kb = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file()) // 1024
    (tmp_path / "mnt").mkdir()
    sets = " ".join(f"--set {s}" for s in [*SETS[1:], "num_epochs=3"])  # no spaces
    script_env = dict(
        env, MNT=str(tmp_path / "mnt"), SRC=str(workdir), OUT=str(tmp_path),
        KB=str(used_kb + 256), PY=killing.sys.executable, SETS=sets,
    )  # fmt: skip
    run = subprocess.run(
        [unshare, "-rm", "bash", "-c", _FS_SCRIPT], env=script_env, cwd=killing.REPO,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if run.returncode in (77, 78):
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr

    def read(name):
        return (tmp_path / name).read_text()

    # Full: one line that says so and names the checkpoint kept; it still evaluates.
    assert read("full.rc").strip() == "1", read("full.txt")[-3000:]
    errors = _error_lines(read("full.txt"))
    assert len(errors) == 1, errors
    assert errors[0].startswith("spp-jax train: error: no space left for checkpoint step 15")
    assert "(step 10) is kept" in errors[0]
    assert read("full_eval.rc").strip() == "0", read("full_eval.txt")[-3000:]
    assert "test accuracy (top-1) at step 10" in read("full_eval.txt")
    # Read-only: one line naming the workdir; evaluation still works.
    assert read("ro.rc").strip() == "1", read("ro.txt")[-3000:]
    errors = _error_lines(read("ro.txt"))
    assert len(errors) == 1 and "is not writable" in errors[0], errors
    assert read("ro_eval.rc").strip() == "0", read("ro_eval.txt")[-3000:]
    # An --out on a read-only file system: one line, before any model is loaded.
    assert read("ro_out.rc").strip() == "1", read("ro_out.txt")[-3000:]
    errors = _error_lines(read("ro_out.txt"))
    assert len(errors) == 1 and "--out" in errors[0] and "is not writable" in errors[0], errors


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
