"""Input pipeline: size schedules, buckets, sharding, full-image padding, offline errors."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

import tensorflow_datasets as tfds

from spp_jax import data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    builder = data.get_builder("spp_shapes/tiny", str(tmp_path_factory.mktemp("tfds")))
    return builder, data.dataset_info(builder)


def renamed_image(split_id: int, index: int) -> np.ndarray:
    """Example ``index``'s grayscale uint8 ``(h, w, 1)`` picture in :class:`RenamedKeys`."""
    rng = np.random.default_rng([split_id, index])
    h, w = (int(v) for v in rng.integers(12, 30, 2))
    return rng.integers(0, 256, (h, w, 1), dtype=np.uint8)


class RenamedKeys(tfds.core.GeneratorBasedBuilder):
    """A tiny dataset whose image is ``"picture"`` (grayscale PNG) and label ``"y"``."""

    name = "spp_jax_test_renamed_keys"
    VERSION = tfds.core.Version("1.0.0")
    SPLITS: ClassVar[dict[str, tuple[int, int]]] = {"train": (0, 8), "test": (1, 5)}  # id, n
    NUM_CLASSES = 3

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "picture": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
                    "y": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
                }
            )
        )

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(*spec) for name, spec in self.SPLITS.items()}

    def _generate_examples(self, split_id: int, n: int):
        for i in range(n):
            yield i, {"picture": renamed_image(split_id, i), "y": i % self.NUM_CLASSES}


def prepare_renamed(data_dir: str) -> RenamedKeys:
    builder = RenamedKeys(data_dir=data_dir)
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def renamed(tmp_path_factory):
    builder = prepare_renamed(str(tmp_path_factory.mktemp("tfds_renamed")))
    return builder, data.dataset_info(builder, image_key="picture", label_key="y")


def test_size_schedules():
    assert [data.train_size_for_epoch((224,), "single", e, 0) for e in range(3)] == [224] * 3
    assert [data.train_size_for_epoch((224, 180), "paper", e, 0) for e in range(3)] == [
        224,
        180,
        224,
    ]
    drawn = [data.train_size_for_epoch((180, 224), "random", e, 0) for e in range(50)]
    assert all(180 <= s <= 224 for s in drawn) and len(set(drawn)) > 10
    assert drawn == [data.train_size_for_epoch((180, 224), "random", e, 0) for e in range(50)]
    with pytest.raises(ValueError, match="'bogus' not accepted"):
        data.train_size_for_epoch((224,), "bogus", 0, 0)
    with pytest.raises(ValueError, match="takes one size"):
        data.train_size_for_epoch((224, 180), "single", 0, 0)


