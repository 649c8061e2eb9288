"""Bin geometry for spatial pyramid pooling: plain Python on static ints, cached.

Everything here runs at trace time on static shapes, so XLA only ever sees
constant slices. The bin rules: :func:`axis_bins` (``docs/pooling.md``, "Bin rules",
compares them; ``docs/spp-reference.md`` section 2 says who uses which).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import NamedTuple

RULES = ("adaptive", "sliding", "partition")

Bins = tuple[tuple[int, int], ...]
"""Per-axis bins: a tuple of ``(start, end)`` half-open cell ranges."""

Level = tuple[int, int]
"""One pyramid level as ``(n_h, n_w)``."""

LevelsLike = int | Sequence[int | Sequence[int]]


class LevelBins(NamedTuple):
    """The bins of one pyramid level on one input shape.

    Attributes:
      n_h: number of bins along the height axis.
      n_w: number of bins along the width axis.
      rows: ``n_h`` half-open ``(start, end)`` row ranges.
      cols: ``n_w`` half-open ``(start, end)`` column ranges.
    """

    n_h: int
    n_w: int
    rows: Bins
    cols: Bins


def _is_int(v: object) -> bool:
    # Python and NumPy ints; bool is an int subclass but never a meaningful count.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_positive_int(name: str, value: object) -> None:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def normalize_levels(levels: LevelsLike) -> tuple[Level, ...]:
    """Turns a levels argument into a tuple of ``(n_h, n_w)`` pairs.

    Args:
      levels: a sequence whose items are an int ``n`` (``n x n`` bins) or a pair
        ``(n_h, n_w)``. A bare int ``n`` is taken as the single level ``(n,)``.

    Returns:
      A tuple of ``(n_h, n_w)`` int pairs, in the order given.

    Raises:
      ValueError: empty levels, or a count that is not positive.
      TypeError: an item that is neither an int nor a pair of ints.

    >>> normalize_levels((6, 3, (2, 4), 1))
    ((6, 6), (3, 3), (2, 4), (1, 1))
    """
    if _is_int(levels):
        levels = (levels,)  # type: ignore[assignment]
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Iterable):
        raise TypeError(f"levels must be a sequence of ints or (n_h, n_w) pairs, got {levels!r}")
    out: list[Level] = []
    for item in levels:
        if _is_int(item):
            pair = (int(item), int(item))  # type: ignore[arg-type]
        elif (
            isinstance(item, Sequence)
            and not isinstance(item, (str, bytes))
            and len(item) == 2
            and all(_is_int(v) for v in item)
        ):
            pair = (int(item[0]), int(item[1]))
        else:
            raise TypeError(
                f"each pyramid level must be an int n or a pair (n_h, n_w) of ints, "
                f"got {item!r} in levels={levels!r}"
            )
        if pair[0] < 1 or pair[1] < 1:
            raise ValueError(
                f"pyramid level bin counts must be positive ints, got {item!r} in levels={levels!r}"
            )
        out.append(pair)
    if not out:
        raise ValueError("levels must name at least one pyramid level, got an empty sequence")
    return tuple(out)


def check_rule(rule: str) -> str:
    """Returns ``rule`` or raises a ValueError naming the accepted rules."""
    if rule not in RULES:
        raise ValueError(f"unknown bin rule {rule!r}; accepted rules are {RULES}")
    return rule


@functools.lru_cache(maxsize=4096)
def axis_bins(a: int, n: int, rule: str = "adaptive") -> Bins:
    """The ``n`` bins of one axis of length ``a`` under ``rule``.

    Bin ``i`` is the half-open cell range ``[start, end)``:

    * ``"adaptive"`` (default, paper Appendix A, PyTorch ``adaptive_*_pool2d``):
      ``start = floor(i * a / n)``, ``end = ceil((i + 1) * a / n)``. Valid for every
      ``a >= 1``; bins never are empty and may overlap by one cell.
    * ``"sliding"`` (paper section 2.3): window ``ceil(a / n)``, stride
      ``floor(a / n)``. Only valid where that gives exactly ``n`` windows.
    * ``"partition"`` (non-overlapping, Equinox's rule): the first ``a mod n`` bins
      get ``ceil(a / n)`` cells, the rest ``floor(a / n)``. Needs ``a >= n``.

    Args:
      a: axis length (>= 1).
      n: number of bins (>= 1).
      rule: ``"adaptive"``, ``"sliding"`` or ``"partition"``.

    Returns:
      ``n`` half-open ``(start, end)`` ranges, in order.

    Raises:
      ValueError: a non-positive ``a`` or ``n``, an unknown rule, or a geometry the
        rule cannot produce (``"sliding"`` that does not give exactly ``n``
        windows, ``"partition"`` with ``a < n``).

    >>> axis_bins(7, 4), axis_bins(7, 4, rule="partition")
    (((0, 2), (1, 4), (3, 6), (5, 7)), ((0, 2), (2, 4), (4, 6), (6, 7)))
    >>> axis_bins(3, 4)  # adaptive works for a < n: bins overlap, none is empty
    ((0, 1), (0, 2), (1, 3), (2, 3))
    """
    check_rule(rule)
    if a < 1:
        raise ValueError(f"cannot pool an axis of length {a}: spatial sizes must be >= 1")
    if n < 1:
        raise ValueError(f"bin count must be >= 1, got {n}")
    if rule == "adaptive":
        return tuple(((i * a) // n, -((-(i + 1) * a) // n)) for i in range(n))
    if rule == "sliding":
        win, stride = math.ceil(a / n), a // n
        count = (a - win) // stride + 1 if stride > 0 else 0
        if count != n:
            raise ValueError(
                f'rule="sliding" (window ceil({a}/{n})={win}, stride floor({a}/{n})={stride}) '
                f"gives {count} windows on an axis of length {a}, not the {n} bins asked "
                f'for; use rule="adaptive", which gives exactly {n} bins for every length'
            )
        return tuple((i * stride, i * stride + win) for i in range(n))
    # partition
    if a < n:
        raise ValueError(
            f'rule="partition" cannot split an axis of length {a} into {n} non-empty '
            f'bins (needs length >= {n}); use rule="adaptive", which allows a < n'
        )
    q, r = divmod(a, n)
    bins, start = [], 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        bins.append((start, end))
        start = end
    return tuple(bins)


def pyramid_bins(
    h: int, w: int, levels: LevelsLike = (6, 3, 2, 1), rule: str = "adaptive"
) -> tuple[LevelBins, ...]:
    """Static bins of every pyramid level for an ``h x w`` feature map.

    Pure and cached: the same arguments always return the same (identical) object.

    Args:
      h: feature map height (>= 1).
      w: feature map width (>= 1).
      levels: ints ``n`` (``n x n`` bins) or pairs ``(n_h, n_w)``.
      rule: ``"adaptive"`` (default), ``"sliding"`` or ``"partition"``.

    Returns:
      One :class:`LevelBins` per level, in the order given.

    >>> lv = pyramid_bins(13, 13, (6, 1))
    >>> lv[0].rows[:3], lv[1].cols
    (((0, 3), (2, 5), (4, 7)), ((0, 13),))
    """
    return _pyramid_bins(int(h), int(w), normalize_levels(levels), check_rule(rule))


@functools.lru_cache(maxsize=1024)
def _pyramid_bins(h: int, w: int, levels: tuple[Level, ...], rule: str) -> tuple[LevelBins, ...]:
    return tuple(
        LevelBins(nh, nw, axis_bins(h, nh, rule), axis_bins(w, nw, rule)) for nh, nw in levels
    )


def output_dim(channels: int, levels: LevelsLike = (6, 3, 2, 1)) -> int:
    """Length of the pooled vector: ``channels * sum(n_h * n_w)``.

    >>> output_dim(256, (6, 3, 2, 1))
    12800
    """
    _check_positive_int("channels", channels)
    return int(channels) * sum(nh * nw for nh, nw in normalize_levels(levels))


def cover_ranges(fine: Bins, coarse: Bins) -> tuple[tuple[int, int], ...] | None:
    """Expresses each coarse bin as a contiguous run of fine bins, if possible.

    Returns, for each coarse bin, the half-open range ``[lo, hi)`` of fine-bin
    indices whose union is exactly that coarse bin, or None when some coarse bin
    is not such a union. With max pooling (idempotent, so overlaps do not matter)
    a coarse level can then be reduced from the fine level's output instead of
    from the input. For the adaptive rule this holds whenever ``n_coarse``
    divides ``n_fine``, for every axis length.

    >>> cover_ranges(axis_bins(13, 6), axis_bins(13, 3))
    ((0, 2), (2, 4), (4, 6))
    """
    out = []
    for s, e in coarse:
        members = [i for i, (fs, fe) in enumerate(fine) if s <= fs and fe <= e]
        if not members:
            return None
        lo, hi = members[0], members[-1] + 1
        if members != list(range(lo, hi)) or fine[lo][0] != s or fine[hi - 1][1] != e:
            return None
        if any(fine[i + 1][0] > fine[i][1] for i in range(lo, hi - 1)):
            return None  # a gap between consecutive fine bins
        out.append((lo, hi))
    return tuple(out)
