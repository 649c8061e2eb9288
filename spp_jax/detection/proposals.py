"""Selective-search region proposals (OpenCV contrib), and an on-disk cache of them.

:func:`selective_search` runs OpenCV contrib's selective search
(``cv2.ximgproc.segmentation``; ``pip install -e ".[detect]"``, package
``opencv-contrib-python-headless``) on one image; :class:`ProposalCache` runs it
over a dataset split on every core and keeps the boxes per image. R-CNN and SPP-net
used the MATLAB code (``docs/detection-reference.md`` section 2).

Order: OpenCV ranks each region by ``rand() * level`` (its hierarchy level, 1 for
the initial segments) and returns them by increasing rank without duplicate
rectangles. :func:`selective_search` seeds C's ``rand()`` (``srand(seed)`` through
``ctypes``, under a lock) right before each run, so the same image gives the same
boxes in the same order on any machine with the same C library (glibc on Linux,
macOS's libc). The SET of boxes never depends on the seed, only their order, which
decides which boxes ``max_boxes`` keeps.

``import spp_jax.detection.proposals`` does not import OpenCV: the functions
that need it import it on first use.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import json
import multiprocessing
import os
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np

from spp_jax._io import atomic_open, atomic_write_json
from spp_jax.data import BadImageError

__all__ = [
    "MODES",
    "ProposalCache",
    "ProposalStats",
    "compute_proposals",
    "decode",
    "load_proposals",
    "selective_search",
    "to_rgb8",
]

MODES = ("fast", "quality")
#: R-CNN drops boxes narrower or shorter than 20 px on VOC images (about 500 x 375);
#: spp_jax's default is smaller because its built-in scenes hold objects from 16 px.
DEFAULT_MIN_SIZE = 10.0

Mode = Literal["fast", "quality"]
ImageLike = np.ndarray | bytes | str | os.PathLike

_SRAND_LOCK = threading.Lock()
_PARAMS_FILE = "params.json"
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# One image.
# ---------------------------------------------------------------------------


def to_rgb8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Converts an image to uint8 ``(H, W, 3)`` RGB for selective search.

    Grayscale ``(H, W)`` or ``(H, W, 1)`` is repeated to three channels, an alpha
    channel ``(H, W, 4)`` is dropped (not composited), and uint16 keeps the high
    byte of each value (``v >> 8``), as :func:`spp_jax.data.decode_image` does.

    Args:
      image: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``, uint8 or
        uint16, ``H, W >= 1``.
      name: what to call the image in an error.

    Returns:
      uint8 ``(H, W, 3)``, C-contiguous.

    Raises:
      ValueError: another shape or dtype; the message names it.

    Examples:
      >>> to_rgb8(np.full((2, 3), 7, np.uint8)).shape
      (2, 3, 3)
      >>> int(to_rgb8(np.full((1, 1, 4), 0x1234, np.uint16))[0, 0, 0])
      18
    """
    a = np.asarray(image)
    if a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"{name}: dtype {a.dtype} is not supported; expected uint8 or uint16")
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[..., :3] if a.shape[2] == 4 else a
    elif a.ndim != 2:
        raise ValueError(
            f"{name}: shape {a.shape} is not an image; expected (H, W), (H, W, 1), (H, W, 3)"
            " or (H, W, 4)"
        )
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name}: shape {a.shape} is empty; expected H >= 1 and W >= 1")
    if a.ndim == 2 or a.shape[2] == 1:
        a = np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
    return np.ascontiguousarray(a)


def _check_params(
    mode: str, max_boxes: int | None, min_size: float, seed: int, max_side: int | None = None
) -> None:
    if max_side is not None and (
        isinstance(max_side, bool) or int(max_side) != max_side or max_side < 16
    ):
        raise ValueError(f"max_side={max_side!r}; expected an int >= 16 or None (full size)")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; expected one of {MODES}")
    if max_boxes is not None and (
        isinstance(max_boxes, bool) or int(max_boxes) != max_boxes or max_boxes < 1
    ):
        raise ValueError(f"max_boxes={max_boxes!r}; expected an int >= 1 or None (all boxes)")
    if not (np.isfinite(min_size) and min_size >= 0):
        raise ValueError(f"min_size={min_size!r}; expected a finite number >= 0 (pixels)")
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r}; expected an int in [0, 2**32)")


