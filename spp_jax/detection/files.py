"""Detection on image files of any size and number (``spp-jax detect``).

Images stream one at a time (memory does not grow with their number), results are
written as each image finishes (``OUT/detections.jsonl``, one line per image, and its
PNG), and a rerun with the same output folder skips the images it finished, so an
interrupted call loses at most the image in progress. Large photos cost about what a
VOC-sized image costs: a JPEG is decoded at a reduced size (1/2, 1/4 or 1/8, no smaller
than the detector's largest scale; :func:`spp_jax.data.read_image_reduced`), selective
search runs on a copy at most ``config.proposals.max_side`` on a side, and the conv
layers see the image resized to the detector's scales. Boxes are reported in the
original image's pixels.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from spp_jax._io import atomic_write_json

log = logging.getLogger("spp_jax")

__all__ = ["RESULTS_FILE", "STREAM_FILE", "detect_files", "image_paths"]

#: Written as each image finishes: one JSON line per image.
STREAM_FILE = "detections.jsonl"
#: Written at the end: every image's record and the run's settings.
RESULTS_FILE = "detections.json"


def image_paths(inputs: Sequence[str]) -> list[str]:
    """Image files of ``inputs`` (files, or folders searched for
    :data:`spp_jax.data.IMAGE_EXTENSIONS`), in order, without repeats.

    Raises:
      FileNotFoundError: an input that does not exist.
    """
    from spp_jax import data

    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            paths += data.list_images(item)
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    return list(dict.fromkeys(paths))


def _identity(path: str) -> list[int]:
    """What tells a finished image from a changed file of the same name."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _finished(out: str) -> dict[str, dict]:
    """The records of ``OUT/detections.jsonl`` by path (a line cut short is ignored)."""
    path = os.path.join(out, STREAM_FILE)
    if not os.path.exists(path):
        return {}
    done = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["path"]] = rec
    return done


def detect_files(
    workdir: str,
    inputs: Sequence[str],
    out: str,
    *,
    scales: int = 1,
    min_score: float | None = None,
    on_bad_image: str = "raise",
    progress: bool = True,
) -> dict:
    """The detections of a ``detect-train`` workdir's detector on image files.

    Each image (decoded as :func:`spp_jax.data.read_image_reduced` does: grayscale
    repeated to RGB, alpha dropped) gets selective-search proposals with the run's
    settings (``config.proposals``),
    :meth:`~spp_jax.detection.detector.Detector.detect` at ``scales`` (1: the single
    scale; 5: every scale of the config) with the run's scorer, and a PNG with its
    labelled boxes, ``OUT/<name>_detections.png``. Each finished image appends its
    record to ``OUT/detections.jsonl``; at the end ``OUT/detections.json`` holds the
    run's settings, every image's record (``path``, ``size`` of the original image,
    ``num_proposals``, ``boxes`` ``[x1, y1, x2, y2]`` in the original image's pixels,
    ``scores``, ``labels`` 0..K-1, ``class_names``, best first, those below
    ``min_score`` dropped) and ``skipped``, the unreadable files. Images already in
    ``OUT/detections.jsonl`` (same path, size and modification time, PNG present) are
    not run again.

    Args:
      on_bad_image: ``"raise"``: a file that cannot be read or decoded, or an image
        the detector cannot take, raises :class:`spp_jax.data.BadImageError` naming
        it; ``"skip"``: it is skipped with a warning and listed in ``skipped``.
      progress: show a progress bar.

    Returns:
      What ``detections.json`` holds.

    Raises:
      spp_jax.data.BadImageError: see ``on_bad_image``.
      FileNotFoundError: an input that does not exist, or a workdir that is not a
        finished ``detect-train`` run.
    """
    from tqdm.auto import tqdm

    from spp_jax.detection import pipeline, report

    if on_bad_image not in ("raise", "skip"):
        raise ValueError(f"on_bad_image={on_bad_image!r}; expected 'raise' or 'skip'")
    paths = image_paths(inputs)
    det = pipeline.load_detector(workdir)
    names = report.class_names(det.num_classes)
    os.makedirs(out, exist_ok=True)
    done = _finished(out)
    records: dict[str, dict] = {}
    skipped: list[str] = []
    taken = {os.path.basename(r["output"]) for r in done.values()}
    resumed = 0
    bar = tqdm(paths, desc="detect", unit="img", disable=not progress)
    for path in bar:
        rec = done.get(path)
        if rec is not None and rec.get("file") == _identity(path) and os.path.exists(rec["output"]):
            records[path] = rec
            resumed += 1
            continue
        rec = _detect_one(det, path, out, scales, min_score, names, taken, on_bad_image)
        if rec is None:
            skipped.append(path)
            continue
        records[path] = rec
        with open(os.path.join(out, STREAM_FILE), "a") as f:
            f.write(json.dumps(rec) + "\n")
    if resumed:
        log.info("%d image(s) already done in %s: not run again", resumed, out)
    result: dict[str, Any] = {
        "workdir": os.path.abspath(workdir),
        "scorer": det.config.test.scorer,
        "scales": list(det.scales(scales)),
        "min_score": min_score,
        "class_names": names,
        "images": [records[p] for p in paths if p in records],
        "skipped": skipped,
    }
    if not result["images"] and paths:
        log.warning("no image could be read")
    atomic_write_json(os.path.join(out, RESULTS_FILE), result, indent=1)
    if skipped:
        log.warning("skipped %d unreadable image(s): %s", len(skipped), skipped)
    n = len(result["images"])
    log.info("%d image(s), detections in %s", n, os.path.join(out, RESULTS_FILE))
    return result


