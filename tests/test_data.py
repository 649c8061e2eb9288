"""Input pipeline: size schedules, buckets, sharding, full-image padding, offline errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from spp_jax import data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    builder = data.get_builder("spp_shapes/tiny", str(tmp_path_factory.mktemp("tfds")))
    return builder, data.dataset_info(builder)


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
    # Multi-size: the same crop at another resolution.
    big = list(data.train_batches(builder, info, size=48, local_batch_size=8, **kw))
    np.testing.assert_array_equal(big[0]["label"], one[0]["label"])


def test_eval_batches_cover_every_example_once(tiny):
    builder, info = tiny
    for mode in data.EVAL_MODES:
        batches = list(
            data.eval_batches(builder, info, split="test", mode=mode, size=40, local_batch_size=8)
        )
        assert sum(b["mask"].sum() for b in batches) == info.num_examples["test"] == 20
        for b in batches:
            assert b["image"].shape[0] == 8 and min(b["image"].shape[1:3]) == 40
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