def _libc_srand():
    """C's ``srand``, the one OpenCV's ``rand()`` draws from, or None."""
    try:
        return ctypes.CDLL(None).srand
    except (OSError, AttributeError):  # e.g. Windows: no process-wide C library
        return None


def selective_search(
    image: np.ndarray,
    *,
    mode: Mode = "fast",
    max_boxes: int | None = 2000,
    min_size: float = DEFAULT_MIN_SIZE,
    seed: int = 0,
    max_side: int | None = None,
) -> np.ndarray:
    """Selective-search proposals of one image (OpenCV contrib), deterministic.

    Args:
      image: RGB ``(H, W, 3)`` uint8; ``(H, W)``, ``(H, W, 1)``, ``(H, W, 4)``
        and uint16 are converted by :func:`to_rgb8`.
      mode: ``"fast"`` (``switchToSelectiveSearchFast()``, 12 hierarchies; the
        R-CNN / SPP-net setting) or ``"quality"`` (``...Quality()``, 80).
      max_boxes: keep the first ``max_boxes`` boxes in OpenCV's rank order (see
        the module docstring), after the size filter; ``None`` keeps all.
      min_size: drop boxes whose width or height is below this, in pixels.
      seed: seeds C's ``rand()``, which orders OpenCV's boxes.
      max_side: search a copy whose longer side is this (area-averaged; ``None``, or
        an image no larger: the image itself) and map its boxes back: the time and
        memory grow with the pixel count (a 12-megapixel photo takes minutes), the
        boxes depend little on detail finer than the objects (R-CNN and SPP-net
        searched images about 500 px on a side).

    Returns:
      float32 ``(n, 4)`` ``(x1, y1, x2, y2)`` boxes in continuous pixel edges of the
      image (not of the downscaled copy), inside ``[0, W] x [0, H]``, without
      duplicates, ``n <= max_boxes``.

    Raises:
      ValueError: a bad image shape or dtype, or a bad argument.
      ImportError: OpenCV contrib is not installed (``pip install -e ".[detect]"``).

    Examples:
      >>> image = np.zeros((48, 64, 3), np.uint8)
      >>> image[8:40, 16:48] = 255
      >>> boxes = selective_search(image, min_size=4)
      >>> boxes.dtype, boxes.shape[1]
      (dtype('float32'), 4)
      >>> bool((boxes == [16, 8, 48, 40]).all(axis=1).any())
      True
    """
    _check_params(mode, max_boxes, min_size, seed, max_side)
    rgb = to_rgb8(image)
    cv2 = _cv2()
    h, w = rgb.shape[:2]
    sx = sy = 1.0
    if max_side is not None and max(h, w) > max_side:
        f = max_side / max(h, w)
        sw, sh = max(1, round(w * f)), max(1, round(h * f))
        rgb = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
        sx, sy = w / sw, h / sh
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(rgb[..., ::-1]))  # OpenCV converts from BGR
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    srand = _libc_srand()
    with _SRAND_LOCK:
        if srand is not None:
            srand(int(seed))
        rects = ss.process()
    rects = np.asarray(rects, np.float32).reshape(-1, 4)  # 0-based (x, y, w, h)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    if (sx, sy) != (1.0, 1.0):
        boxes = np.minimum(
            boxes * np.array([sx, sy, sx, sy], np.float32), np.array([w, h, w, h], np.float32)
        )
        _, first = np.unique(boxes, axis=0, return_index=True)
        boxes = boxes[np.sort(first)]  # OpenCV's order, each box once
    keep = (boxes[:, 2] - boxes[:, 0] >= min_size) & (boxes[:, 3] - boxes[:, 1] >= min_size)
    boxes = boxes[keep]
    if max_boxes is not None:
        boxes = boxes[: int(max_boxes)]
    return np.ascontiguousarray(boxes, np.float32)


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            'selective search needs OpenCV contrib: pip install -e ".[detect]"'
            " (package opencv-contrib-python-headless)"
        ) from e
    if not hasattr(cv2, "ximgproc"):
        raise ImportError(
            f"OpenCV {cv2.__version__} has no ximgproc module (the contrib modules): "
            "pip uninstall opencv-python opencv-python-headless and "
            "pip install opencv-contrib-python-headless"
        )
    return cv2


