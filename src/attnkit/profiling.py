"""Kept for existing imports: timing and memory helpers live in
:mod:`attnkit.experiment.profiling`."""

from .experiment.profiling import (
    measure,
    peak_rss_subprocess,
    peak_rss_sweep,
    rss_reset_supported,
)

__all__ = ["measure", "peak_rss_subprocess", "peak_rss_sweep", "rss_reset_supported"]
