"""``config.init_from``: multi-size training started from another workdir's parameters.

The source is an imported torchvision AlexNet (``spp-jax import-weights`` of the
width-reduced fixture tests/data/torchvision_tiny.npz, 5 classes) and the run trains it
on ``spp_shapes/tiny`` (10 classes) with the ``tiny`` config at sizes 64 and 80 (AlexNet's
trunk takes 63 px and more), on 4 forced CPU devices (conftest.py).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("orbax.checkpoint")

from spp_jax import cli, pretrained, workdirs
from spp_jax import metrics as metrics_lib
from spp_jax import train as train_lib
from tests import test_train

data_dir = test_train.data_dir  # the module's TFDS folder (a fixture)

FIXTURE = pathlib.Path(__file__).parent / "data" / "torchvision_tiny.npz"
TRUNK = ("conv1", "conv2", "conv3", "conv4", "conv5")


def _config(init_from, **overrides):
    config = cli.load_config("tiny", [f"init_from={init_from}"])
    with config.unlocked():
        config.update(
            {
                "crop_size": 64,
                "train_sizes": (64, 80),
                "eval_every_epochs": 0,
                "eval_sizes": (64,),
                **overrides,
            }
        )
    return config


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(workdir, imported params) of the fixture's AlexNet (5 classes)."""
    data = np.load(FIXTURE)
    prefix = "alexnet/params/"
    state = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
    model, variables = pretrained.from_torchvision(
        state, "alexnet", width=float(data["alexnet/width"])
    )
    workdir = str(tmp_path_factory.mktemp("imported") / "alexnet")
    pretrained.write_workdir(model, variables, workdir)
    return workdir, jax.device_get(variables["params"])


@pytest.fixture(scope="module")
def run(data_dir, imported, tmp_path_factory):
    """Two epochs (sizes 64, 80) from the imported workdir, and the state the loop started
    from (recorded where the loop replicates it onto the devices)."""
    source, _ = imported
    workdir = str(tmp_path_factory.mktemp("finetune"))
    started = []
    real = train_lib.replicate

    def recording(tree):
        if isinstance(tree, train_lib.TrainState):
            started.append(jax.device_get(tree))
        return real(tree)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_lib, "replicate", recording)
        result = train_lib.train_and_evaluate(_config(source), workdir)
    assert len(started) == 1
    return workdir, result, started[0]


def test_run_starts_from_the_imported_trunk(run, imported):
    """Step 0, the imported conv, fc6 and fc7 arrays, a fresh fc8 for 10 classes (the
    seed's init, as without init_from) and a zero optimizer state."""
    _, source = imported
    workdir, _, start = run
    assert int(start.step) == 0
    for layer in (*TRUNK, "fc6", "fc7"):
        for name in ("kernel", "bias"):
            np.testing.assert_array_equal(
                start.params[layer][name], source[layer][name], err_msg=layer
            )
    assert start.params["fc8"]["kernel"].shape == (16, 10)
    assert source["fc8"]["kernel"].shape == (16, 5)
    config = workdirs.read_config(workdir)
    fresh = train_lib.create_train_state(
        config,
        train_lib.create_model(config),
        config.crop_size,
        train_lib.create_optimizer(config, train_lib.learning_rate_schedule(config, 5)),
    )
    np.testing.assert_array_equal(start.params["fc8"]["kernel"], fresh.params["fc8"]["kernel"])
    assert not np.array_equal(start.params["conv1"]["kernel"], fresh.params["conv1"]["kernel"])
    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(start.opt_state))


