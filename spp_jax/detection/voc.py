"""Detection data in TFDS ``voc``'s format: PASCAL VOC 2007 and the built-in ``spp_scenes``.

Examples are dicts with TFDS ``voc``'s feature keys (what ``tfds.as_numpy``
yields): ``image`` (uint8 ``(H, W, 3)``, or the encoded file's bytes),
``image/filename``, ``objects`` with ``bbox`` float32 ``(n, 4)``, ``label``,
``is_difficult``, ``is_truncated`` (and ``pose`` for VOC), ``labels`` and
``labels_no_difficult``; ``spp_scenes`` stores its boxes as VOC's. They come from
a prepared TFDS dataset (:func:`tfds_examples`; :func:`prepare_voc2007` prepares
VOC 2007 from its tarballs, without network) or an extracted ``VOCdevkit``
(:func:`read_voc_devkit`, without TFDS), and :func:`example_boxes` turns one into
pixel boxes (``docs/detection-reference.md`` section 1).

TensorFlow (Datasets) is imported on first use only.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from spp_jax import data as data_lib
from spp_jax.data import BadImageError

__all__ = [
    "VOC2007_TARBALLS",
    "VOC_CLASSES",
    "VOC_POSES",
    "encoded_images",
    "example_boxes",
    "image_id",
    "prepare_voc2007",
    "read_voc_devkit",
    "tfds_examples",
]

#: The 20 VOC classes, in TFDS ``voc``'s label order.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
#: TFDS ``voc``'s ``objects/pose`` names.
VOC_POSES: tuple[str, ...] = ("frontal", "rear", "left", "right", "unspecified")
#: The official VOC 2007 tarballs TFDS ``voc/2007`` is built from (names as in
#: TFDS's checksum list), with their sizes in bytes.
VOC2007_TARBALLS: dict[str, int] = {
    "VOCtrainval_06-Nov-2007.tar": 460_032_000,
    "VOCtest_06-Nov-2007.tar": 451_020_800,
}
_DEVKIT_SPLITS = {
    "train": "train",
    "val": "val",
    "validation": "val",
    "trainval": "trainval",
    "test": "test",
}
_SNAP = 1e-3  # float32 normalised coordinates times the size: snap to integers this close


# ---------------------------------------------------------------------------
# Examples to pixel boxes.
# ---------------------------------------------------------------------------


def _snap(x: np.ndarray) -> np.ndarray:
    r = np.rint(x)
    return np.where(np.abs(x - r) < _SNAP, r, x)


def image_id(example: Mapping[str, Any]) -> str:
    """The example's id: ``image/filename`` without its extension (``"000005"``)."""
    name = example["image/filename"]
    if isinstance(name, bytes):
        name = name.decode()
    return os.path.splitext(os.path.basename(str(name)))[0]


