"""Tests of VOC-format detection input: box conventions, VOCdevkit folders, TFDS voc/2007."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from spp_jax.data import BadImageError
from spp_jax.detection import voc

tfds = pytest.importorskip("tensorflow_datasets")
Image = pytest.importorskip("PIL.Image")

# Image id -> (width, height, objects (name, xmin, ymin, xmax, ymax, difficult, truncated, pose)).
# 1-based inclusive VOC pixel indices; one box touches the image's last row and column.
DEVKIT = {
    "000005": (
        50,
        40,
        [
            ("chair", 1, 2, 10, 20, 0, 0, "Rear"),
            ("chair", 30, 5, 50, 40, 1, 1, "Unspecified"),
            ("person", 7, 9, 33, 31, 0, 1, "Frontal"),
        ],
    ),
    "000007": (37, 61, [("car", 3, 17, 35, 60, 0, 0, "Left")]),
    "000009": (45, 33, [("tvmonitor", 12, 4, 12, 4, 1, 0, "Unspecified")]),  # a 1x1 box
    "000012": (29, 52, [("bird", 2, 3, 28, 51, 0, 0, "Right"), ("cat", 5, 5, 9, 9, 0, 0, "Left")]),
}
SPLITS = {"train": ["000005", "000009"], "val": ["000007"], "test": ["000012"]}


def _xml(image_id: str) -> str:
    w, h, objects = DEVKIT[image_id]
    parts = [
        f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>",
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
    ]
    for name, x1, y1, x2, y2, difficult, truncated, pose in objects:
        parts.append(
            f"<object><name>{name}</name><pose>{pose}</pose><truncated>{truncated}</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "\n".join([*parts, "</annotation>"])


def _write_devkit(root: str, ids_by_split: dict[str, list[str]]) -> str:
    base = os.path.join(root, "VOCdevkit", "VOC2007")
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    for ids in ids_by_split.values():
        for image_id in ids:
            w, h, _ = DEVKIT[image_id]
            rng = np.random.default_rng(int(image_id))  # the same pixels in every folder
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(base, "JPEGImages", f"{image_id}.jpg"))
            with open(os.path.join(base, "Annotations", f"{image_id}.xml"), "w") as f:
                f.write(_xml(image_id))
    lists = dict(ids_by_split)
    if "train" in lists and "val" in lists:
        lists["trainval"] = lists["train"] + lists["val"]
    for split, ids in lists.items():
        with open(os.path.join(base, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return base


@pytest.fixture(scope="module")
def devkit(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("voc"))
    _write_devkit(root, SPLITS)
    return root


def _expected(image_id: str):
    _, _, objects = DEVKIT[image_id]
    boxes = np.array([[x1 - 1, y1 - 1, x2, y2] for _, x1, y1, x2, y2, *_ in objects], np.float32)
    labels = np.array([voc.VOC_CLASSES.index(o[0]) for o in objects])
    return (
        boxes,
        labels,
        np.array([o[5] == 1 for o in objects]),
        np.array([o[6] == 1 for o in objects]),
    )


# --------------------------------------------------------------------------- conventions


def test_example_boxes_recovers_integer_voc_boxes_from_float32():
    # TFDS stores xmin / W in float32; times W that is often k +- 1 ulp. Every
    # integer VOC box comes back exactly, converted to (xmin - 1, ymin - 1, xmax, ymax).
    rng = np.random.default_rng(1)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 1200, 2))
        n = int(rng.integers(0, 6))
        xs = np.sort(rng.integers(1, w + 1, (n, 2)), axis=1)
        ys = np.sort(rng.integers(1, h + 1, (n, 2)), axis=1)
        bbox = np.stack([ys[:, 0] / h, xs[:, 0] / w, ys[:, 1] / h, xs[:, 1] / w], 1)
        example = {
            "objects": {
                "bbox": bbox.astype(np.float32),
                "label": rng.integers(0, 20, n),
                "is_difficult": rng.random(n) < 0.3,
            }
        }
        got = voc.example_boxes(example, image_size=(h, w))
        expected = np.stack([xs[:, 0] - 1, ys[:, 0] - 1, xs[:, 1], ys[:, 1]], 1)
        np.testing.assert_array_equal(got["boxes"], expected.astype(np.float32).reshape(n, 4))
        np.testing.assert_array_equal(got["labels"], example["objects"]["label"])
        np.testing.assert_array_equal(got["difficult"], example["objects"]["is_difficult"])
        assert got["truncated"].shape == (n,) and not got["truncated"].any()


def test_example_boxes_keeps_fractional_coordinates_and_needs_a_size():
    example = {
        "image": np.zeros((200, 400, 3), np.uint8),
        "objects": {
            "bbox": np.array([[10.5 / 200, 273.5 / 400, 100 / 200, 300.25 / 400]], np.float32),
            "label": np.array([1]),
            "is_difficult": np.array([False]),
        },
    }
    np.testing.assert_allclose(
        voc.example_boxes(example)["boxes"], [[272.5, 9.5, 300.25, 100]], atol=1e-4
    )
    with pytest.raises(ValueError, match=r"image_size=\(H, W\)"):
        voc.example_boxes({"image": b"\xff\xd8", "objects": example["objects"]})
    empty = voc.example_boxes(
        {"objects": {"bbox": np.zeros((0, 4), np.float32), "label": [], "is_difficult": []}},
        image_size=(5, 5),
    )
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def _devkit_iou(a, b):
    """VOCevaldet.m's overlap on raw 1-based inclusive boxes (+1 widths)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - iw * ih
    return iw * ih / ua


