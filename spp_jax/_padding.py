"""Row padding to a few static sizes, so that a jitted function compiles once per size.

A batch of ``n`` rows (windows, boxes, examples) is padded with filler rows up to a
"bucket" size that depends on ``n`` only through a coarse rule; the caller keeps the
first ``n`` rows of the result (or passes a validity mask ``np.arange(rows) < n``).

>>> pad_rows(np.ones((2, 3), np.float32), round_up(2, 4)).shape
(4, 3)
>>> round_up(0, 256), round_up(257, 256), power_of_two(5), power_of_two(9)
(256, 512, 8, 16)
"""

from __future__ import annotations

from typing import Any

import numpy as np


def round_up(n: int, multiple: int) -> int:
    """The smallest positive multiple of ``multiple`` that is at least ``n``.

    An empty batch (``n == 0``) still gets one bucket, so it has a static shape too.
    """
    return max(multiple, -(-n // multiple) * multiple)


def power_of_two(n: int, minimum: int = 8) -> int:
    """The smallest power of two that is at least ``n`` and ``minimum`` (a power of two).

    Fewer sizes than :func:`round_up` when ``n`` ranges over orders of magnitude.
    """
    return max(minimum, 1 << (n - 1).bit_length())


def pad_rows(a: Any, rows: int, fill: Any = 0) -> np.ndarray:
    """``a`` with rows of ``fill`` appended up to ``rows`` rows (``a``'s dtype kept).

    Args:
      a: array-like with at least one axis and at most ``rows`` rows.
      rows: the padded length of axis 0.
      fill: a scalar, or a row (broadcast to ``a.shape[1:]``).

    Returns:
      ``np.asarray(a)`` itself when it already has ``rows`` rows, else a new array.

    Raises:
      ValueError: ``a`` has more than ``rows`` rows.
    """
    a = np.asarray(a)
    if len(a) > rows:
        raise ValueError(f"cannot pad {len(a)} rows to {rows}: more rows than the padded size")
    if len(a) == rows:
        return a
    out = np.full((rows, *a.shape[1:]), fill, a.dtype)
    out[: len(a)] = a
    return out