def example_boxes(
    example: Mapping[str, Any], image_size: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """Pixel boxes of a TFDS ``voc``-style example (VOC 2007, ``spp_scenes``).

    Args:
      example: a NumPy example (``tfds.as_numpy``, :func:`tfds_examples` or
        :func:`read_voc_devkit`) with ``objects/bbox`` ``(n, 4)`` normalised
        ``(ymin, xmin, ymax, xmax)`` of 1-based inclusive pixel indices,
        ``objects/label``, ``objects/is_difficult`` and (optional)
        ``objects/is_truncated``.
      image_size: ``(H, W)``; default: the shape of ``example["image"]`` (pass it
        when the image is not decoded).

    Returns:
      ``boxes`` float32 ``(n, 4)`` ``(x1, y1, x2, y2)`` continuous pixel edges
      (``x1 = xmin * W - 1``, ``x2 = xmax * W``, values within 1e-3 of an integer
      snapped to it, undoing float32 round-off), ``labels`` int32 ``(n,)``,
      ``difficult`` and ``truncated`` bool ``(n,)``.

    Raises:
      ValueError: no image size, or ``bbox`` not ``(n, 4)``.

    Examples:
      >>> ex = {"image": np.zeros((100, 50, 3), np.uint8),
      ...       "objects": {"bbox": np.array([[0.11, 0.02, 0.5, 1.0]], np.float32),
      ...                   "label": np.array([3]), "is_difficult": np.array([True])}}
      >>> out = example_boxes(ex)
      >>> out["boxes"].tolist(), out["labels"].tolist(), out["difficult"].tolist()
      ([[0.0, 10.0, 50.0, 50.0]], [3], [True])
    """
    objects = example["objects"]
    if image_size is None:
        image = example.get("image")
        if not isinstance(image, np.ndarray) or image.ndim < 2:
            raise ValueError(
                "example_boxes needs the image size: pass image_size=(H, W) when the "
                f"example's image is not a decoded array (got {type(image).__name__})"
            )
        image_size = (int(image.shape[0]), int(image.shape[1]))
    h, w = image_size
    bbox = np.asarray(objects["bbox"], np.float64)
    if bbox.size == 0:
        bbox = bbox.reshape(0, 4)
    if bbox.ndim != 2 or bbox.shape[1] != 4:
        raise ValueError(f"objects/bbox has shape {bbox.shape}; expected (n, 4)")
    ymin, xmin, ymax, xmax = (_snap(bbox[:, k] * s) for k, s in enumerate((h, w, h, w)))
    n = len(bbox)
    truncated = objects.get("is_truncated")
    return {
        "boxes": np.stack([xmin - 1, ymin - 1, xmax, ymax], axis=1).astype(np.float32),
        "labels": np.asarray(objects["label"], np.int32).reshape(n),
        "difficult": np.asarray(objects["is_difficult"], bool).reshape(n),
        "truncated": (
            np.zeros(n, bool) if truncated is None else np.asarray(truncated, bool).reshape(n)
        ),
    }


# ---------------------------------------------------------------------------
# An extracted VOCdevkit.
# ---------------------------------------------------------------------------


def _voc_root(root: str, year: str) -> str:
    for candidate in (
        root,
        os.path.join(root, f"VOC{year}"),
        os.path.join(root, "VOCdevkit", f"VOC{year}"),
    ):
        if os.path.isdir(os.path.join(candidate, "Annotations")):
            return candidate
    raise FileNotFoundError(
        f"no VOC{year} folder under {root!r}: expected {root}/VOCdevkit/VOC{year}/, "
        f"{root}/VOC{year}/ or {root}/ itself to hold Annotations/, JPEGImages/ and "
        "ImageSets/Main/"
    )


def _text(node: ET.Element, tag: str, path: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise ValueError(f"{path}: <{node.tag}> has no <{tag}>")
    return child.text.strip()


def _flag(obj: ET.Element, tag: str, path: str) -> bool:
    return obj.find(tag) is not None and _text(obj, tag, path) == "1"


def _parse_annotation(path: str) -> tuple[tuple[float, float], dict[str, np.ndarray]]:
    """``((H, W), objects)`` of a VOC XML file, as TFDS ``voc`` reads it."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not a valid VOC annotation ({e})") from None
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: no <size>")
    w, h = float(_text(size, "width", path)), float(_text(size, "height", path))
    rows = []
    for obj in root.findall("object"):
        name = _text(obj, "name", path).lower()
        if name not in VOC_CLASSES:
            raise ValueError(f"{path}: unknown class {name!r}; expected one of {VOC_CLASSES}")
        pose_node = obj.find("pose")
        pose = (pose_node.text or "unspecified").strip().lower() if pose_node is not None else ""
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{path}: an object without <bndbox>")
        xmin, ymin, xmax, ymax = (
            float(_text(bb, k, path)) for k in ("xmin", "ymin", "xmax", "ymax")
        )
        rows.append(
            (
                VOC_CLASSES.index(name),
                (ymin / h, xmin / w, ymax / h, xmax / w),
                VOC_POSES.index(pose) if pose in VOC_POSES else VOC_POSES.index("unspecified"),
                _flag(obj, "truncated", path),
                _flag(obj, "difficult", path),
            )
        )
    objects: dict[str, np.ndarray] = {
        "label": np.array([r[0] for r in rows], np.int64),
        "bbox": np.array([r[1] for r in rows], np.float32).reshape(-1, 4),
        "pose": np.array([r[2] for r in rows], np.int64),
        "is_truncated": np.array([r[3] for r in rows], bool),
        "is_difficult": np.array([r[4] for r in rows], bool),
    }
    return (h, w), objects


def read_voc_devkit(
    root: str | os.PathLike, split: str = "trainval", *, year: str = "2007", decode: bool = True
) -> Iterator[dict[str, Any]]:
    """Reads an extracted VOC folder into TFDS ``voc``-style examples.

    Args:
      root: ``VOCdevkit``'s parent, ``VOCdevkit`` or ``VOCdevkit/VOC2007`` itself.
      split: ``"train"``, ``"val"`` (or ``"validation"``), ``"trainval"`` or
        ``"test"``: the ids in ``ImageSets/Main/<split>.txt``, in file order.
      year: ``"2007"`` (any year with the same layout works).
      decode: decode ``JPEGImages/<id>.jpg`` to uint8 ``(H, W, 3)`` (with
        :func:`spp_jax.data.read_image`), or give the file's bytes.

    Yields:
      Examples with TFDS ``voc``'s keys (module docstring) and conventions:
      ``image/filename`` ``"<id>.jpg"``, ``bbox`` ``(ymin / H, xmin / W, ymax / H,
      xmax / W)`` of the XML's raw values with ``H``, ``W`` from its ``<size>``.

    Raises:
      FileNotFoundError: no VOC folder under ``root``, or a missing list or
        annotation file (named).
      ValueError: an unknown split, or a malformed annotation (its file named).
      spp_jax.data.BadImageError: an unreadable image (named).
    """
    if split not in _DEVKIT_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_DEVKIT_SPLITS)}")
    base = _voc_root(os.fspath(root), year)
    list_path = os.path.join(base, "ImageSets", "Main", f"{_DEVKIT_SPLITS[split]}.txt")
    if not os.path.exists(list_path):
        raise FileNotFoundError(f"no image list {list_path!r} for split {split!r}")
    with open(list_path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    for image_name in ids:
        xml_path = os.path.join(base, "Annotations", f"{image_name}.xml")
        if not os.path.exists(xml_path):
            raise FileNotFoundError(f"no annotation {xml_path!r} for image {image_name!r}")
        _, objects = _parse_annotation(xml_path)
        jpg = os.path.join(base, "JPEGImages", f"{image_name}.jpg")
        if decode:
            image: Any = data_lib.read_image(jpg)
        else:
            try:
                with open(jpg, "rb") as f:
                    image = f.read()
            except OSError as e:
                raise BadImageError(jpg, e.strerror or str(e)) from None
        labels = objects["label"]
        yield {
            "image": image,
            "image/filename": f"{image_name}.jpg",
            "objects": objects,
            "labels": np.unique(labels),
            "labels_no_difficult": np.unique(labels[~objects["is_difficult"]]),
        }


# ---------------------------------------------------------------------------
# TFDS.
# ---------------------------------------------------------------------------


def _builder(name: str, data_dir: str | None):
    tfds = data_lib._tfds()  # registers the built-in datasets
    data_dir = data_dir or data_lib.default_data_dir()
    builder = tfds.builder(name, data_dir=data_dir)
    if data_lib._is_prepared(builder):
        return builder
    if name.split("/")[0] == "spp_scenes":
        builder.download_and_prepare()  # offline, seconds
        return builder
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {data_dir!r}. For VOC 2007 without "
        "network: put VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar in one folder "
        "and run spp_jax.detection.voc.prepare_voc2007(folder, data_dir); or read an "
        "extracted VOCdevkit with read_voc_devkit(root, split)"
    )


def _tfds_split(name: str, split: str) -> str:
    if name.split("/")[0] == "voc" and split == "trainval":
        return "train+validation"
    return split


def tfds_examples(
    name: str, split: str, *, data_dir: str | None = None, decode: bool = True
) -> Iterator[dict[str, Any]]:
    """Reads a TFDS detection dataset in file order (deterministic), as NumPy.

    Args:
      name: ``"voc/2007"`` (must be prepared: :func:`prepare_voc2007`),
        ``"spp_scenes"`` or ``"spp_scenes/tiny"`` (built offline if missing).
      split: a TFDS split; ``"trainval"`` means ``"train+validation"`` for VOC.
      data_dir: TFDS data directory (default :func:`spp_jax.data.default_data_dir`).
      decode: decode images to uint8 arrays, or leave the encoded bytes.

    Raises:
      FileNotFoundError: ``voc`` not prepared; the message says how to prepare it.
    """
    tfds = data_lib._tfds()
    builder = _builder(name, data_dir)
    decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
    ds = builder.as_dataset(split=_tfds_split(name, split), shuffle_files=False, decoders=decoders)
    yield from tfds.as_numpy(ds)


def encoded_images(
    name: str, split: str, *, data_dir: str | None = None
) -> Iterator[tuple[str, bytes]]:
    """``(image_id, encoded image bytes)`` of a TFDS split, for the proposal cache."""
    for example in tfds_examples(name, split, data_dir=data_dir, decode=False):
        yield image_id(example), example["image"]


def prepare_voc2007(manual_dir: str | os.PathLike, data_dir: str | None = None) -> Any:
    """Builds TFDS ``voc/2007`` from the official tarballs, without network.

    Args:
      manual_dir: a folder holding ``VOCtrainval_06-Nov-2007.tar`` and
        ``VOCtest_06-Nov-2007.tar`` (:data:`VOC2007_TARBALLS`), unchanged: TFDS
        checks their sizes and SHA-256 against its checksum list.
      data_dir: TFDS data directory (default :func:`spp_jax.data.default_data_dir`);
        the tarballs are extracted under ``<data_dir>/downloads`` (about 900 MB).

    Returns:
      The prepared builder (splits ``train`` 2,501, ``validation`` 2,510 and
      ``test`` 4,952 images).

    Raises:
      FileNotFoundError: a tarball is missing (nothing is downloaded).
      tfds.download.NonMatchingChecksumError: a tarball is not the official file.
    """
    manual_dir = os.fspath(manual_dir)
    missing = [n for n in VOC2007_TARBALLS if not os.path.isfile(os.path.join(manual_dir, n))]
    if missing:
        found = sorted(os.listdir(manual_dir)) if os.path.isdir(manual_dir) else "no such folder"
        raise FileNotFoundError(
            f"{manual_dir!r} lacks {missing} (found: {found}); VOC 2007 needs both "
            f"{list(VOC2007_TARBALLS)}"
        )
    tfds = data_lib._tfds()
    builder = tfds.builder("voc/2007", data_dir=data_dir or data_lib.default_data_dir())
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder
