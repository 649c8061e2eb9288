"""``spp-jax extract``: features equal the model's, unreadable files, no training data read."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("orbax.checkpoint")

import jax
import jax.numpy as jnp

from spp_jax import cli, data, extract, train, workdirs
from tests.test_data import RenamedKeys, prepare_renamed, renamed_image

NUM_CLASSES = 4  # not spp_shapes' 10: the count must come from the checkpoint
SIZE = 48  # the tiny config's crop size, extraction's default short side
DIM = 32 * (36 + 9 + 4 + 1)  # tiny ZF-5: conv5 has 32 channels, levels (6, 3, 2, 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir with an untrained tiny model's checkpoint (no training, no train data).

    Its config names a dataset that does not exist, so reading training data fails, and
    other image and label keys (for extraction from :class:`RenamedKeys`).
    """
    tfds_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare_renamed(tfds_dir)
    config = cli.load_config("tiny")
    config.dataset = "spp_jax_no_such_dataset"
    config.data_dir = tfds_dir
    config.image_key, config.label_key = "picture", "y"
    config.model.num_classes = NUM_CLASSES
    model = train.create_model(config)
    tx = train.create_optimizer(config, train.learning_rate_schedule(config, 1))
    state = train.create_train_state(config, model, config.crop_size, tx)
    workdir = str(tmp_path_factory.mktemp("run"))
    train.save_config(config, workdir)
    train.save_checkpoint(train.checkpoint_manager(workdir), state)
    return workdir, model, state.params


def _write(folder, name: str, content: bytes) -> str:
    path = folder / name
    path.write_bytes(content)
    return str(path)


def _png(pixels: np.ndarray) -> bytes:
    return data._tf().io.encode_png(pixels).numpy()


def _jpeg(pixels: np.ndarray) -> bytes:
    return data._tf().io.encode_jpeg(pixels).numpy()


@pytest.fixture
def images(tmp_path):
    """Square images of several kinds (one bucket, one compile) and unreadable files.

    Returns ``(folder, good paths, bad paths)``, both sorted.
    """
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (40, 56, 48, 30, 64)]
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    good = [
        _write(folder, "a_rgb.png", _png(rgb[0])),
        _write(folder, "b_gray.png", _png(rgb[1][..., :1])),
        _write(folder, "c_rgba.png", _png(np.concatenate([rgb[2], rgb[2][..., :1]], -1))),
        _write(folder, "d_16bit.png", _png(rgb[3].astype(np.uint16) * 257)),
        _write(folder, "sub/e_photo.jpg", _jpeg(rgb[4])),
    ]
    bad = [
        _write(folder, "x_corrupt.jpg", _jpeg(rgb[4])[:200] + bytes(400)),
        _write(folder, "x_empty.png", b""),
        _write(folder, "x_notes.jpeg", b"not an image\n"),
        _write(folder, "x_truncated.png", _png(rgb[0])[:300]),
        _write(folder, "x_truncated_jpeg.jpg", _jpeg(rgb[4])[:300]),
    ]
    _write(folder, "readme.txt", b"ignored: not an image extension")
    return folder, sorted(good), sorted(bad)


def test_load_trained_reads_no_training_data(run, tmp_path):
    """The workdir's config, model and parameters; with a config.json that lacks
    ``model.num_classes`` (written before train recorded it), the class count is the
    checkpoint's."""
    workdir, _, params = run
    trained = workdirs.load_trained(workdir)
    assert trained.model.num_classes == trained.config.model.num_classes == NUM_CLASSES
    assert trained.step == 0
    jax.tree.map(np.testing.assert_array_equal, trained.params, jax.device_get(params))
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["model"]["num_classes"]
    (old / "config.json").write_text(json.dumps(saved))
    assert workdirs.read_config(old).model.num_classes is None
    loaded = workdirs.load_trained(old)
    assert loaded.model.num_classes == loaded.config.model.num_classes == NUM_CLASSES
    jax.tree.map(np.testing.assert_array_equal, loaded.params, trained.params)
    # The config's dataset does not exist: loading the training data would fail.
    with pytest.raises(ValueError, match="spp_jax_no_such_dataset"):
        train.load_dataset(loaded.config)


def test_features_equal_the_model_on_each_image_alone(run, images, tmp_path):
    workdir, model, params = run
    folder, good, bad = images
    for path in bad:
        os.remove(path)
    out = str(tmp_path / "feats.npz")
    arrays = extract.extract_features(workdir, str(folder), out, batch_size=4)
    saved = np.load(out)
    assert sorted(saved.files) == ["features", "names", "sizes", "skipped"]
    assert saved["names"].tolist() == good and saved["skipped"].tolist() == []
    np.testing.assert_array_equal(saved["features"], arrays["features"])
    assert saved["features"].shape == (5, DIM) and saved["features"].dtype == np.float32
    np.testing.assert_array_equal(saved["sizes"], [[SIZE, SIZE]] * 5)

    fn = jax.jit(lambda x: model.apply({"params": params}, x, method=extract.SPPNET_FEATURES))
    for path, feats in zip(good, saved["features"], strict=True):
        x = data.preprocess_full(data.read_image(path), SIZE)
        np.testing.assert_allclose(feats, fn(jnp.asarray(x[None]))[0], rtol=1e-5, atol=1e-5)
    # The features differ between images (the comparison above can fail).
    assert np.abs(saved["features"][0] - saved["features"][1]).max() > 1e-3


