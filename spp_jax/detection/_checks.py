"""Argument checks shared by the detection modules.

Each check returns the value converted (a Python ``int`` or ``float``, a float32
or int64 array) or raises an error that names the argument, the bad value and
what is accepted.

>>> number("C", "0.5", low=0, strict=True)
0.5
>>> number("lam", -1, low=0)
Traceback (most recent call last):
...
ValueError: lam must be a finite number >= 0, got -1
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def choice(name: str, value: Any, accepted: tuple[str, ...]) -> Any:
    """``value`` if it is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted are {accepted}")
    return value


def int_at_least(name: str, value: Any, low: int) -> int:
    """``value`` as an int ``>= low`` (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(value)


def number(name: str, value: Any, *, low: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float, ``>= low`` (``> low`` if ``strict``) when ``low`` is given."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if low is None:
        if not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    elif not math.isfinite(v) or v < low or (strict and v == low):
        raise ValueError(
            f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}"
        )
    return v


def float_rows(name: str, x: Any, cols: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``(N, cols)`` array whose values are all finite."""
    arr = np.asarray(x)
    if arr.ndim != 2 or (cols is not None and arr.shape[1] != cols):
        want = f"(N, {cols})" if cols is not None else "(N, D)"
        raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, np.float32)
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        raise ValueError(
            f"{name} must be finite (as float32); row {int(bad[0])} is not ({bad.size} such rows)"
        )
    return arr


def class_labels(name: str, labels: Any, n: int, num_classes: int) -> np.ndarray:
    """``labels`` as int64 ``(n,)`` classes in ``1..num_classes`` (0, the background, is not)."""
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be ints in 1..{num_classes}, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 1) | (arr > num_classes))
    if bad.size:
        raise ValueError(
            f"{name} must be classes in 1..{num_classes} (0, the background, is not a class "
            f"here); entry {int(bad[0])} is {int(arr[bad[0]])}"
        )
    return arr.astype(np.int64)