def test_missing_dataset_fails_fast_without_network(tmp_path):
    builder = data.get_builder("imagenette", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tfds build imagenette"):
        data.dataset_info(builder)
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_set'"):
        data.get_builder("no_such_set", str(tmp_path))


def test_train_batches_static_shape_and_process_shards(tiny):
    builder, info = tiny
    kw = dict(split="train", epoch=1, crop_size=48, global_batch_size=8, seed=5)
    one = list(data.train_batches(builder, info, size=40, local_batch_size=8, **kw))
    assert len(one) == data.steps_per_epoch(info, "train", 8) == 5
    assert all(b["image"].shape == (8, 40, 40, 3) and b["image"].dtype == np.float32 for b in one)
    halves = [
        list(
            data.train_batches(
                builder, info, size=40, local_batch_size=4, process_index=p, process_count=2, **kw
            )
        )
        for p in range(2)
    ]
    for step, batch in enumerate(one):
        # The union of the two processes' local batches is the one-process batch.
        both = np.concatenate([halves[0][step]["label"], halves[1][step]["label"]])
        assert sorted(both.tolist()) == sorted(batch["label"].tolist())
        imgs = np.concatenate([halves[0][step]["image"], halves[1][step]["image"]])
        key = lambda a: a.reshape(len(a), -1).sum(1).round(3).tolist()
        assert sorted(key(imgs)) == sorted(key(batch["image"]))
    skipped = list(
        data.train_batches(builder, info, size=40, local_batch_size=8, skip_batches=3, **kw)
    )
    np.testing.assert_array_equal(skipped[0]["image"], one[3]["image"])


@pytest.mark.parametrize("crop_mode", data.CROP_MODES)
def test_multi_size_is_the_same_crop_at_another_resolution(tiny, crop_mode):
    # The 40-px batch is the 48-px batch (crop_size 48: the crops themselves) resized to
    # 40: same examples, same crop boxes, same flips. Normalising is affine per channel
    # and resizing averages with weights summing to 1, so the order of the two does not
    # matter beyond rounding.
    tf = data._tf()
    builder, info = tiny
    kw = dict(
        split="train", epoch=1, crop_size=48, global_batch_size=8, seed=5, crop_mode=crop_mode
    )
    small = next(data.train_batches(builder, info, size=40, local_batch_size=8, **kw))
    big = next(data.train_batches(builder, info, size=48, local_batch_size=8, **kw))
    assert small["image"].shape == (8, 40, 40, 3) and big["image"].shape == (8, 48, 48, 3)
    np.testing.assert_array_equal(small["label"], big["label"])

    def resized(images):
        return np.asarray(tf.image.resize(images, [40, 40], antialias=True))

    tol = 1e-4  # normalised units; one grey level is about 1 / 58
    np.testing.assert_allclose(small["image"], resized(big["image"]), rtol=0, atol=tol)
    # The tolerance tells crops apart: the crop shifted by one pixel, or flipped, fails.
    for other in (np.roll(big["image"], 1, axis=2), big["image"][:, :, ::-1]):
        diff = np.abs(small["image"] - resized(other)).reshape(8, -1).max(1)
        assert (diff > 100 * tol).all(), diff


def _full_size(h: int, w: int, size: int, max_aspect: float = 2.0) -> tuple[int, int]:
    """The full-image size in eval: short side ``size``, long side rounded, then capped."""
    short, long = min(h, w), max(h, w)
    long = min(round(long * size / short), int(max_aspect * size))
    return (size, long) if h <= w else (long, size)


def test_eval_batches_cover_every_example_once(tiny):
    builder, info = tiny
    raw_test = [
        (ex["image"].shape[:2], int(ex["label"]))
        for ex in tfds.as_numpy(builder.as_dataset(split="test"))
    ]
    assert len(raw_test) == 20
    for mode in data.EVAL_MODES:
        batches = list(
            data.eval_batches(builder, info, split="test", mode=mode, size=40, local_batch_size=8)
        )
        assert sum(b["mask"].sum() for b in batches) == info.num_examples["test"] == 20
        for b in batches:
            assert b["image"].shape[0] == 8 and min(b["image"].shape[1:3]) == 40
        # Every example once: its label and (full mode) its resized size, from the raw image.
        seen = sorted(
            (int(label), *(map(int, vs) if mode == "full" else ()))
            for b in batches
            for label, vs, m in zip(
                b["label"], b.get("valid_sizes", b["label"]), b["mask"], strict=True
            )
            if m
        )
        assert seen == sorted(
            (label, *(_full_size(h, w, 40) if mode == "full" else ())) for (h, w), label in raw_test
        )
        if mode == "full":
            for b in batches:
                h, w = b["image"].shape[1:3]
                assert (h, w) in data.full_image_buckets(40)
                for img, (vh, vw), m in zip(b["image"], b["valid_sizes"], b["mask"], strict=True):
                    if m:
                        assert min(vh, vw) == 40 and vh <= h and vw <= w
                        assert not img[vh:].any() and not img[:, vw:].any()  # zero padding


def test_two_process_eval_uses_one_bucket_and_equal_batch_counts(tiny):
    builder, info = tiny
    counts, seen = [], 0.0
    for p in range(2):
        batches = list(
            data.eval_batches(
                builder,
                info,
                split="test",
                mode="full",
                size=40,
                local_batch_size=8,
                process_index=p,
                process_count=2,
            )
        )
        counts.append(len(batches))
        seen += sum(b["mask"].sum() for b in batches)
        assert {b["image"].shape for b in batches} == {(8, 80, 80, 3)}
    assert counts[0] == counts[1] and seen == 20


# ------------------------------------------------------- other feature keys, decoding


def test_pipelines_read_the_configured_image_and_label_keys(renamed):
    builder, info = renamed
    assert (info.image_key, info.label_key, info.num_classes) == ("picture", "y", 3)
    assert info.num_examples == {"train": 8, "test": 5}
    kw = dict(split="train", epoch=0, crop_size=16, global_batch_size=4, local_batch_size=4)
    for crop_mode in data.CROP_MODES:
        batches = list(data.train_batches(builder, info, size=12, crop_mode=crop_mode, **kw))
        assert len(batches) == 2
        for b in batches:
            assert b["image"].shape == (4, 12, 12, 3)
            # Grayscale pictures: the three channels are one grey level, normalised.
            grey = b["image"] * np.array(data.STDDEV_RGB) + np.array(data.MEAN_RGB)
            np.testing.assert_allclose(grey[..., 0], grey[..., 1], atol=1e-3)
        labels = np.concatenate([b["label"] for b in batches])
        assert sorted(labels.tolist()) == sorted(i % 3 for i in range(8))

    # Full-image evaluation: every example once, pixel for pixel the same as
    # preprocess_full of the raw picture (as `spp-jax extract` computes it).
    raw = [renamed_image(1, i) for i in range(5)]
    refs = {i: data.preprocess_full(img, 16) for i, img in enumerate(raw)}
    matched = []
    batches = data.eval_batches(
        builder, info, split="test", mode="full", size=16, local_batch_size=2
    )
    for b in batches:
        for img, (vh, vw), label, m in zip(
            b["image"], b["valid_sizes"], b["label"], b["mask"], strict=True
        ):
            if not m:
                continue
            hits = [
                i
                for i, ref in refs.items()
                if ref.shape[:2] == (vh, vw) and np.allclose(img[:vh, :vw], ref, atol=1e-5)
            ]
            assert len(hits) == 1, (vh, vw, hits)
            assert label == hits[0] % 3
            matched.append(hits[0])
    assert sorted(matched) == list(range(5))


def _png(pixels: np.ndarray) -> bytes:
    return data._tf().io.encode_png(pixels).numpy()


def test_decode_image_converts_to_rgb_uint8():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(data.decode_image(_png(rgb)), rgb)
    grey = data.decode_image(_png(rgb[..., :1]))
    np.testing.assert_array_equal(grey, np.repeat(rgb[..., :1], 3, axis=2))
    alpha = np.full((5, 7, 1), 7, np.uint8)
    np.testing.assert_array_equal(data.decode_image(_png(np.concatenate([rgb, alpha], -1))), rgb)
    wide = rgb.astype(np.uint16) * 256 + 255  # 16 bits: the high byte is kept
    out = data.decode_image(_png(wide))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)
    # preprocess_full takes the same kinds of arrays and gives the RGB result.
    ref = data.preprocess_full(rgb, 10)
    np.testing.assert_array_equal(data.preprocess_full(wide, 10), ref)
    np.testing.assert_array_equal(
        data.preprocess_full(rgb[..., 0], 10), data.preprocess_full(grey, 10)
    )


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "the file is empty"),
        (b"name,label\nx,1\n", "Unknown image file format"),
        ("truncated_png", "Invalid PNG data"),
        ("truncated_jpeg", "jpeg::Uncompress failed"),
    ],
)
def test_bad_image_files_raise_one_line_error_naming_the_file(tmp_path, content, reason):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    if content == "truncated_png":
        content = _png(rgb)[:100]
    elif content == "truncated_jpeg":
        content = data._tf().io.encode_jpeg(rgb).numpy()[:300]
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(data.BadImageError) as e:
        data.read_image(str(path))
    message = str(e.value)
    assert message.startswith(f"cannot read image {path}: {reason}"), message
    assert "\n" not in message and "Op:" not in message and "function_node" not in message
    assert e.value.name == str(path) and e.value.__cause__ is None
    assert isinstance(e.value, ValueError)


def test_missing_file_raises_bad_image_error(tmp_path):
    with pytest.raises(data.BadImageError, match=r"cannot read image .*nope\.png: No such file"):
        data.read_image(str(tmp_path / "nope.png"))