def _continuous_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return iw * ih / (area(a) + area(b) - iw * ih)


def test_conversion_makes_plain_iou_equal_the_devkits():
    rng = np.random.default_rng(2)
    for _ in range(300):
        raw = [
            np.concatenate([np.sort(rng.integers(1, 60, 2)), np.sort(rng.integers(1, 60, 2))])[
                [0, 2, 1, 3]
            ]
            for _ in range(2)
        ]
        cont = [np.array([r[0] - 1, r[1] - 1, r[2], r[3]], float) for r in raw]
        assert _continuous_iou(*cont) == pytest.approx(_devkit_iou(*raw), abs=1e-12)


# --------------------------------------------------------------------------- VOCdevkit folder


@pytest.mark.parametrize("root_level", ["parent", "VOCdevkit", "VOC2007"])
def test_read_voc_devkit(devkit, root_level):
    root = {
        "parent": devkit,
        "VOCdevkit": os.path.join(devkit, "VOCdevkit"),
        "VOC2007": os.path.join(devkit, "VOCdevkit", "VOC2007"),
    }[root_level]
    examples = list(voc.read_voc_devkit(root, "trainval"))
    assert [ex["image/filename"] for ex in examples] == ["000005.jpg", "000009.jpg", "000007.jpg"]
    for ex in examples:
        image_id = voc.image_id(ex)
        w, h, objects = DEVKIT[image_id]
        assert ex["image"].shape == (h, w, 3) and ex["image"].dtype == np.uint8
        boxes, labels, difficult, truncated = _expected(image_id)
        got = voc.example_boxes(ex)
        np.testing.assert_array_equal(got["boxes"], boxes)
        np.testing.assert_array_equal(got["labels"], labels)
        np.testing.assert_array_equal(got["difficult"], difficult)
        np.testing.assert_array_equal(got["truncated"], truncated)
        # TFDS voc's stored form: raw values over the XML's size, (ymin, xmin, ymax, xmax).
        raw = np.array([[o[2] / h, o[1] / w, o[4] / h, o[3] / w] for o in objects], np.float32)
        np.testing.assert_array_equal(ex["objects"]["bbox"], raw)
        poses = [voc.VOC_POSES.index(o[7].lower()) for o in objects]
        np.testing.assert_array_equal(ex["objects"]["pose"], poses)
        np.testing.assert_array_equal(ex["labels"], np.unique(labels))
        np.testing.assert_array_equal(ex["labels_no_difficult"], np.unique(labels[~difficult]))
    # The 1x1 box of 000009 (xmin = xmax = 12) is one pixel: [11, 12) x [3, 4).
    np.testing.assert_array_equal(voc.example_boxes(examples[1])["boxes"], [[11, 3, 12, 4]])
    assert examples[1]["labels_no_difficult"].size == 0