def test_an_interrupted_extraction_resumes_from_its_saved_batches(run, images, tmp_path, caplog):
    """Stopped by an unreadable file after its first batches, then run again once the
    file is fixed: the saved batches are not computed again, and the result equals an
    uninterrupted extraction; the parts are removed at the end."""
    workdir, _, _ = run
    folder, good, bad = images
    for path in bad[1:]:
        os.remove(path)
    out = str(tmp_path / "feats.npz")
    whole = extract.extract_features(
        workdir, str(folder), str(tmp_path / "whole.npz"), batch_size=2, on_bad_image="skip"
    )
    with pytest.raises(data.BadImageError):
        extract.extract_features(workdir, str(folder), out, batch_size=2)
    parts = sorted(os.listdir(out + ".parts"))
    assert parts == ["000000.npz", "000001.npz", "settings.json"]  # 4 of the 5 good images
    os.remove(bad[0])  # the file fixed (here: removed)
    with caplog.at_level(logging.INFO, logger="spp_jax"):
        again = extract.extract_features(workdir, str(folder), out, batch_size=2)
    assert "4 image(s) from the parts of an earlier call" in caplog.text
    assert again["names"].tolist() == whole["names"].tolist() == good
    np.testing.assert_array_equal(again["features"], whole["features"])
    np.testing.assert_array_equal(again["sizes"], whole["sizes"])
    assert not os.path.exists(out + ".parts")
    # Parts of another extraction (another size) are never mixed in.
    with pytest.raises(data.BadImageError):
        _write(folder, "x_late.png", b"")
        extract.extract_features(workdir, str(folder), out, batch_size=2)
    other = extract.extract_features(
        workdir, str(folder), out, batch_size=2, size=SIZE + 8, on_bad_image="skip"
    )
    assert other["sizes"][0].tolist() == [SIZE + 8, SIZE + 8]


def test_unreadable_file_raises_one_line_error_naming_it(run, images, tmp_path):
    workdir, _, _ = run
    folder, _, bad = images
    out = str(tmp_path / "feats.npz")
    with pytest.raises(data.BadImageError) as e:
        extract.extract_features(workdir, str(folder), out, batch_size=4)
    # The first bad file in sorted order, after the good ones.
    first_bad = min(bad)
    assert str(e.value) == (
        f"cannot read image {first_bad}: jpeg::Uncompress failed. Invalid JPEG data or crop window."
    )
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert not os.path.exists(out)


def test_skip_lists_unreadable_files(run, images, tmp_path, caplog):
    workdir, _, _ = run
    folder, good, bad = images
    out = str(tmp_path / "feats.npz")
    with caplog.at_level(logging.WARNING, logger="spp_jax.extract"):
        extract.extract_features(workdir, str(folder), out, batch_size=4, on_bad_image="skip")
    saved = np.load(out)
    assert saved["names"].tolist() == good
    assert saved["skipped"].tolist() == bad
    assert saved["features"].shape == (len(good), DIM)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path in bad:
        assert any(m.startswith(f"skipping cannot read image {path}: ") for m in warnings)
    summary = [m for m in warnings if m.startswith("skipped ")]
    assert summary == [f"skipped 5 unreadable image(s) of 10: {', '.join(bad)}"]


def test_only_unreadable_files(run, images, tmp_path):
    workdir = run[0]
    folder, good, _ = images
    for path in good:
        os.remove(path)
    with pytest.raises(ValueError, match=r"no readable images in .* \(5 skipped as unreadable\)"):
        extract.extract_features(workdir, str(folder), str(tmp_path / "f.npz"), on_bad_image="skip")


def test_bad_on_bad_image_value(tmp_path):
    # Checked first, before the workdir is read.
    with pytest.raises(
        ValueError, match=r"on_bad_image 'ignore' not accepted; use one of 'raise', 'skip'"
    ):
        extract.extract_features(str(tmp_path), str(tmp_path), "f.npz", on_bad_image="ignore")


def test_tfds_source_with_other_image_and_label_keys(run, tmp_path):
    workdir, model, params = run
    out = str(tmp_path / "feats.npz")
    extract.extract_features(workdir, RenamedKeys.name, out, split="test", batch_size=2)
    saved = np.load(out)
    assert saved["names"].tolist() == [str(i) for i in range(5)]
    assert saved["features"].shape == (5, DIM)
    # Each row is one raw picture's features (TFDS stores the examples in its own
    # order), and its label is that picture's, read through the key "y".
    refs = []
    for i in range(5):
        x = data.preprocess_full(renamed_image(1, i), SIZE)
        refs.append(model.apply({"params": params}, jnp.asarray(x[None]), method="features")[0])
    matched = []
    for label, feats in zip(saved["labels"], saved["features"], strict=True):
        hits = [i for i, ref in enumerate(refs) if np.allclose(feats, ref, rtol=1e-5, atol=1e-5)]
        assert len(hits) == 1 and label == hits[0] % RenamedKeys.NUM_CLASSES, (hits, label)
        matched.append(hits[0])
    assert sorted(matched) == list(range(5))
