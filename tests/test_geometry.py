import numpy as np
import pytest

import spp_jax
from spp_jax import geometry
from tests.reference import ref_bins


def test_reference_examples_exact():
    # docs/spp-reference.md section 2: a=7, n=4 and a=3, n=4.
    assert spp_jax.axis_bins(7, 4) == ((0, 2), (1, 4), (3, 6), (5, 7))
    assert spp_jax.axis_bins(7, 4, "partition") == ((0, 2), (2, 4), (4, 6), (6, 7))
    assert spp_jax.axis_bins(3, 4) == ((0, 1), (0, 2), (1, 3), (2, 3))
    assert spp_jax.axis_bins(13, 6) == ((0, 3), (2, 5), (4, 7), (6, 9), (8, 11), (10, 13))


def test_worked_average_check():
    # arange(14) into 4 average bins (docs/spp-reference.md section 2).
    x = np.arange(14.0)
    means = {
        rule: [x[s:e].mean() for s, e in spp_jax.axis_bins(14, 4, rule)]
        for rule in ("adaptive", "partition", "sliding")
    }
    assert means["adaptive"] == [1.5, 4.5, 8.5, 11.5]
    assert means["partition"] == [1.5, 5.5, 9.0, 12.0]
    assert means["sliding"] == [1.5, 4.5, 7.5, 10.5]


@pytest.mark.parametrize("rule", ["adaptive", "partition"])
def test_bins_match_formulas_for_all_small_sizes(rule):
    for n in range(1, 9):
        for a in range(1, 40):
            if rule == "partition" and a < n:
                continue
            bins = spp_jax.axis_bins(a, n, rule)
            assert list(bins) == ref_bins(a, n, rule)
            assert all(e > s for s, e in bins)
            covered = set().union(*(range(s, e) for s, e in bins))
            assert covered == set(range(a))


def test_sliding_wrong_counts_raise():
    # The counts listed in docs/spp-reference.md section 2.
    for a in (6, 7, 11):
        with pytest.raises(ValueError, match="adaptive"):
            spp_jax.axis_bins(a, 4, "sliding")
    for a in (8, 9, 10, 11, 15, 16, 17, 22, 23, 29):
        with pytest.raises(ValueError, match=r"gives \d+ windows"):
            spp_jax.axis_bins(a, 6, "sliding")
    with pytest.raises(ValueError, match="gives 9 windows"):
        spp_jax.axis_bins(10, 6, "sliding")  # the paper's own 180-px setting
    assert spp_jax.axis_bins(13, 6, "sliding")[0] == (0, 3)


def test_partition_smaller_than_bins_raises():
    with pytest.raises(ValueError, match="length 3 into 4"):
        spp_jax.axis_bins(3, 4, "partition")


def test_pyramid_bins_structure_and_cache():
    lv = spp_jax.pyramid_bins(13, 10, (6, (2, 3), 1))
    assert [(b.n_h, b.n_w) for b in lv] == [(6, 6), (2, 3), (1, 1)]
    assert lv[1].rows == ((0, 7), (6, 13)) and lv[1].cols == ((0, 4), (3, 7), (6, 10))
    assert spp_jax.pyramid_bins(13, 10, (6, (2, 3), 1)) is lv


def test_output_dim():
    assert spp_jax.output_dim(256, (6, 3, 2, 1)) == 12800
    assert spp_jax.output_dim(256, (4, 3, 2, 1)) == 256 * 30
    assert spp_jax.output_dim(3, ((2, 3), 1)) == 21
    with pytest.raises(ValueError, match="channels"):
        spp_jax.output_dim(0, (1,))


@pytest.mark.parametrize(
    ("levels", "error", "match"),
    [
        ((), ValueError, "empty"),
        ((6, 0), ValueError, "positive"),
        ((6, -1), ValueError, "positive"),
        ((6, 2.5), TypeError, "2.5"),
        (((2, 3, 4),), TypeError, r"\(2, 3, 4\)"),
        ("abc", TypeError, "abc"),
        ((True,), TypeError, "True"),
    ],
)
def test_bad_levels(levels, error, match):
    with pytest.raises(error, match=match):
        geometry.normalize_levels(levels)


def test_bad_rule_and_sizes():
    with pytest.raises(ValueError, match=r"'bogus'.*adaptive"):
        spp_jax.axis_bins(5, 2, "bogus")
    with pytest.raises(ValueError, match="length 0"):
        spp_jax.axis_bins(0, 2)


def test_cover_ranges():
    fine, coarse = spp_jax.axis_bins(10, 6), spp_jax.axis_bins(10, 3)
    assert geometry.cover_ranges(fine, coarse) == ((0, 2), (2, 4), (4, 6))
    # 4 does not divide 6: level 4 is not a union of level-6 bins here.
    assert geometry.cover_ranges(spp_jax.axis_bins(10, 6), spp_jax.axis_bins(10, 4)) is None
