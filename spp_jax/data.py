"""TFDS input pipelines with resolution buckets, for SPP-net training and evaluation.

Every batch has one static shape (a "bucket"), so the jitted/pmapped step compiles
once per bucket and never per image: :func:`train_batches` yields one epoch of the
paper's crops, resized to the epoch's size (multi-size training, paper section
3.2); :func:`eval_batches` a centre crop, or the FULL image padded to an
aspect-ratio bucket with ``valid_sizes``, so that the model's SPP layer pools each
image over its own pixels only.

The order of an epoch is a function of ``(seed, epoch)`` only, and process ``p`` of
``P`` keeps positions ``p, p+P, ...`` of it, before decoding: the union of the
processes' batches is the same whatever ``P`` is, every process yields the same
number of batches, and a resumed run skips to the exact batch it stopped at
(``docs/scale_out.md``, "Data").

Datasets: any prepared TFDS image classification dataset by name
(:func:`get_builder`; nothing is downloaded); the default is the built-in
``spp_shapes`` (:mod:`spp_jax.datasets`), generated locally.

Each batch is a dict of NumPy arrays: ``image`` float32 ``(b, H, W, 3)``
normalised with the ImageNet mean/std (padding is 0 after normalisation),
``label`` int32 ``(b,)``, ``mask`` float32 ``(b,)`` (0 for filler examples of a
padded final batch) and, in ``full`` mode, ``valid_sizes`` int32 ``(b, 2)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from spp_jax._padding import pad_rows

log = logging.getLogger("spp_jax.data")

BUILTIN = "spp_shapes"
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
EVAL_MODES = ("center", "full")
CROP_MODES = ("paper", "area")

Batch = dict[str, np.ndarray]


def _tf():
    import tensorflow as tf

    # tf.data only: keep TensorFlow off any accelerator JAX wants.
    with contextlib.suppress(RuntimeError):  # already initialised
        tf.config.set_visible_devices([], "GPU")
    return tf


def _tfds():
    import tensorflow_datasets as tfds

    import spp_jax.datasets  # noqa: F401  (registers the built-in builder)

    return tfds


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else TFDS's default ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the pipelines need to know about a dataset."""

    name: str
    num_classes: int
    num_examples: dict[str, int]
    image_key: str
    label_key: str


def get_builder(name: str = BUILTIN, data_dir: str | None = None):
    """Returns the TFDS builder for ``name``, preparing only the built-in dataset.

    Args:
      name: a TFDS name such as ``"imagenette"``, ``"caltech101"``,
        ``"oxford_flowers102"``, ``"imagenet2012"`` or the built-in ``"spp_shapes"``
        (``"spp_shapes/tiny"`` for a small version).
      data_dir: TFDS data directory (default :func:`default_data_dir`).

    Raises:
      FileNotFoundError: ``name`` is not the built-in dataset and is not prepared
        in ``data_dir``; the message says how to get it. Nothing is downloaded.
    """
    tfds = _tfds()
    data_dir = data_dir or default_data_dir()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name
        raise ValueError(
            f"unknown TFDS dataset {name!r} ({e}); accepted: any name from `tfds.list_builders()`"
            f", e.g. 'imagenette', 'caltech101', 'oxford_flowers102', or {BUILTIN!r}"
        ) from e
    if name.split("/")[0] == BUILTIN:
        import jax

        # With several processes, process 0 builds and the others wait for it (they may
        # share data_dir; two builders racing for one directory fail).
        if jax.process_index() == 0 and not _is_prepared(builder):
            log.info("building the built-in dataset %s in %s (offline, < 1 min)", name, data_dir)
            builder.download_and_prepare()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"spp_jax built {name}")
            builder = tfds.builder(name, data_dir=data_dir)
    return builder


def _is_prepared(builder) -> bool:
    try:
        return bool(builder.is_prepared())
    except AttributeError:  # older TFDS
        return os.path.isdir(builder.data_dir) and bool(builder.info.splits)


