"""attnkit.profiling: median timing and peak resident memory measured in a fresh process."""

from __future__ import annotations

import pytest
import torch

from attnkit.profiling import measure, peak_rss_subprocess, peak_rss_sweep, rss_reset_supported

MIB = 2**20


def touch_bytes(n: int) -> None:
    """Allocate and write ``n`` bytes (module-level: it runs in the measuring subprocess)."""
    torch.ones(n, dtype=torch.uint8)


def make_size(mib: int) -> int:
    return mib * MIB


def test_measure_returns_median_seconds():
    calls = []
    secs = measure(lambda x: calls.append(x), 1, repeat=3, warmup=2)
    assert len(calls) == 5 and 0 <= secs < 1
    with pytest.raises(ValueError, match="repeat"):
        measure(print, repeat=0)


def test_peak_rss_sees_torch_allocations():
    peak = peak_rss_subprocess(touch_bytes, 64 * MIB)
    assert 56 * MIB < peak < 160 * MIB


@pytest.mark.skipif(not rss_reset_supported(), reason="needs Linux /proc/self/clear_refs")
def test_sweep_resets_the_peak_between_calls():
    # A small call after a large one must not inherit the large one's peak.
    small, large, small_again = peak_rss_sweep(touch_bytes, [(8,), (96,), (8,)], setup=make_size)
    assert 80 * MIB < large < 200 * MIB
    for peak in (small, small_again):
        assert 4 * MIB < peak < 40 * MIB