def decode(data: bytes, name: str) -> np.ndarray:
    """Decodes an encoded image (PNG, JPEG, BMP, ...) with OpenCV to uint8 RGB.

    Args:
      data: the file's bytes.
      name: what to call the image in an error (its path or id).

    Returns:
      uint8 ``(H, W, 3)`` RGB (converted as :func:`to_rgb8` does).

    Raises:
      spp_jax.data.BadImageError: empty, not an image, truncated or corrupt; the
        message names ``name``.
    """
    if not data:
        raise BadImageError(name, "the file is empty")
    cv2 = _cv2()
    buf = np.frombuffer(data, np.uint8)
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise BadImageError(name, f"OpenCV cannot decode it ({str(e).strip()})") from None
    if image is None or image.size == 0:
        raise BadImageError(name, "not an image, or truncated or corrupt (OpenCV cannot decode it)")
    if image.ndim == 3 and image.shape[2] >= 3:  # BGR(A) -> RGB(A)
        image = np.concatenate([image[..., 2::-1], image[..., 3:]], axis=2)
    try:
        return to_rgb8(image, name)
    except ValueError as e:
        raise BadImageError(name, str(e)) from None


# ---------------------------------------------------------------------------
# A cache over a dataset split.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ProposalStats:
    """What :meth:`ProposalCache.compute` did.

    Attributes:
      computed: images computed in this run.
      cached: images found already done (skipped).
      skipped: ids of unreadable images (with ``on_bad_image="skip"``).
      seconds: selective search time summed over the computed images (CPU
        seconds of one core each; excludes decoding).
      wall_seconds: the run's wall-clock time.
    """

    computed: int = 0
    cached: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def seconds_per_image(self) -> float:
        """Mean selective search time of a computed image (NaN if none)."""
        return self.seconds / self.computed if self.computed else float("nan")


def _filename(image_id: str) -> str:
    return urllib.parse.quote(image_id, safe="") + ".npy"


