"""Jit-compiled SPP feature extraction for images of any size (``spp-jax extract``).

Each image keeps its aspect ratio (short side resized to ``size``, long side capped
at ``max_aspect * size``), is padded with zeros to an aspect-ratio bucket, and is
pooled by the trained network's SPP layer over its own pixels only
(``valid_sizes``). So a feature never depends on the other images of its batch,
and the network compiles once per bucket, not once per image size.

The features are the SPP vectors (the input of fc6): ``C * sum(n * n)`` floats per
image, e.g. ``256 * 50 = 12,800`` for ZF-5 with levels (6, 3, 2, 1).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import data as data_lib
from spp_jax import train as train_lib

log = logging.getLogger("spp_jax.extract")


def _batched(order: list[int], batch_size: int):
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def extract_features(
    workdir: str,
    images: str,
    out: str,
    *,
    size: int | None = None,
    batch_size: int = 32,
    split: str = "test",
    limit: int | None = None,
) -> dict[str, np.ndarray]:
    """Writes SPP features of ``images`` with the latest checkpoint of ``workdir``.

    Args:
      workdir: a training workdir (``config.json`` and ``checkpoints/``).
      images: a folder of image files, or a TFDS dataset name (``split`` of it).
      out: the ``.npz`` to write: ``features (N, D)`` float32, ``sizes (N, 2)``
        (the resized image's height and width), ``names (N,)`` (file paths or
        example indices) and, for TFDS, ``labels (N,)``.
      size: short side in pixels (default: the config's ``crop_size``).
      batch_size: images per compiled call.
      split: TFDS split when ``images`` is a dataset name.
      limit: at most this many images (``None``: all).

    Returns:
      The arrays written.
    """
    from tqdm.auto import tqdm

    config = train_lib.load_config(workdir)
    size = size or config.crop_size
    if config.model.head != "spp":
        raise ValueError(
            f"feature extraction needs an SPP head, the model in {workdir!r} has head "
            f"{config.model.head!r}; accepted: 'spp'"
        )
    names, labels, pixels = _read(config, images, split, limit)
    info_classes = _num_classes(config)
    model = train_lib.create_model(config, info_classes)
    state = train_lib.load_state(config, workdir, model, info_classes)
    log.info("restored step %d from %s; extracting %d images", int(state.step), workdir, len(names))

    @jax.jit
    def features(params, x, valid_sizes):
        return model.apply(
            {"params": params}, x, train=False, valid_sizes=valid_sizes, method=SPPNET_FEATURES
        )

    prepped = [data_lib.preprocess_full(p, size, config.max_aspect) for p in pixels]
    buckets = data_lib.full_image_buckets(size, config.max_aspect)
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(prepped):
        h, w = img.shape[:2]
        fitting = [b for b in buckets if b[0] >= h and b[1] >= w]
        by_bucket[min(fitting, key=lambda b: b[0] * b[1])].append(i)

    result: list[np.ndarray | None] = [None] * len(prepped)
    bar = tqdm(total=len(prepped), desc="extract", unit="img", disable=None)
    for (bh, bw), idx in sorted(by_bucket.items()):
        for chunk in _batched(idx, batch_size):
            x = np.zeros((batch_size, bh, bw, 3), np.float32)
            valid = np.ones((batch_size, 2), np.int32)
            for j, i in enumerate(chunk):
                h, w = prepped[i].shape[:2]
                x[j, :h, :w] = prepped[i]
                valid[j] = (h, w)
            f = np.asarray(features(state.params, jnp.asarray(x), jnp.asarray(valid)))
            for j, i in enumerate(chunk):
                result[i] = f[j]
            bar.update(len(chunk))
    bar.close()
    log.info("compiled %d bucket(s): %s", len(by_bucket), sorted(by_bucket))
    arrays = {
        "features": np.stack(result).astype(np.float32),
        "sizes": np.array([p.shape[:2] for p in prepped], np.int32),
        "names": np.array(names),
    }
    if labels is not None:
        arrays["labels"] = np.asarray(labels, np.int64)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)  # atomic: a reader never sees half a file
    log.info("wrote %s: features %s", out, arrays["features"].shape)
    return arrays


SPPNET_FEATURES = "features"  # the SPPNet method that returns the SPP vector


def _num_classes(config) -> int:
    builder = data_lib.get_builder(config.dataset, config.get("data_dir"))
    return int(builder.info.features[config.label_key].num_classes)


def _read(config, images: str, split: str, limit: int | None):
    if os.path.isdir(images):
        items = data_lib.load_image_folder(images)[:limit]
        return [p for p, _ in items], None, [a for _, a in items]
    builder = data_lib.get_builder(images, config.get("data_dir"))
    ds = data_lib._as_dataset(builder, split, shuffle_seed=None)
    if limit is not None:
        ds = ds.take(limit)
    tf = data_lib._tf()
    names, labels, pixels = [], [], []
    for i, ex in enumerate(ds.as_numpy_iterator()):
        img = ex[config.image_key]
        if isinstance(img, bytes):
            img = tf.io.decode_image(img, channels=3, expand_animations=False).numpy()
        names.append(str(i))
        labels.append(int(ex[config.label_key]))
        pixels.append(img)
    if not names:
        raise ValueError(f"TFDS {images!r} split {split!r} has no examples")
    return names, labels, pixels