def _detect_one(det, path, out, scales, min_score, names, taken, on_bad_image) -> dict | None:
    """One image's record (its PNG written), or None if it was skipped."""
    from spp_jax import data
    from spp_jax.detection import proposals, report

    p = det.config.proposals
    try:
        image, (full_h, full_w) = data.read_image_reduced(path, max(det.scales(scales)))
        det.check_size(image.shape[:2], det.scales(scales))
        h, w = image.shape[:2]
    except ValueError as e:  # BadImageError, or too small for the trunk at a scale
        err = e if isinstance(e, data.BadImageError) else data.BadImageError(path, str(e))
        if on_bad_image == "raise":
            raise err from None
        log.warning("%s; skipped", err)
        return None
    boxes = proposals.selective_search(
        image, mode=p.mode, max_boxes=p.max_boxes, min_size=p.min_size * h / full_h,
        seed=det.config.seed, max_side=p.get("max_side"),
    )  # fmt: skip
    found = det.detect(image, boxes, num_scales=scales)
    keep = np.ones(len(found["scores"]), bool)
    if min_score is not None:
        keep = found["scores"] >= min_score
    found = {k: np.asarray(v)[keep] for k, v in found.items()}
    stem = os.path.splitext(os.path.basename(path))[0]
    name, i = f"{stem}_detections.png", 1
    while name in taken:
        name, i = f"{stem}_{i}_detections.png", i + 1
    taken.add(name)
    png = os.path.join(out, name)
    report.draw_detections(image, found, names, png)
    labels = [int(c) for c in found["labels"]]
    to_original = np.array([full_w / w, full_h / h] * 2, np.float64)
    rec = {
        "path": path,
        "file": _identity(path),
        "output": png,
        "size": [int(full_h), int(full_w)],
        "decoded_size": [int(h), int(w)],
        "num_proposals": len(boxes),
        "boxes": np.round(found["boxes"].astype(np.float64) * to_original, 2).tolist(),
        "scores": [float(v) for v in found["scores"]],
        "labels": labels,
        "class_names": [names[c] for c in labels],
    }
    best = f"best {names[labels[0]]} {found['scores'][0]:.3f}" if labels else "none"
    log.info("%s: %d detections (%s) -> %s", path, len(labels), best, png)
    return rec