def _as_dataset(builder, split: str, *, shuffle_seed: int | None, image_key: str):
    """``split`` as a ``tf.data.Dataset`` of examples, ``image_key`` left encoded.

    An encoded image feature (:class:`tfds.features.Image`) is decoded later, by
    :func:`_decode`, so that only the examples a process keeps are decoded.
    """
    tfds = _tfds()
    read_config = tfds.ReadConfig(
        shuffle_seed=shuffle_seed,
        interleave_cycle_length=16,
        add_tfds_id=False,
    )
    decoders = None
    if isinstance(builder.info.features[image_key], tfds.features.Image):
        decoders = {image_key: tfds.decode.SkipDecoding()}
    try:
        return builder.as_dataset(
            split=split,
            shuffle_files=shuffle_seed is not None,
            read_config=read_config,
            decoders=decoders,
        )
    except AssertionError as e:  # TFDS: "could not find data in ..."
        name = builder.name
        root = builder.data_dir.split(os.sep + name + os.sep)[0]
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in data_dir {root!r} and "
            f"spp_jax never downloads. Prepare it on a machine with internet access: "
            f"`tfds build {name} --data_dir DIR` (imagenet2012 needs its tar files in "
            f"DIR/downloads/manual first), then pass `--set data_dir=DIR` or set TFDS_DATA_DIR. "
            f"Or use the built-in dataset {BUILTIN!r}, which needs no network."
        ) from e


def dataset_info(
    builder, *, image_key: str = "image", label_key: str = "label", splits=("train", "test")
) -> DatasetInfo:
    """Number of classes and of examples per split (counted if TFDS has no split info)."""
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(
                f"dataset {builder.name!r} has no feature {key!r}; it has {sorted(features)}"
            )
    num_examples = {}
    for split in splits:
        try:
            num_examples[split] = builder.info.splits[split].num_examples
        except KeyError:  # e.g. under tfds.testing.mock_data: count once
            ds = _as_dataset(builder, split, shuffle_seed=None, image_key=image_key)
            num_examples[split] = int(ds.reduce(0, lambda n, _: n + 1))
    return DatasetInfo(
        name=builder.name,
        num_classes=int(features[label_key].num_classes),
        num_examples=num_examples,
        image_key=image_key,
        label_key=label_key,
    )


# ----------------------------------------------------------------- image ops (TF graph)


def _decode(tf, image):
    """An encoded (bytes) or decoded image as uint8 ``(H, W, 3)`` RGB.

    Grayscale is repeated to three channels, an alpha channel is dropped, and
    16-bit values keep their high byte (``tf.image.convert_image_dtype``).
    """
    if image.dtype == tf.string:
        return tf.io.decode_image(image, channels=3, expand_animations=False)
    if image.dtype != tf.uint8:
        image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    if image.shape.rank == 2:
        image = image[..., None]
    channels = image.shape[-1]
    if channels == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif channels in (2, 4):  # gray + alpha, RGB + alpha
        image = tf.image.grayscale_to_rgb(image[..., :1]) if channels == 2 else image[..., :3]
    return tf.ensure_shape(image, [None, None, 3])


def _resize_short_side(tf, image, short: int):
    shape = tf.shape(image)[:2]
    scale = tf.cast(short, tf.float32) / tf.cast(tf.reduce_min(shape), tf.float32)
    new = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32), 1)
    return tf.image.resize(tf.cast(image, tf.float32), new, antialias=True)


def _normalize(tf, image):
    return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def _center_crop(tf, image, h, w):
    """The centre ``(h, w)`` window of ``image`` (ints or scalar tensors, at most its size)."""
    shape = tf.shape(image)
    top = (shape[0] - h) // 2
    left = (shape[1] - w) // 2
    return image[top : top + h, left : left + w]


def _full_image(tf, image, size: int, max_aspect: float):
    """Full-image preprocessing: short side resized to ``size``, aspect kept, the long
    side capped at ``floor(max_aspect * size)`` by a centre crop, normalised.

    Returns ``(image (h, w, 3) float32, h, w)``.
    """
    image = _resize_short_side(tf, image, size)
    shape = tf.shape(image)
    max_long = math.floor(size * max_aspect)
    h = tf.minimum(shape[0], max_long)
    w = tf.minimum(shape[1], max_long)
    return _normalize(tf, _center_crop(tf, image, h, w)), h, w


# -------------------------------------------------------------------------- training


def train_size_for_epoch(config_sizes: Sequence[int], schedule: str, epoch: int, seed: int) -> int:
    """The training input size of ``epoch`` under a size schedule.

    Args:
      config_sizes: ``"single"``: ``(s,)``; ``"paper"``: the sizes to alternate,
        e.g. ``(224, 180)``; ``"random"``: ``(low, high)``, inclusive.
      schedule: ``"single"``, ``"paper"`` (epoch ``e`` uses
        ``sizes[e % len(sizes)]``) or ``"random"`` (uniform integer in
        ``[low, high]``, drawn once per epoch from ``(seed, epoch)``, so every
        process and a resumed run agree).
      epoch: 0-based epoch.
      seed: the run's seed.

    >>> [train_size_for_epoch((224, 180), "paper", e, 0) for e in range(4)]
    [224, 180, 224, 180]
    """
    sizes = tuple(int(s) for s in config_sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"train sizes must be positive ints, got {config_sizes!r}")
    if schedule == "single":
        if len(sizes) != 1:
            raise ValueError(f"schedule 'single' takes one size, got {sizes}")
        return sizes[0]
    if schedule == "paper":
        return sizes[epoch % len(sizes)]
    if schedule == "random":
        if len(sizes) != 2 or sizes[0] > sizes[1]:
            raise ValueError(f"schedule 'random' takes (low, high) with low <= high, got {sizes}")
        rng = np.random.default_rng([seed, epoch, 7919])
        return int(rng.integers(sizes[0], sizes[1] + 1))
    raise ValueError(f"size schedule {schedule!r} not accepted; use 'single', 'paper' or 'random'")


