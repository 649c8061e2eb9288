"""Jit-compiled SPP feature extraction for images of any size (``spp-jax extract``).

Each image keeps its aspect ratio, is padded to an aspect-ratio bucket and is pooled
over its own pixels only (``valid_sizes``), so a feature never depends on the other
images of its batch and the network compiles once per bucket
(:func:`extract_features` says what is written).

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import data as data_lib
from spp_jax import workdirs
from spp_jax._io import atomic_write_json, atomic_write_npz

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

    _check_arguments(workdir, on_bad_image)
    trained = workdirs.load_trained(workdir)
    config = trained.config
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
    total, stream = _stream(config, images, split, limit, size)
    bar = tqdm(total=total, desc="extract", unit="img", disable=None)
    extraction = _Extraction(trained, size, batch_size, parts, bar)
    # Streams the images: at most batch_size images per bucket are held at a time.
    for name, label, load in stream:
        saved = parts.done.get(name)
        if saved is not None:  # computed by an earlier, interrupted call
            extraction.add_computed(name, label, *saved)
            continue
        try:
            img = data_lib.preprocess_full(load(), size, config.max_aspect)
        except data_lib.BadImageError as e:
            if on_bad_image == "raise":
                bar.close()
                raise
            log.warning("skipping %s", e)
            extraction.skip(name)
            continue
        extraction.add_image(name, label, img)
    extraction.flush_all()
    bar.close()
    if extraction.skipped:
        log.warning(
            "skipped %d unreadable image(s) of %d: %s",
            len(extraction.skipped),
            total,
            ", ".join(extraction.skipped),
        )
    if not extraction.names:
        raise ValueError(
            f"no readable images in {images!r}"
            + (f" ({len(extraction.skipped)} skipped as unreadable)" if extraction.skipped else "")
        )
    log.info("compiled %d bucket(s): %s", len(extraction.used), sorted(extraction.used))
    arrays = extraction.arrays()
    _write_output(out, arrays, parts)
    return arrays


def _write_output(out: str, arrays: dict[str, np.ndarray], parts: _Parts) -> None:
    """Writes ``out`` atomically, then removes the parts, which it now holds."""
    if parts.resumed:
        log.info("%d image(s) from the parts of an earlier call", parts.resumed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_npz(out, arrays)
    parts.remove()
    log.info("wrote %s: features %s", out, arrays["features"].shape)


def _check_arguments(workdir: str, on_bad_image: str) -> None:
    """Raises a ValueError naming an ``on_bad_image`` not in :data:`ON_BAD_IMAGE`, or a
    workdir whose model has no SPP head (its features would not be SPP vectors)."""
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


class _Extraction:
    """The rows of one extraction in stream order, and the images waiting for a batch.

    Each image waits in the smallest bucket that holds it; a bucket's ``batch_size``
    images run as one jitted call, whose features are saved to the parts at once.
    """

    def __init__(
        self, trained: workdirs.Trained, size: int, batch_size: int, parts: _Parts, bar: Any
    ):
        model, self._params = trained.model, trained.params
        self._buckets = data_lib.full_image_buckets(size, trained.config.max_aspect)
        self._batch_size, self._parts, self._bar = batch_size, parts, bar
        self._pending: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
        self.used: set[tuple[int, int]] = set()
        self.names: list[str] = []
        self.labels: list[int] = []
        self.skipped: list[str] = []
        self._feats: dict[int, np.ndarray] = {}
        self._sizes: dict[int, tuple[int, int]] = {}

        @jax.jit
        def features(params, x, valid_sizes):
            return model.apply(
                {"params": params}, x, train=False, valid_sizes=valid_sizes, method=SPPNET_FEATURES
            )

        self._features = features

    def _new_row(self, name: str, label: int | None) -> int:
        self.names.append(name)
        if label is not None:
            self.labels.append(label)
        return len(self.names) - 1

    def add_computed(
        self, name: str, label: int | None, features: np.ndarray, hw: tuple[int, int]
    ) -> None:
        """A row whose features an earlier, interrupted call saved."""
        i = self._new_row(name, label)
        self._feats[i], self._sizes[i] = features, hw
        self._bar.update(1)

    def skip(self, name: str) -> None:
        """An image that could not be read: listed in ``skipped``, no row."""
        self.skipped.append(name)
        self._bar.update(1)

    def add_image(self, name: str, label: int | None, img: np.ndarray) -> None:
        """A row for the preprocessed ``img``, computed when its bucket holds a batch."""
        h, w = img.shape[:2]
        fits = (b for b in self._buckets if b[0] >= h and b[1] >= w)
        bucket = min(fits, key=lambda b: b[0] * b[1])
        self.used.add(bucket)
        i = self._new_row(name, label)
        self._sizes[i] = (h, w)
        self._parts.remember_size(name, (h, w))
        self._pending[bucket].append((i, img))
        if len(self._pending[bucket]) == self._batch_size:
            self._flush(bucket)

    def flush_all(self) -> None:
        """Computes the images still waiting (partly filled batches)."""
        for bucket in list(self._pending):
            self._flush(bucket)

    def _flush(self, bucket: tuple[int, int]) -> None:
        items = self._pending.pop(bucket, [])
        if not items:
            return
        x = np.zeros((self._batch_size, *bucket, 3), np.float32)
        valid = np.ones((self._batch_size, 2), np.int32)
        for j, (_, img) in enumerate(items):
            x[j, : img.shape[0], : img.shape[1]] = img
            valid[j] = img.shape[:2]
        f = np.asarray(self._features(self._params, jnp.asarray(x), jnp.asarray(valid)))
        for j, (i, _) in enumerate(items):
            self._feats[i] = f[j]
        self._parts.save([self.names[i] for i, _ in items], f[: len(items)])
        self._bar.update(len(items))

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the output file (:func:`extract_features`)."""
        rows = range(len(self.names))
        arrays = {
            "features": np.stack([self._feats[i] for i in rows]).astype(np.float32),
            "sizes": np.array([self._sizes[i] for i in rows], np.int32),
            "names": np.array(self.names),
            "skipped": np.array(self.skipped, dtype=str),
        }
        if self.labels:
            arrays["labels"] = np.asarray(self.labels, np.int64)
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
        atomic_write_npz(path, {"names": np.array(names), "features": features, "sizes": sizes})

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
