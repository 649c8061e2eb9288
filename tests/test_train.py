"""Training loop: pmap equivalence, schedules, compile counts, resume, several processes.

All runs use the ``tiny`` config (``spp_jax/configs/tiny.py``) on 4 forced CPU
devices (see conftest.py), on the built-in ``spp_shapes/tiny`` data or on
``tfds.testing.mock_data``.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from flax import jax_utils

from spp_jax import cli, workdirs
from spp_jax import metrics as metrics_lib
from spp_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    config = cli.load_config("tiny")
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    old = os.environ.get("TFDS_DATA_DIR")
    os.environ["TFDS_DATA_DIR"] = d
    yield d
    if old is None:
        os.environ.pop("TFDS_DATA_DIR", None)
    else:
        os.environ["TFDS_DATA_DIR"] = old


def _params(result):
    return train_lib.flatten_params(result["state"].params)


def assert_params_equal(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


# ------------------------------------------------------------------ the step itself


def test_pmap_step_equals_single_device_on_same_global_batch():
    """4 devices x 2 examples == 1 device x 8 examples (no dropout)."""
    config = tiny_config(**{"model.dropout_rate": 0.0, "model.num_classes": 10})
    model = train_lib.create_model(config)
    schedule = train_lib.learning_rate_schedule(config, 5)
    tx = train_lib.create_optimizer(config, schedule)
    state = train_lib.create_train_state(config, model, 48, tx)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((8, 48, 48, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 8).astype(np.int32),
        "mask": np.ones(8, np.float32),
    }
    step = functools.partial(train_lib.train_step, learning_rate_fn=schedule)
    p_step = jax.pmap(step, axis_name=train_lib.AXIS)

    four = jax_utils.replicate(state, jax.devices()[:4])
    for _ in range(2):
        four, m4 = p_step(
            four, jax.tree_util.tree_map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch)
        )
    one = jax.pmap(step, axis_name=train_lib.AXIS, devices=jax.devices()[:1])
    single = jax_utils.replicate(state, jax.devices()[:1])
    for _ in range(2):
        single, m1 = one(single, jax.tree_util.tree_map(lambda x: x[None], batch))
    assert_params_equal(
        train_lib.flatten_params(train_lib.unreplicate_to_host(four).params),
        train_lib.flatten_params(train_lib.unreplicate_to_host(single).params),
        rtol=2e-5,
        atol=2e-6,
    )
    np.testing.assert_allclose(m4["loss"][0], m1["loss"][0], rtol=1e-5)
    assert int(train_lib.unreplicate_to_host(four).step) == 2


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu_kernels", "fallbacks"])
def test_train_step_under_shard_map_equals_the_pmap_step(kernels, monkeypatch):
    """The same train_step, no pmap: jit + shard_map over a 4-device mesh axis "batch"
    gives the pmap step's parameters and metrics, step after step; with the compiled
    CPU kernels and with their fallbacks (the code GPU and TPU lower), whichever this
    machine's measurement chose."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from spp_jax._cpu import native

    monkeypatch.setenv(native.ENV, "auto")
    monkeypatch.setattr(native, "_forced", None)
    families = ("spp", "roi", "max_pool", "conv")
    monkeypatch.setattr(native, "tuned", lambda library: dict.fromkeys(families, kernels))
    jax.clear_caches()
    config = tiny_config(**{"model.dropout_rate": 0.0, "model.num_classes": 10})
    model = train_lib.create_model(config)
    schedule = train_lib.learning_rate_schedule(config, 5)
    state = train_lib.create_train_state(
        config, model, 48, train_lib.create_optimizer(config, schedule)
    )
    mesh = Mesh(np.array(jax.devices()[:4]), (train_lib.AXIS,))
    step = functools.partial(train_lib.train_step, learning_rate_fn=schedule)
    shard_map = getattr(jax, "shard_map", None) or jax.experimental.shard_map.shard_map
    mapped = jax.jit(
        shard_map(step, mesh=mesh, in_specs=(P(), P(train_lib.AXIS)), out_specs=(P(), P()))
    )
    p_step = jax.pmap(step, axis_name=train_lib.AXIS, devices=jax.devices()[:4])
    rng = np.random.default_rng(1)
    sharded, replicated = state, jax_utils.replicate(state, jax.devices()[:4])
    for _ in range(2):
        batch = {
            "image": rng.standard_normal((8, 48, 48, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32),
            "mask": np.ones(8, np.float32),
        }
        sharded, m_shard = mapped(sharded, jax.tree.map(jnp.asarray, batch))
        replicated, m_pmap = p_step(replicated, train_lib.shard(batch))
        host = train_lib.unreplicate_to_host(replicated)
        assert int(sharded.step) == int(host.step)
        for k in ("loss", "accuracy", "lr"):
            np.testing.assert_allclose(m_shard[k], m_pmap[k][0], rtol=1e-6, err_msg=k)
        assert_params_equal(
            train_lib.flatten_params(sharded.params),
            train_lib.flatten_params(host.params),
            rtol=1e-5,
            atol=1e-7,
        )
    # The steps did move the parameters (so equality above is not trivially 0 == 0).
    moved = train_lib.flatten_params(sharded.params)["fc8/kernel"]
    assert not np.allclose(moved, train_lib.flatten_params(state.params)["fc8/kernel"])


def test_pmapped_train_step_traces_once_per_shape():
    """A counter inside the traced function: new batch values, the donated state the
    step returned and its metrics never retrace; only a new shape does."""
    config = tiny_config(**{"model.dropout_rate": 0.3, "model.num_classes": 10})
    model = train_lib.create_model(config)
    schedule = train_lib.learning_rate_schedule(config, 5)
    state = train_lib.create_train_state(
        config, model, 48, train_lib.create_optimizer(config, schedule)
    )
    traces: list[tuple[int, ...]] = []

    def counted(state, batch):
        traces.append(batch["image"].shape)
        return train_lib.train_step(state, batch, learning_rate_fn=schedule)

    p_step = jax.pmap(counted, axis_name=train_lib.AXIS, donate_argnums=(0,))
    p_state = train_lib.replicate(state)
    rng = np.random.default_rng(2)

    def batch(size):
        return train_lib.shard(
            {
                "image": rng.standard_normal((8, size, size, 3)).astype(np.float32),
                "label": rng.integers(0, 10, 8).astype(np.int32),
                "mask": (rng.uniform(size=8) > 0.2).astype(np.float32),
            }
        )

    for size in (48, 48, 48, 40, 40, 48, 40):
        p_state, metrics = p_step(p_state, batch(size))
        assert np.isfinite(float(train_lib.unreplicate_to_host(metrics)["loss"]))
    assert traces == [(2, 48, 48, 3), (2, 40, 40, 3)]
    assert int(train_lib.unreplicate_to_host(p_state).step) == 7


# ------------------------------------------------------------- whole runs (tiny config)


@pytest.fixture(scope="module")
def paper_run(data_dir, tmp_path_factory):
    """One uninterrupted run of the tiny config: 2 epochs x 5 steps, sizes 48, 40."""
    workdir = str(tmp_path_factory.mktemp("paper"))
    config = tiny_config(
        **{"model.dropout_rate": 0.3, "num_epochs": 3, "final_eval": False, "eval_every_epochs": 0}
    )
    return workdir, config, train_lib.train_and_evaluate(config, workdir)


def test_one_compile_per_bucket_paper_schedule(paper_run):
    workdir, _, result = paper_run
    # sizes 48, 40, 48: two buckets, two compiles, however many steps.
    assert sorted(set(result["train_compiles"])) == [(2, 40, 40, 3), (2, 48, 48, 3)]
    assert len(result["train_compiles"]) == 2
    records = metrics_lib.read_metrics(workdir)
    assert [r["size"] for r in records] == [48, 40, 48]
    assert [r["train_compiles"] for r in records] == [1, 2, 2]
    assert all(np.isfinite(r["train_loss"]) for r in records)
    assert os.path.exists(os.path.join(workdir, "curves.png"))


def _event_scalars(workdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TensorBoard event files, read by TensorBoard's reader."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
    acc.Reload()
    return {
        tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
        for tag in acc.Tags()["tensors"]
    }


def test_run_writes_tensorboard_events_beside_metrics_jsonl(paper_run):
    workdir, _, _ = paper_run
    assert any(n.startswith("events.out.tfevents.") for n in os.listdir(workdir))
    events = _event_scalars(workdir)
    records = metrics_lib.read_metrics(workdir)
    for key in ("train_loss", "train_accuracy", "lr", "size", "train_compiles"):
        assert events[key] == pytest.approx({r["step"]: r[key] for r in records}, rel=1e-6), key
    assert sorted(events["train_loss"]) == [5, 10, 15]


def test_resume_after_interruption_gives_the_same_parameters(paper_run, tmp_path):
    _, config, uninterrupted = paper_run
    workdir = str(tmp_path)
    stopped = train_lib.train_and_evaluate(config, workdir, stop_after_step=7)  # mid epoch 2
    assert int(stopped["state"].step) == 7
    # A crash in the middle of writing a later checkpoint leaves only a temporary
    # directory; resuming must ignore it and take step 7.
    partial = os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(partial, "default"))
    with open(os.path.join(partial, "default", "junk"), "w") as f:
        f.write("half a checkpoint")
    assert train_lib.checkpoint_manager(workdir).latest_step() == 7
    resumed = train_lib.train_and_evaluate(config, workdir)
    assert int(resumed["state"].step) == 15
    # Only the resumed bucket compiles again; params identical bit for bit.
    assert_params_equal(_params(resumed), _params(uninterrupted))


def test_random_schedule_compiles_once_per_drawn_size(data_dir, tmp_path):
    from spp_jax.data import train_size_for_epoch

    config = tiny_config(
        size_schedule="random",
        train_sizes=(38, 42),
        num_epochs=3,
        final_eval=False,
        eval_every_epochs=0,
    )
    with config.unlocked():
        config.seed = 3
    result = train_lib.train_and_evaluate(config, str(tmp_path))
    sizes = [train_size_for_epoch((38, 42), "random", e, 3) for e in range(3)]
    assert [r["size"] for r in metrics_lib.read_metrics(str(tmp_path))] == sizes
    assert sorted(s[1] for s in result["train_compiles"]) == sorted(set(sizes))


@pytest.mark.parametrize(
    "schedule,sizes", [("single", (48,)), ("paper", (48, 40)), ("random", (40, 48))]
)
def test_each_schedule_on_mock_tfds_data(schedule, sizes, tmp_path):
    """A real TFDS dataset name, faked by tfds.testing.mock_data: one epoch of 2 steps."""
    import tensorflow_datasets as tfds

    final = schedule == "single"  # evaluate once: centre crop and full image
    config = tiny_config(
        dataset="oxford_flowers102",
        size_schedule=schedule,
        train_sizes=sizes,
        num_epochs=1,
        eval_every_epochs=int(final),
        eval_sizes=(48,),
        final_eval=final,
    )
    with tfds.testing.mock_data(num_examples=16):
        result = train_lib.train_and_evaluate(config, str(tmp_path))
    assert len(result["train_compiles"]) == 1
    records = metrics_lib.read_metrics(str(tmp_path))
    assert records[0]["step"] == 2 and np.isfinite(records[0]["train_loss"])
    assert int(result["state"].step) == 2
    if final:
        assert records[0]["test_count"] == 16
        assert result["eval"]["48"]["center"]["count"] == 16
        assert result["eval"]["48"]["full"]["count"] == 16
        events = _event_scalars(str(tmp_path))
        assert events["test_top1"] == pytest.approx({2: records[0]["test_top1"]})
        for mode in ("center", "full"):
            top1 = result["eval"]["48"][mode]["top1"]
            assert events[f"final/48/{mode}/top1"] == pytest.approx({2: top1}), mode


def test_eval_step_traces_once_per_batch_shape(data_dir, monkeypatch):
    """A counter inside the pmapped eval step: evaluating twice, including the last,
    partly masked batch of the split, traces once per batch shape."""
    traces: list[tuple[tuple[int, ...], bool]] = []
    real = train_lib.eval_step

    def counted(params, batch, *, apply_fn):
        traces.append((tuple(batch["image"].shape), "valid_sizes" in batch))
        return real(params, batch, apply_fn=apply_fn)

    monkeypatch.setattr(train_lib, "eval_step", counted)
    train_lib._p_eval_step.cache_clear()
    try:
        config = tiny_config(full_image_bucket_steps=2)
        builder, info = train_lib.load_dataset(config)
        config = train_lib.with_num_classes(config, info.num_classes)
        model = train_lib.create_model(config)
        tx = train_lib.create_optimizer(config, train_lib.learning_rate_schedule(config, 5))
        p_params = train_lib.replicate(train_lib.create_train_state(config, model, 48, tx).params)
        for _ in range(2):
            ev = train_lib.evaluate(config, builder, info, p_params, model, mode="center", size=48)
            assert ev["count"] == 20
        assert traces == [((2, 48, 48, 3), False)]  # per device: 8 examples on 4 devices
        traces.clear()
        for _ in range(2):
            ev = train_lib.evaluate(config, builder, info, p_params, model, mode="full", size=40)
            assert ev["count"] == 20
        n_buckets = len(traces)
        assert n_buckets >= 1 and all(with_sizes for _, with_sizes in traces)
        assert len(set(traces)) == n_buckets, traces  # the second pass traced nothing
    finally:
        train_lib._p_eval_step.cache_clear()


def test_bad_batch_size_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 4 devices"):
        train_lib.train_and_evaluate(tiny_config(batch_size=6), str(tmp_path))
    with pytest.raises(ValueError, match="eval_batch_size 6 is not divisible by the 4 devices"):
        train_lib.train_and_evaluate(tiny_config(eval_batch_size=6), str(tmp_path))
    with pytest.raises(ValueError, match="workdir 'gs://bucket/run' is a URL"):
        train_lib.train_and_evaluate(tiny_config(), "gs://bucket/run")


# ----------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROC_SETTINGS = [
    "model.dropout_rate=0.0",  # dropout keys depend on the device layout
    "num_epochs=2",
    "eval_every_epochs=1",
    "eval_sizes=(48,)",
]


