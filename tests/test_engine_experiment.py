"""The engine experiment's own pieces: the closed-form pair counts and the sizes that decide."""

import math

import pytest

from attnkit.bench import experiment as E


@pytest.mark.parametrize("config", E.SPARSE)
@pytest.mark.parametrize("length", [1, 7, 16, 100, 257, 300, 1000, 4096, 5000])
def test_pair_count_matches_pattern_nnz(config, length):
    """The closed form agrees with the engine's enumeration (edges, overlaps of window,
    exponential offsets and global rows/keys, lengths below the window and the global count)."""
    assert E._pairs(config, length) == E.scaling_pattern(config, length).nnz(length, length)


def test_pair_count_dense_and_bad_config():
    assert E._pairs("dense", 300) == 300 * 300
    with pytest.raises(ValueError, match="config"):
        E._pairs("nope", 10)


def test_quick_sizes_lie_in_the_fitted_regime():
    """Every quick sparse size is fitted (no size is timed only to be dropped), and the working
    set at the smallest fitted size exceeds a large last-level cache several times over."""
    assert min(E.QUICK_SPARSE) >= E.FIT_MIN_LEN
    assert len(E.QUICK_SPARSE) >= 2 and len([n for n in E.FULL_SPARSE if n >= E.FIT_MIN_LEN]) >= 3
    assert E._mib(E.FIT_MIN_LEN) >= 64


def test_paired_slope_cancels_a_load_change_between_rounds():
    """Times ~ pairs^1.0 scaled by a load factor per round: the per-round slopes are exactly 1
    (a tight interval), while resampling each size on its own sees the load as noise."""
    units = [1e6, 4e6]
    load = [1.0, 1.6, 0.8, 1.3, 1.0, 2.0, 0.9]
    repeats = [[u * 1e-8 * f for f in load] for u in units]
    paired = E._paired_slope(units, repeats)
    assert paired.value == pytest.approx(1.0) and paired.high - paired.low < 1e-9
    unpaired = E._slope(units, repeats)
    assert unpaired.high - unpaired.low > 0.1
    # quadratic cost is still seen as quadratic
    assert E._paired_slope(units, [[u * u * 1e-15 * f for f in load] for u in units]).value \
        == pytest.approx(2.0)
    assert math.isnan(E._paired_slope([1e6], [[1.0, 2.0]]).value)  # one size: no slope