def test_read_voc_devkit_splits_and_bytes(devkit):
    assert [voc.image_id(e) for e in voc.read_voc_devkit(devkit, "validation")] == ["000007"]
    (test,) = voc.read_voc_devkit(devkit, "test", decode=False)
    assert isinstance(test["image"], bytes) and test["image"][:2] == b"\xff\xd8"
    np.testing.assert_array_equal(
        voc.example_boxes(test, image_size=(52, 29))["boxes"], _expected("000012")[0]
    )
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        next(voc.read_voc_devkit(devkit, "dev"))
    with pytest.raises(FileNotFoundError, match="no VOC2007 folder"):
        next(voc.read_voc_devkit(os.path.join(devkit, "nowhere"), "train"))


def test_read_voc_devkit_bad_files_are_named(tmp_path):
    base = _write_devkit(str(tmp_path), {"train": ["000005", "000007"]})
    bad_jpg = os.path.join(base, "JPEGImages", "000007.jpg")
    with open(bad_jpg, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadImageError, match=r"000007\.jpg"):
        list(voc.read_voc_devkit(str(tmp_path), "train"))
    xml = os.path.join(base, "Annotations", "000005.xml")
    with open(xml, "w") as f:
        f.write(_xml("000005").replace("person", "unicorn"))
    with pytest.raises(ValueError, match=r"000005.xml: unknown class 'unicorn'"):
        next(voc.read_voc_devkit(str(tmp_path), "train"))
    with open(xml, "w") as f:
        f.write("<annotation><size>")
    with pytest.raises(ValueError, match=r"000005\.xml: not a valid VOC annotation"):
        next(voc.read_voc_devkit(str(tmp_path), "train"))
    os.remove(xml)
    with pytest.raises(FileNotFoundError, match=r"000005\.xml"):
        next(voc.read_voc_devkit(str(tmp_path), "train"))


# --------------------------------------------------------------------------- TFDS voc/2007


def _tar(path: str, devkit_root: str) -> None:
    with tarfile.open(path, "w") as tar:
        tar.add(os.path.join(devkit_root, "VOCdevkit"), arcname="VOCdevkit")


@pytest.fixture(scope="module")
def fake_tarballs(tmp_path_factory) -> str:
    """The two VOC 2007 tarballs, with the official names and layout, tiny contents."""
    work = tmp_path_factory.mktemp("voc_tars")
    manual = work / "manual"
    manual.mkdir()
    trainval = _write_devkit(
        str(work / "trainval"), {"train": SPLITS["train"], "val": SPLITS["val"]}
    )
    test = _write_devkit(str(work / "test"), {"test": SPLITS["test"]})
    _tar(str(manual / "VOCtrainval_06-Nov-2007.tar"), os.path.dirname(os.path.dirname(trainval)))
    _tar(str(manual / "VOCtest_06-Nov-2007.tar"), os.path.dirname(os.path.dirname(test)))
    return str(manual)


def _no_network(monkeypatch) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("preparing VOC from manual_dir must not download")

    monkeypatch.setattr(tfds.download.DownloadManager, "_download", no_download)