def test_two_processes_match_one_process_with_four_devices(data_dir, tmp_path):
    """2 processes x 2 CPU devices (loopback) reach the 1 x 4 parameters."""
    sets = [a for s in TWO_PROC_SETTINGS for a in ("--set", s)]
    port = _free_port()
    workdir = str(tmp_path / "two")
    # No persistent compilation cache here: an entry compiled in this (one-process, four-
    # device) session must not be reused for the two-process program.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env = dict(
        env,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        TFDS_DATA_DIR=data_dir,
        PYTHONPATH=REPO,
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spp_jax",
                "train",
                "--config",
                "tiny",
                "--workdir",
                workdir,
                *sets,
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 1 of 2" in outs[1]

    config = cli.load_config("tiny", TWO_PROC_SETTINGS)
    one = train_lib.train_and_evaluate(config, str(tmp_path / "one"))
    two = workdirs.load_trained(workdir)
    assert two.step == int(one["state"].step) == 10
    assert two.config.model.num_classes == 10  # written into config.json by train
    assert_params_equal(train_lib.flatten_params(two.params), _params(one), rtol=1e-5, atol=1e-6)
    # Evaluation saw every test example once across the two processes.
    final = next(r["final"] for r in metrics_lib.read_metrics(workdir) if "final" in r)
    assert final["48"]["center"]["count"] == final["48"]["full"]["count"] == 20
    np.testing.assert_allclose(
        final["48"]["center"]["top1"], one["eval"]["48"]["center"]["top1"], atol=1e-6
    )