class ProposalCache:
    """Selective-search proposals of many images, one ``.npy`` file per image id.

    The directory holds ``params.json`` (the selective search settings) and
    ``boxes/<id>.npy`` (float32 ``(n, 4)``).
    Opening an existing directory with other settings raises ``ValueError``
    rather than mixing proposals; ``ProposalCache.open(dir)`` takes the settings
    from the directory.

    Args:
      cache_dir: the directory (created if missing).
      mode, max_boxes, min_size, seed, max_side: as in :func:`selective_search`.

    Examples:
      >>> import tempfile
      >>> cache = ProposalCache(tempfile.mkdtemp(), min_size=4)
      >>> image = np.zeros((32, 32, 3), np.uint8)
      >>> image[4:20, 8:28] = 200
      >>> stats = cache.compute([("a", image)], num_workers=0, progress=False)
      >>> cache.get("a").shape[1], "a" in cache, stats.computed
      (4, True, 1)
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        mode: Mode = "fast",
        max_boxes: int | None = 2000,
        min_size: float = DEFAULT_MIN_SIZE,
        seed: int = 0,
        max_side: int | None = None,
    ):
        _check_params(mode, max_boxes, min_size, seed, max_side)
        self.cache_dir = os.fspath(cache_dir)
        self.params: dict[str, Any] = {
            "method": "opencv_selective_search",
            "mode": mode,
            "max_boxes": None if max_boxes is None else int(max_boxes),
            "min_size": float(min_size),
            "seed": int(seed),
            "format": _FORMAT_VERSION,
        }
        if max_side is not None:  # a cache without the key searched full-size images
            self.params["max_side"] = int(max_side)
        path = os.path.join(self.cache_dir, _PARAMS_FILE)
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
            keys = sorted(set(stored) | set(self.params))
            mismatched = {
                k: (stored.get(k), self.params.get(k))
                for k in keys
                if stored.get(k) != self.params.get(k)
            }
            if mismatched:
                raise ValueError(
                    f"proposal cache {self.cache_dir!r} was computed with other settings "
                    f"(stored, requested): {mismatched}; use another directory, or "
                    "ProposalCache.open(dir) to read it with its own settings"
                )
            self.params = stored
        else:
            os.makedirs(self.cache_dir, exist_ok=True)
            atomic_write_json(path, self.params, indent=1, sort_keys=True)
        os.makedirs(os.path.join(self.cache_dir, "boxes"), exist_ok=True)

    @classmethod
    def open(cls, cache_dir: str | os.PathLike) -> ProposalCache:
        """Opens an existing cache with the settings it was computed with.

        Raises:
          FileNotFoundError: ``cache_dir`` holds no ``params.json``.
        """
        path = os.path.join(os.fspath(cache_dir), _PARAMS_FILE)
        try:
            with open(path) as f:
                p = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{os.fspath(cache_dir)!r} is not a proposal cache (no {_PARAMS_FILE}); "
                "create one with ProposalCache(dir, ...) or compute_proposals(...)"
            ) from None
        return cls(
            cache_dir,
            mode=p["mode"],
            max_boxes=p["max_boxes"],
            min_size=p["min_size"],
            seed=p["seed"],
            max_side=p.get("max_side"),
        )

    def path(self, image_id: str) -> str:
        """The file that holds ``image_id``'s boxes."""
        if not isinstance(image_id, str) or not image_id:
            raise ValueError(f"image id {image_id!r}; expected a non-empty str")
        return os.path.join(self.cache_dir, "boxes", _filename(image_id))

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and bool(image_id) and os.path.exists(self.path(image_id))

    def ids(self) -> list[str]:
        """Every cached image id, sorted."""
        names = os.listdir(os.path.join(self.cache_dir, "boxes"))
        return sorted(
            urllib.parse.unquote(n[: -len(".npy")])
            for n in names
            if n.endswith(".npy") and not n.startswith(".")
        )

    def __len__(self) -> int:
        return len(self.ids())

    def get(self, image_id: str) -> np.ndarray:
        """The proposals of ``image_id``: float32 ``(n, 4)`` ``(x1, y1, x2, y2)``.

        Raises:
          KeyError: ``image_id`` is not in the cache (the message names the cache).
        """
        path = self.path(image_id)
        try:
            return np.load(path)
        except FileNotFoundError:
            raise KeyError(
                f"no proposals for image {image_id!r} in {self.cache_dir!r} "
                f"({len(self)} images cached); compute them with ProposalCache.compute"
            ) from None

    def compute(
        self,
        images: Iterable[tuple[str, ImageLike]],
        *,
        num_workers: int | None = None,
        progress: bool = True,
        total: int | None = None,
        on_bad_image: Literal["raise", "skip"] = "raise",
    ) -> ProposalStats:
        """Computes the proposals of every image not cached yet.

        Args:
          images: ``(image_id, image)`` pairs; ``image`` a uint8/uint16 array (see
            :func:`to_rgb8`), an encoded file's bytes, or a path. Ids are unique.
          num_workers: processes (default: every core, ``os.cpu_count()``); 0
            computes in this process. Workers are spawned (not forked: JAX and
            TensorFlow are multi-threaded) and each runs OpenCV on one thread.
          progress: show a tqdm progress bar.
          total: the number of images, for the progress bar (default
            ``len(images)`` when it has one).
          on_bad_image: ``"raise"``: an unreadable image stops the run with
            :class:`spp_jax.data.BadImageError` naming it (images finished before
            stay cached); ``"skip"``: it is listed in ``stats.skipped``.

        Returns:
          A :class:`ProposalStats`.

        Raises:
          spp_jax.data.BadImageError: an unreadable image, with ``on_bad_image="raise"``.
          ValueError: a repeated id, a bad argument.
        """
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image={on_bad_image!r}; expected 'raise' or 'skip'")
        if num_workers is None:
            num_workers = os.cpu_count() or 1
        if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r}; expected an int >= 0")
        if total is None and hasattr(images, "__len__"):
            total = len(images)  # type: ignore[arg-type]
        stats = ProposalStats()
        start = time.perf_counter()
        params = {k: self.params[k] for k in ("mode", "max_boxes", "min_size", "seed")}
        params["max_side"] = self.params.get("max_side")

        from tqdm.auto import tqdm

        bar = tqdm(total=total, disable=not progress, desc="selective search", unit="img")
        tasks = self._tasks(images, stats, bar)

        def done(result: tuple[str, str, float | None, str | None]) -> None:
            image_id, name, seconds, error = result
            bar.update(1)
            if error is not None:
                if on_bad_image == "raise":
                    raise BadImageError(name, error)
                stats.skipped.append(image_id)
                return
            stats.computed += 1
            stats.seconds += seconds or 0.0

        try:
            if num_workers == 0:
                for task in tasks:
                    done(_compute_one(task, params))
            else:
                self._run_pool(tasks, params, int(num_workers), done)
        finally:
            bar.close()
        stats.wall_seconds = time.perf_counter() - start
        return stats

    def _tasks(self, images, stats: ProposalStats, bar) -> Iterator[tuple[str, str, Any, str]]:
        """``(image_id, name, image, out_path)`` per image to compute; cached ones are counted."""
        seen: set[str] = set()
        for image_id, image in images:
            if image_id in seen:
                raise ValueError(f"image id {image_id!r} appears twice; ids must be unique")
            seen.add(image_id)
            path = self.path(image_id)
            if os.path.exists(path):
                stats.cached += 1
                bar.update(1)
                continue
            name = os.fspath(image) if isinstance(image, str | os.PathLike) else image_id
            yield image_id, name, image, path

    @staticmethod
    def _run_pool(tasks, params, num_workers: int, done) -> None:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=ctx, initializer=_init_worker
        ) as pool:
            pending: set[concurrent.futures.Future] = set()
            try:
                for task in tasks:
                    pending.add(pool.submit(_compute_one, task, params))
                    if len(pending) >= 4 * num_workers:  # bounded memory
                        finished, pending = concurrent.futures.wait(
                            pending, return_when=concurrent.futures.FIRST_COMPLETED
                        )
                        for f in finished:
                            done(f.result())
                for f in concurrent.futures.as_completed(pending):
                    pending.discard(f)
                    done(f.result())
            except BaseException:
                for f in pending:
                    f.cancel()
                raise