def test_run_trains_multi_size_and_writes_a_normal_workdir(run, imported, tmp_path):
    """Two buckets, one compile each; config.json holds the imported model with the
    dataset's class count and the run's dropout; eval and extract read the workdir."""
    from PIL import Image

    from spp_jax.extract import extract_features

    source, _ = imported
    workdir, result, _ = run
    assert sorted(set(result["train_compiles"])) == [(2, 64, 64, 3), (2, 80, 80, 3)]
    assert len(result["train_compiles"]) == 2
    records = metrics_lib.read_metrics(workdir)
    assert [r["size"] for r in records[:2]] == [64, 80]
    assert all(np.isfinite(r["train_loss"]) for r in records[:2])
    assert result["eval"]["64"]["center"]["count"] == 20
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["init_from"] == source
    model = saved["model"]
    assert (model["arch"], model["levels"], model["spp_mode"], model["pool5"]) == (
        "alexnet",
        [6],
        "avg",
        [3, 2],
    )
    assert (model["num_classes"], model["fc_dim"], model["dropout_rate"]) == (10, 16, 0.0)
    assert model["channel_major"] is True and model["center_input"] is False

    trained = workdirs.load_trained(workdir)
    assert trained.step == 10 and trained.model.arch == "alexnet"
    assert trained.model.num_classes == 10
    assert cli.main(["eval", "--workdir", workdir, "--sizes", "64"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "a.png")
    out = extract_features(workdir, str(images), str(tmp_path / "f.npz"), size=64)
    assert out["features"].shape == (1, 16 * 36)  # conv5's 16 channels, the 6x6 average


def test_resume_ignores_init_from_and_is_exact(run, imported, tmp_path):
    """Killed after step 3 and resumed with the same config, after the init_from workdir
    was deleted: the checkpoint (and the run's own config.json) wins, and the parameters
    equal the uninterrupted run's bit for bit."""
    source, _ = imported
    _, uninterrupted, _ = run
    copy = str(tmp_path / "copy")
    shutil.copytree(source, copy)
    workdir = str(tmp_path / "run")
    config = _config(copy, final_eval=False)
    stopped = train_lib.train_and_evaluate(config, workdir, stop_after_step=3)
    assert int(stopped["state"].step) == 3
    shutil.rmtree(copy)
    resumed = train_lib.train_and_evaluate(config, workdir)
    assert int(resumed["state"].step) == 10
    want = train_lib.flatten_params(uninterrupted["state"].params)
    got = train_lib.flatten_params(resumed["state"].params)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_init_params_from_copies_matching_layers_only(imported):
    """A model with another pyramid: fc6's kernel has another shape, so fc6 keeps its
    init whole (bias included); the trunk, fc7 and fc8 (same class count) are copied."""
    source, params = imported
    config = workdirs.read_config(source)
    config.model.levels = (6, 2)
    model = train_lib.create_model(config)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(1), x, train=False), x)
    rng = np.random.default_rng(0)
    fresh = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes["params"]
    )
    out = train_lib.init_params_from(fresh, source)
    for layer in (*TRUNK, "fc7", "fc8"):
        np.testing.assert_array_equal(out[layer]["kernel"], params[layer]["kernel"])
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(out["fc6"][name], fresh["fc6"][name])
    assert out["fc6"]["kernel"].shape == (16 * 40, 16)


def test_bad_init_from_is_a_clear_error(data_dir, imported, tmp_path):
    source, _ = imported
    run_dir = str(tmp_path / "run")
    accepted = r"init_from accepts None or a classification workdir"

    def fails(value, match):
        with pytest.raises(workdirs.WorkdirError, match=match) as e:
            train_lib.train_and_evaluate(_config(value), run_dir)
        assert str(value) in str(e.value) and "init_from accepts" in str(e.value)

    fails(str(tmp_path / "nope"), rf"config key init_from: workdir .* does not exist.*{accepted}")
    (tmp_path / "file").write_text("x")
    fails(str(tmp_path / "file"), "is a file, not a folder")
    (tmp_path / "empty").mkdir()
    fails(str(tmp_path / "empty"), "is not a workdir")
    detection = tmp_path / "detection"
    detection.mkdir()
    (detection / "config.json").write_text(json.dumps({"backbone_config": "default"}))
    fails(str(detection), "is a detection workdir")
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(os.path.join(source, "config.json"), untrained / "config.json")
    fails(str(untrained), "has no checkpoint yet")
    assert not os.path.exists(os.path.join(run_dir, "config.json"))  # failed before writing

    with pytest.raises(SystemExit, match=r"config key init_from: got 3; accepted: None or"):
        cli.load_config("tiny", ["init_from=3"])
    argv = ["train", "--config", "tiny", "--workdir", run_dir, "--set", f"init_from={source}"]
    with pytest.raises(SystemExit, match=r"with init_from, model.levels is the one in"):
        cli.main([*argv, "--set", "model.levels=(6, 2)"])