def test_prepare_voc2007_from_tarballs_without_network(
    fake_tarballs, devkit, tmp_path, monkeypatch
):
    _no_network(monkeypatch)
    # The real checksum list names the tarballs; these test ones have other contents,
    # so give TFDS their checksums under the official URLs.
    from tensorflow_datasets.core.download import checksums

    voc_cls = tfds.builder_cls("voc")
    official = voc_cls.url_infos
    fake = {}
    for url, info in official.items():
        path = os.path.join(fake_tarballs, info.filename)
        if info.filename in voc.VOC2007_TARBALLS:
            assert voc.VOC2007_TARBALLS[info.filename] == int(info.size)
            fake[url] = checksums.compute_url_info(path)
            fake[url].filename = info.filename
    assert len(fake) == 2
    monkeypatch.setattr(voc_cls, "url_infos", fake)
    data_dir = str(tmp_path / "tfds")
    builder = voc.prepare_voc2007(fake_tarballs, data_dir=data_dir)
    assert builder.info.splits["train"].num_examples == 2
    assert builder.info.splits["validation"].num_examples == 1
    assert builder.info.splits["test"].num_examples == 1

    # trainval = train + validation; the same examples as reading the folder.
    for split in ("trainval", "test"):
        from_tfds = {
            voc.image_id(e): e for e in voc.tfds_examples("voc/2007", split, data_dir=data_dir)
        }
        from_folder = {voc.image_id(e): e for e in voc.read_voc_devkit(devkit, split)}
        assert sorted(from_tfds) == sorted(from_folder)
        for key, a in from_tfds.items():
            b = from_folder[key]
            np.testing.assert_array_equal(a["image"], b["image"])
            for k in ("bbox", "label", "is_difficult", "is_truncated", "pose"):
                np.testing.assert_array_equal(a["objects"][k], b["objects"][k])
            for k in ("labels", "labels_no_difficult"):
                np.testing.assert_array_equal(a[k], b[k])
            ba, bb = voc.example_boxes(a), voc.example_boxes(b)
            np.testing.assert_array_equal(ba["boxes"], _expected(key)[0])
            np.testing.assert_array_equal(ba["boxes"], bb["boxes"])
    ids = [i for i, _ in voc.encoded_images("voc/2007", "test", data_dir=data_dir)]
    assert ids == ["000012"]


def test_prepare_voc2007_checks_the_official_checksums(fake_tarballs, tmp_path, monkeypatch):
    # Without the override TFDS finds the tarballs in manual_dir by name and rejects
    # them: they are not the official files.
    _no_network(monkeypatch)
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    with pytest.raises(NonMatchingChecksumError, match="wrong checksum"):
        voc.prepare_voc2007(fake_tarballs, data_dir=str(tmp_path / "tfds"))


def test_prepare_voc2007_names_missing_tarballs(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    (tmp_path / "VOCtest_06-Nov-2007.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks \['VOCtrainval_06-Nov-2007\.tar'\]"):
        voc.prepare_voc2007(str(tmp_path), data_dir=str(tmp_path / "tfds"))


def test_unprepared_voc_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_voc2007"):
        next(voc.tfds_examples("voc/2007", "test", data_dir=str(tmp_path)))


def test_spp_scenes_through_tfds_examples(tmp_path):
    # spp_scenes is built on first use, offline; ids are the file names' stems.
    from spp_jax.datasets.spp_scenes import make_scene

    data_dir = str(tmp_path)
    examples = list(voc.tfds_examples("spp_scenes/tiny", "validation", data_dir=data_dir))
    assert sorted(voc.image_id(e) for e in examples) == [f"validation_{i:05d}" for i in range(4)]
    for ex in examples:
        _, objects, _ = make_scene(int(voc.image_id(ex).split("_")[1]), "validation")
        np.testing.assert_array_equal(voc.example_boxes(ex)["boxes"], objects["boxes"])
    encoded = dict(voc.encoded_images("spp_scenes/tiny", "validation", data_dir=data_dir))
    image = np.asarray(Image.open(io.BytesIO(encoded["validation_00002"])))
    np.testing.assert_array_equal(image, make_scene(2, "validation")[0])