def _init_worker() -> None:
    with contextlib.suppress(ImportError):
        _cv2().setNumThreads(1)  # one process per core already


def _compute_one(task: tuple[str, str, Any, str], params: dict[str, Any]):
    """Worker: reads one image, runs selective search, writes its file atomically.

    Returns ``(image_id, name, seconds, error)``; ``error`` is the reason an
    image could not be read (exceptions with extra constructor arguments do not
    cross process boundaries, so the main process raises it).
    """
    image_id, name, image, out_path = task
    try:
        if isinstance(image, str | os.PathLike):
            try:
                with open(image, "rb") as f:
                    image = f.read()
            except OSError as e:
                raise BadImageError(name, e.strerror or str(e)) from None
        if isinstance(image, bytes | bytearray | memoryview):
            image = decode(bytes(image), name)
        else:
            try:
                image = to_rgb8(image, name)
            except ValueError as e:
                raise BadImageError(name, str(e)) from None
    except BadImageError as e:
        return image_id, name, None, e.reason
    start = time.perf_counter()
    boxes = selective_search(image, **params)
    seconds = time.perf_counter() - start
    with atomic_open(out_path, "wb") as f:
        np.save(f, boxes)
    return image_id, name, seconds, None


def compute_proposals(
    images: Iterable[tuple[str, ImageLike]],
    cache_dir: str | os.PathLike,
    *,
    mode: Mode = "fast",
    max_boxes: int | None = 2000,
    min_size: float = DEFAULT_MIN_SIZE,
    seed: int = 0,
    num_workers: int | None = None,
    progress: bool = True,
    total: int | None = None,
    on_bad_image: Literal["raise", "skip"] = "raise",
) -> ProposalCache:
    """Computes (or completes) a proposal cache; see :class:`ProposalCache`.

    Returns:
      The cache, to read back with :meth:`ProposalCache.get`.
    """
    cache = ProposalCache(cache_dir, mode=mode, max_boxes=max_boxes, min_size=min_size, seed=seed)
    cache.compute(
        images, num_workers=num_workers, progress=progress, total=total, on_bad_image=on_bad_image
    )
    return cache


def load_proposals(cache_dir: str | os.PathLike, image_id: str) -> np.ndarray:
    """Reads one image's cached proposals: float32 ``(n, 4)`` ``(x1, y1, x2, y2)``.

    Raises:
      FileNotFoundError: ``cache_dir`` is not a proposal cache.
      KeyError: ``image_id`` is not in it.
    """
    return ProposalCache.open(cache_dir).get(image_id)
