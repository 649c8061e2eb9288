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
    info_classes = train_lib.load_dataset(config)[1].num_classes
    model = train_lib.create_model(config, info_classes)
    state = train_lib.load_state(config, workdir, model, info_classes)
    log.info("restored step %d from %s", int(state.step), workdir)

    @jax.jit
    def features(params, x, valid_sizes):
        return model.apply(
            {"params": params}, x, train=False, valid_sizes=valid_sizes, method=SPPNET_FEATURES
        )

    buckets = data_lib.full_image_buckets(size, config.max_aspect)
    pending: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
    feats: dict[int, np.ndarray] = {}
    sizes: dict[int, tuple[int, int]] = {}
    names: list[str] = []
    labels: list[int] = []

    def flush(bucket: tuple[int, int]) -> None:
        items = pending.pop(bucket, [])
        if not items:
            return
        x = np.zeros((batch_size, *bucket, 3), np.float32)
        valid = np.ones((batch_size, 2), np.int32)
        for j, (_, img) in enumerate(items):
            x[j, : img.shape[0], : img.shape[1]] = img
            valid[j] = img.shape[:2]
        f = np.asarray(features(state.params, jnp.asarray(x), jnp.asarray(valid)))
        for j, (i, _) in enumerate(items):
            feats[i] = f[j]
        bar.update(len(items))

    used: set[tuple[int, int]] = set()
    total, stream = _stream(config, images, split, limit)
    bar = tqdm(total=total, desc="extract", unit="img", disable=None)
    # Streams the images: at most batch_size images per bucket are held at a time.
    for i, (name, label, pixels) in enumerate(stream):
        img = data_lib.preprocess_full(pixels, size, config.max_aspect)
        h, w = img.shape[:2]
        bucket = min((b for b in buckets if b[0] >= h and b[1] >= w), key=lambda b: b[0] * b[1])
        used.add(bucket)
        names.append(name)
        if label is not None:
            labels.append(label)
        sizes[i] = (h, w)
        pending[bucket].append((i, img))
        if len(pending[bucket]) == batch_size:
            flush(bucket)
    for bucket in list(pending):
        flush(bucket)
    bar.close()
    if not names:
        raise ValueError(f"no images in {images!r}")
    log.info("compiled %d bucket(s): %s", len(used), sorted(used))
    arrays = {
        "features": np.stack([feats[i] for i in range(len(names))]).astype(np.float32),
        "sizes": np.array([sizes[i] for i in range(len(names))], np.int32),
        "names": np.array(names),
    }
    if labels:
        arrays["labels"] = np.asarray(labels, np.int64)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, out)  # atomic: a reader never sees half a file
    log.info("wrote %s: features %s", out, arrays["features"].shape)
    return arrays


SPPNET_FEATURES = "features"  # the SPPNet method that returns the SPP vector


def _stream(config, images: str, split: str, limit: int | None):
    """``(count, iterator of (name, label or None, uint8 image))`` for a folder or TFDS."""
    tf = data_lib._tf()
    if os.path.isdir(images):
        paths = data_lib.list_images(images)[:limit]

        def from_files():
            for p in paths:
                data = tf.io.read_file(p)
                img = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
                yield p, None, img

        return len(paths), from_files()
    builder = data_lib.get_builder(images, config.get("data_dir"))
    info = data_lib.dataset_info(
        builder, image_key=config.image_key, label_key=config.label_key, splits=(split,)
    )
    total = info.num_examples[split] if limit is None else min(limit, info.num_examples[split])
    ds = data_lib._as_dataset(builder, split, shuffle_seed=None).take(total)

    def from_tfds():
        for i, ex in enumerate(ds.as_numpy_iterator()):
            img = ex[config.image_key]
            if isinstance(img, bytes):
                img = tf.io.decode_image(img, channels=3, expand_animations=False).numpy()
            yield str(i), int(ex[config.label_key]), img

    return total, from_tfds()