def train_batches(
    builder,
    info: DatasetInfo,
    *,
    split: str,
    epoch: int,
    size: int,
    crop_size: int,
    local_batch_size: int,
    global_batch_size: int,
    seed: int = 0,
    resize_ratio: float = 256 / 224,
    shuffle_buffer: int = 10_000,
    process_index: int = 0,
    process_count: int = 1,
    skip_batches: int = 0,
    crop_mode: str = "paper",
    min_crop_area: float = 0.8,
) -> Iterator[Batch]:
    """Yields one epoch of training batches ``image (b, size, size, 3)``, ``label (b,)``.

    ``crop_mode="paper"``: short side resized to ``crop_size * resize_ratio``, then a
    random ``crop_size`` square (the paper's crops, made for centred ImageNet
    objects). ``"area"``: a random box of ``min_crop_area`` to all of the image's
    area and aspect ratio 3/4 to 4/3, resized to ``crop_size`` (Inception-style;
    keeps most of the image, for datasets whose objects lie anywhere, such as
    ``spp_shapes``). Either way the crop is then flipped at random and resized to
    ``size``.

    ``steps_per_epoch(info, split, global_batch_size)`` batches in all (minus
    ``skip_batches``, for resuming mid-epoch), on every process alike.
    """
    tf = _tf()
    steps = steps_per_epoch(info, split, global_batch_size)
    ds = _as_dataset(builder, split, shuffle_seed=_mix(seed, epoch, 1), image_key=info.image_key)
    ds = ds.shuffle(
        min(shuffle_buffer, info.num_examples[split]),
        seed=_mix(seed, epoch, 2),
        reshuffle_each_iteration=False,
    )
    ds = ds.enumerate().shard(process_count, process_index)
    resize_to = max(crop_size, round(crop_size * resize_ratio))
    base = _mix(seed, epoch, 3)
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode {crop_mode!r} not accepted; use one of {CROP_MODES}")

    def prep(position, example):
        image = _decode(tf, example[info.image_key])
        s = tf.stack([tf.constant(base, tf.int64), position])
        if crop_mode == "paper":
            image = _resize_short_side(tf, image, resize_to)
            image = tf.image.stateless_random_crop(image, [crop_size, crop_size, 3], seed=s)
        else:
            image = _random_area_crop(tf, image, crop_size, min_crop_area, s)
        image = tf.image.stateless_random_flip_left_right(image, seed=s + 1)
        if size != crop_size:  # multi-size training: same content, another resolution
            image = tf.image.resize(image, [size, size], antialias=True)
        return {
            "image": _normalize(tf, image),
            "label": tf.cast(example[info.label_key], tf.int32),
        }

    ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch_size, drop_remainder=True).take(steps).skip(skip_batches)
    ds = ds.prefetch(2)
    for batch in ds.as_numpy_iterator():
        batch["mask"] = np.ones(local_batch_size, np.float32)
        yield batch


def _random_area_crop(tf, image, crop_size: int, min_area: float, seed):
    box = tf.zeros([1, 0, 4], tf.float32)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=box,
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(min_area, 1.0),
        max_attempts=20,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, extent)
    return tf.image.resize(tf.cast(image, tf.float32), [crop_size, crop_size], antialias=True)


def steps_per_epoch(info: DatasetInfo, split: str, global_batch_size: int) -> int:
    """Full global batches in one pass over ``split`` (the remainder is dropped)."""
    steps = info.num_examples[split] // global_batch_size
    if steps < 1:
        raise ValueError(
            f"split {split!r} has {info.num_examples[split]} examples, fewer than one global "
            f"batch of {global_batch_size}; lower batch_size"
        )
    return steps


def _mix(*ints: int) -> int:
    return int(np.random.default_rng(list(ints)).integers(0, 2**31 - 1))


# ------------------------------------------------------------------------ evaluation


