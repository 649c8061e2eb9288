"""Jit-compiled SPP feature extraction for images of any size (``spp-jax extract``).

Each image keeps its aspect ratio (short side resized to ``size``, long side capped
at ``max_aspect * size``), is padded with zeros to an aspect-ratio bucket, and is
pooled by the trained network's SPP layer over its own pixels only
(``valid_sizes``). So a feature never depends on the other images of its batch,
and the network compiles once per bucket, not once per image size.

The features are the SPP vectors (the input of fc6): ``C * sum(n * n)`` floats per
image, e.g. ``256 * 50 = 12,800`` for ZF-5 with levels (6, 3, 2, 1).

A file that cannot be read or decoded raises :class:`spp_jax.data.BadImageError`,
one line that names it, or (``on_bad_image="skip"``) is skipped with a warning and
listed in the output's ``skipped``. No training data is read: the model comes from
the workdir (:func:`spp_jax.workdirs.load_trained`).

Images stream through (memory holds at most a batch per bucket), and every computed
batch is saved at once to ``OUT.parts/`` (one ``.npz`` per batch, written atomically):
a call that is interrupted keeps them, and the same call again computes only the
images they lack. The finished ``OUT`` is written atomically and the parts removed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import data as data_lib
from spp_jax import workdirs
from spp_jax._io import atomic_open, atomic_write_json

log = logging.getLogger("spp_jax.extract")

#: What :func:`extract_features` does with an image it cannot read or decode.
ON_BAD_IMAGE = ("raise", "skip")


def extract_features(
    workdir: str,
    images: str,
    out: str,
    *,
    size: int | None = None,
    batch_size: int = 32,
    split: str = "test",
    limit: int | None = None,
    on_bad_image: str = "raise",
) -> dict[str, np.ndarray]:
    """Writes SPP features of ``images`` with the latest checkpoint of ``workdir``.

    Reads no training data: the model comes from the workdir
    (:func:`spp_jax.workdirs.load_trained`).

    Args:
      workdir: a training workdir (``config.json`` and ``checkpoints/``).
      images: a folder of image files, or a TFDS dataset name (``split`` of it).
        JPEG, PNG (8 or 16 bits), GIF (first frame) and BMP; grayscale is repeated
        to RGB and an alpha channel dropped (:func:`spp_jax.data.decode_image`).
      out: the ``.npz`` to write: ``features (N, D)`` float32, ``sizes (N, 2)``
        (the resized image's height and width), ``names (N,)`` (file paths or
        example indices), ``skipped (S,)`` (the names of the images skipped as
        unreadable, empty unless ``on_bad_image="skip"``) and, for TFDS,
        ``labels (N,)``.
      size: short side in pixels (default: the config's ``crop_size``).
      batch_size: images per compiled call.
      split: TFDS split when ``images`` is a dataset name.
      limit: at most this many images (``None``: all).
      on_bad_image: ``"raise"``: a file that cannot be read or decoded (empty,
        not an image, truncated, corrupt) raises :class:`spp_jax.data.BadImageError`,
        whose one-line message names the file; ``"skip"``: it is skipped with a
        warning, and the skipped files are logged at the end and listed in
        ``skipped``.

    Returns:
      The arrays written.

    Raises:
      ValueError: ``on_bad_image`` is not one of :data:`ON_BAD_IMAGE`; the model
        has no SPP head; no image could be read.
      spp_jax.data.BadImageError: an unreadable image, with ``on_bad_image="raise"``.
    """
    from tqdm.auto import tqdm

    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(
            f"on_bad_image {on_bad_image!r} not accepted; use one of "
            f"{', '.join(map(repr, ON_BAD_IMAGE))}"
        )
    head = workdirs.read_config(workdir).model.head
    if head != "spp":
        raise ValueError(
            f"feature extraction needs an SPP head, the model in {workdir!r} has head "
            f"{head!r}; accepted: 'spp'"
        )
    trained = workdirs.load_trained(workdir)
    config, model = trained.config, trained.model
    size = size or config.crop_size
    log.info("restored step %d from %s", trained.step, workdir)
    parts = _Parts(
        out,
        {
            "workdir": os.path.abspath(workdir),
            "step": trained.step,
            "images": os.path.abspath(images) if os.path.isdir(images) else images,
            "split": split,
            "size": size,
            "limit": limit,
        },
    )

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
    skipped: list[str] = []

    def flush(bucket: tuple[int, int]) -> None:
        items = pending.pop(bucket, [])
        if not items:
            return
        x = np.zeros((batch_size, *bucket, 3), np.float32)
        valid = np.ones((batch_size, 2), np.int32)
        for j, (_, img) in enumerate(items):
            x[j, : img.shape[0], : img.shape[1]] = img
            valid[j] = img.shape[:2]
        f = np.asarray(features(trained.params, jnp.asarray(x), jnp.asarray(valid)))
        for j, (i, _) in enumerate(items):
            feats[i] = f[j]
        parts.save([names[i] for i, _ in items], f[: len(items)])
        bar.update(len(items))

    used: set[tuple[int, int]] = set()
    total, stream = _stream(config, images, split, limit, size)
    bar = tqdm(total=total, desc="extract", unit="img", disable=None)
    # Streams the images: at most batch_size images per bucket are held at a time.
    for name, label, load in stream:
        saved = parts.done.get(name)
        if saved is not None:  # computed by an earlier, interrupted call
            i = len(names)
            names.append(name)
            if label is not None:
                labels.append(label)
            feats[i], sizes[i] = saved
            bar.update(1)
            continue
        try:
            img = data_lib.preprocess_full(load(), size, config.max_aspect)
        except data_lib.BadImageError as e:
            if on_bad_image == "raise":
                bar.close()
                raise
            log.warning("skipping %s", e)
            skipped.append(name)
            bar.update(1)
            continue
        h, w = img.shape[:2]
        bucket = min((b for b in buckets if b[0] >= h and b[1] >= w), key=lambda b: b[0] * b[1])
        used.add(bucket)
        i = len(names)
        names.append(name)
        if label is not None:
            labels.append(label)
        sizes[i] = (h, w)
        parts.remember_size(name, (h, w))
        pending[bucket].append((i, img))
        if len(pending[bucket]) == batch_size:
            flush(bucket)
    for bucket in list(pending):
        flush(bucket)
    bar.close()
    if skipped:
        log.warning(
            "skipped %d unreadable image(s) of %d: %s", len(skipped), total, ", ".join(skipped)
        )
    if not names:
        raise ValueError(
            f"no readable images in {images!r}"
            + (f" ({len(skipped)} skipped as unreadable)" if skipped else "")
        )
    log.info("compiled %d bucket(s): %s", len(used), sorted(used))
    arrays = {
        "features": np.stack([feats[i] for i in range(len(names))]).astype(np.float32),
        "sizes": np.array([sizes[i] for i in range(len(names))], np.int32),
        "names": np.array(names),
        "skipped": np.array(skipped, dtype=str),
    }
    if labels:
        arrays["labels"] = np.asarray(labels, np.int64)
    if parts.resumed:
        log.info("%d image(s) from the parts of an earlier call", parts.resumed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_open(out, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    parts.remove()
    log.info("wrote %s: features %s", out, arrays["features"].shape)
    return arrays


class _Parts:
    """``OUT.parts/``: the batches computed so far, so an interrupted extraction
    resumes. Parts of another extraction (other workdir, step, images, size, ...) are
    removed, never mixed in."""

    def __init__(self, out: str, settings: dict):
        self.dir = out + ".parts"
        self.done: dict[str, tuple[np.ndarray, tuple[int, int]]] = {}
        self.resumed = 0
        meta = os.path.join(self.dir, "settings.json")
        if os.path.isdir(self.dir):
            try:
                with open(meta) as f:
                    same = json.load(f) == settings
            except (OSError, ValueError):
                same = False
            if not same:
                log.info("%s holds parts of another extraction: removed", self.dir)
                shutil.rmtree(self.dir)
        self._count = 0
        if os.path.isdir(self.dir):
            for name in sorted(os.listdir(self.dir)):
                if not (name.endswith(".npz") and name[:-4].isdigit()):
                    continue  # settings.json, or a part cut short by the interruption
                with np.load(os.path.join(self.dir, name)) as part:
                    rows = zip(part["names"], part["features"], part["sizes"], strict=True)
                    for n, f, hw in rows:
                        self.done[str(n)] = (f, (int(hw[0]), int(hw[1])))
                self._count = max(self._count, int(name[:-4]) + 1)
            self.resumed = len(self.done)
        else:
            os.makedirs(self.dir)
            atomic_write_json(meta, settings)
        self._sizes: dict[str, tuple[int, int]] = {}

    def remember_size(self, name: str, hw: tuple[int, int]) -> None:
        self._sizes[name] = hw

    def save(self, names: list[str], features: np.ndarray) -> None:
        path = os.path.join(self.dir, f"{self._count:06d}.npz")
        self._count += 1
        sizes = np.array([self._sizes.pop(n) for n in names], np.int32)
        with atomic_open(path, "wb") as f:
            np.savez(f, names=np.array(names), features=features, sizes=sizes)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


SPPNET_FEATURES = "features"  # the SPPNet method that returns the SPP vector


def _read_reduced(path: str, size: int) -> np.ndarray:
    return data_lib.read_image_reduced(path, size)[0]


Loader = Callable[[], np.ndarray]


def _stream(
    config, images: str, split: str, limit: int | None, size: int
) -> tuple[int, Iterator[tuple[str, int | None, Loader]]]:
    """``(count, iterator of (name, label or None, loader))`` for a folder or TFDS.

    ``loader()`` returns the image's uint8 pixels or raises
    :class:`spp_jax.data.BadImageError`; a file's JPEG far larger than ``size`` on the
    short side is decoded at a reduced size (:func:`spp_jax.data.read_image_reduced`).
    """
    if os.path.isdir(images):
        paths = data_lib.list_images(images)[:limit]

        def from_files():
            for p in paths:
                yield p, None, functools.partial(_read_reduced, p, size)

        return len(paths), from_files()
    builder = data_lib.get_builder(images, config.data_dir)
    info = data_lib.dataset_info(
        builder, image_key=config.image_key, label_key=config.label_key, splits=(split,)
    )
    total = info.num_examples[split] if limit is None else min(limit, info.num_examples[split])
    ds = data_lib._as_dataset(builder, split, shuffle_seed=None, image_key=info.image_key)
    ds = ds.take(total)

    def from_tfds():
        for i, ex in enumerate(ds.as_numpy_iterator()):
            img = ex[info.image_key]
            if isinstance(img, bytes):
                where = f"{images}[{split}] example {i}"
                load = functools.partial(data_lib.decode_image, img, where)
            else:
                load = functools.partial(np.asarray, img)
            yield str(i), int(ex[info.label_key]), load

    return total, from_tfds()
