"""Kept for existing imports: the ``engine`` experiment lives in :mod:`attnkit.bench.experiment`."""

from .bench.experiment import *  # noqa: F403
from .bench.experiment import EXPERIMENT, run  # noqa: F401