def full_image_buckets(size: int, max_aspect: float = 2.0, steps: int = 4) -> list[tuple[int, int]]:
    """Padded shapes for full-image evaluation at short side ``size``.

    Long sides ``size * (1 + k (max_aspect - 1) / steps)``, ``k = 0..steps``, for
    landscape ``(size, L)`` and portrait ``(L, size)`` images; each image goes to
    the smallest bucket that holds it.

    >>> full_image_buckets(100, 2.0, 2)
    [(100, 100), (100, 150), (150, 100), (100, 200), (200, 100)]
    """
    out = [(size, size)]
    for k in range(1, steps + 1):
        long = math.ceil(size * (1 + k * (max_aspect - 1) / steps))
        out += [(size, long), (long, size)]
    return out


def eval_batches(
    builder,
    info: DatasetInfo,
    *,
    split: str,
    mode: str,
    size: int,
    local_batch_size: int,
    resize_ratio: float = 256 / 224,
    max_aspect: float = 2.0,
    bucket_steps: int = 4,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Yields every example of ``split`` once (this process's share), in batches.

    ``mode="center"``: the short side resized to ``size * resize_ratio``, then the
    centre ``size`` square. ``mode="full"``: the FULL image, short side resized to
    ``size`` and aspect kept (the long side centre-cropped to ``max_aspect * size``),
    zero-padded to the smallest of :func:`full_image_buckets` that holds it; the
    batches are grouped by bucket and carry ``valid_sizes``; with several processes
    one bucket (the largest) is used, so all processes run the same shapes and the
    same number of batches. Partial batches are filled up with ``mask = 0`` examples.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"eval mode {mode!r} not accepted; use one of {EVAL_MODES}")
    tf = _tf()
    ds = _as_dataset(builder, split, shuffle_seed=None, image_key=info.image_key)
    ds = ds.shard(process_count, process_index)
    n_local = math.ceil(info.num_examples[split] / process_count)
    n_batches = math.ceil(n_local / local_batch_size)

    if mode == "center":
        resize_to = max(size, round(size * resize_ratio))

        def prep(example):
            image = _resize_short_side(tf, _decode(tf, example[info.image_key]), resize_to)
            return {
                "image": _normalize(tf, _center_crop(tf, image, size, size)),
                "label": tf.cast(example[info.label_key], tf.int32),
            }

        ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).batch(local_batch_size)
        yield from _fill(ds.prefetch(2).as_numpy_iterator(), local_batch_size, n_batches)
        return

    buckets = full_image_buckets(size, max_aspect, bucket_steps)
    if process_count > 1:
        longest = max(max(b) for b in buckets)
        buckets = [(longest, longest)]
    bucket_h = tf.constant([b[0] for b in buckets])
    bucket_w = tf.constant([b[1] for b in buckets])

    def prep_full(example):
        image, h, w = _full_image(tf, _decode(tf, example[info.image_key]), size, max_aspect)
        fits = tf.logical_and(bucket_h >= h, bucket_w >= w)
        area = tf.where(fits, bucket_h * bucket_w, tf.int32.max)
        bucket = tf.cast(tf.argmin(area), tf.int64)
        image = tf.pad(image, [[0, tf.gather(bucket_h, bucket) - h], [0, 0], [0, 0]])
        image = tf.pad(image, [[0, 0], [0, tf.gather(bucket_w, bucket) - w], [0, 0]])
        return bucket, {
            "image": image,
            "label": tf.cast(example[info.label_key], tf.int32),
            "valid_sizes": tf.stack([h, w]),
        }

    ds = ds.map(prep_full, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.group_by_window(
        key_func=lambda bucket, _: bucket,
        reduce_func=lambda _, window: window.map(lambda b, ex: ex).batch(local_batch_size),
        window_size=local_batch_size,
    )
    yield from _fill(ds.prefetch(2).as_numpy_iterator(), local_batch_size, n_batches)


def _fill(batches: Iterator[Batch], size: int, min_batches: int) -> Iterator[Batch]:
    """Pads each batch to ``size`` (mask 0) and appends empty batches up to ``min_batches``.

    The empty batches keep every process in step in multi-process evaluation.
    """
    count = 0
    last: Batch | None = None
    for batch in batches:
        n = len(batch["label"])
        # Filler rows: zeros, and a 1x1 valid size (a size of 0 would be an error).
        batch = {k: pad_rows(v, size, int(k == "valid_sizes")) for k, v in batch.items()}
        batch["mask"] = (np.arange(size) < n).astype(np.float32)
        last = batch
        count += 1
        yield batch
    if last is None or count >= min_batches:
        return
    empty = {k: np.zeros_like(v) for k, v in last.items()}
    if "valid_sizes" in empty:
        empty["valid_sizes"] = np.ones_like(last["valid_sizes"])
    for _ in range(min_batches - count):
        yield empty


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class BadImageError(ValueError):
    """A file (or a dataset example) that cannot be read or decoded as an image.

    The message is one line: ``cannot read image NAME: REASON``.

    Attributes:
      name: the file path (or example name).
      reason: why, in a few words (TensorFlow's message without its op details).
    """

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot read image {name}: {reason}")
        self.name = name
        self.reason = reason


def list_images(folder: str) -> list[str]:
    """Every image file (:data:`IMAGE_EXTENSIONS`) under ``folder``, sorted."""
    paths = sorted(
        os.path.join(root, f)
        for root, _, files in os.walk(folder)
        for f in files
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
    return paths


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decodes an encoded JPEG, PNG, GIF (first frame), BMP or WebP image.

    Args:
      data: the file's bytes.
      name: what to call the image in an error (its path).

    Returns:
      uint8 ``(H, W, 3)`` RGB: grayscale is repeated to three channels, an alpha
      channel is dropped (not composited), and 16-bit PNGs keep the high byte
      of each value (``v >> 8``, as ``tf.image.convert_image_dtype`` does).

    Raises:
      BadImageError: ``data`` is empty, not an image, truncated or corrupt; the
        message names ``name`` and says why in one line.
    """
    tf = _tf()
    if not data:
        raise BadImageError(name, "the file is empty")
    try:
        image = _decode(tf, tf.constant(data))
        return np.asarray(image)
    except tf.errors.OpError as e:
        raise BadImageError(name, _op_error_reason(e)) from None


def read_image(path: str) -> np.ndarray:
    """Reads and decodes the image file ``path`` (see :func:`decode_image`).

    Raises:
      BadImageError: the file cannot be read or decoded; the one-line message
        names ``path``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImageError(path, e.strerror or str(e)) from None
    return decode_image(data, path)


def read_image_reduced(path: str, min_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reads ``path`` at the smallest size whose short side is still ``min_side``.

    A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size for a fraction of the time
    and memory (the decoder skips the high frequencies: PIL's ``Image.draft``); a
    4000 x 3000 phone photo that will be resized to a few hundred pixels anyway is
    decoded at 1000 x 750 or 500 x 375. Other formats, and JPEGs that are not at
    least twice ``min_side`` on the short side, are decoded whole by
    :func:`read_image`.

    Returns:
      ``(image, (H, W))``: uint8 ``(h, w, 3)`` RGB as :func:`read_image` gives, and
      the original image's size (a box in the decoded image's pixels times ``W / w``
      and ``H / h`` is in the original's).

    Raises:
      BadImageError: the file cannot be read or decoded.
    """
    reduced = _reduced_jpeg(path, min_side)
    if reduced is not None:
        return reduced
    image = read_image(path)
    return image, (int(image.shape[0]), int(image.shape[1]))


def _reduced_jpeg(path: str, min_side: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The JPEG ``path`` decoded at a reduced size (PIL's ``draft``), or None where
    that does not apply (PIL missing, not a JPEG, not twice ``min_side``)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.format != "JPEG" or min(w, h) < 2 * min_side:
                return None
            f = min_side / min(w, h)
            im.draft("RGB", (max(1, round(w * f)), max(1, round(h * f))))
            if min(im.size) < min_side:  # the decoder rounds up; checked all the same
                return None
            image = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unreadable or corrupt
        raise BadImageError(path, str(e) or type(e).__name__) from None
    return image, (h, w)


def _op_error_reason(e: Exception) -> str:
    """TensorFlow's error message without ``{{function_node ...}}`` and ``[Op:...]``."""
    message = getattr(e, "message", None) or str(e)
    message = re.sub(r"\{\{[^}]*\}\}", "", message)
    message = re.sub(r"\s*\[Op:.*", "", message, flags=re.S)
    return " ".join(message.split()) or type(e).__name__


def preprocess_full(image: np.ndarray, size: int, max_aspect: float = 2.0) -> np.ndarray:
    """Full-image preprocessing of one image, as in ``eval_batches(mode="full")``.

    Args:
      image: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 (or
        uint16) pixels; converted as :func:`decode_image` does.
      size: the short side after resizing.
      max_aspect: the long side is centre-cropped to ``floor(max_aspect * size)``.

    Returns:
      float32 ``(h, w, 3)``, normalised, ``min(h, w) == size``.
    """
    tf = _tf()
    image, _, _ = _full_image(tf, _decode(tf, tf.convert_to_tensor(image)), size, max_aspect)
    return np.asarray(image, np.float32)
