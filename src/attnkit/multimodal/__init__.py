"""Cross-modal fusion on spoken digits: cross-attention vs early and late fusion."""

from .data import (
    Recordings,
    SpokenDigitTask,
    fsdd_path,
    load_fsdd,
    load_recordings,
    split_speakers,
    synthetic_recordings,
)
from .models import (
    MODEL_NAMES,
    CrossModalFusion,
    EarlyFusion,
    FusionModel,
    LateFusion,
    count_parameters,
    matched_models,
)

__all__ = [
    "MODEL_NAMES",
    "CrossModalFusion",
    "EarlyFusion",
    "FusionModel",
    "LateFusion",
    "Recordings",
    "SpokenDigitTask",
    "count_parameters",
    "fsdd_path",
    "load_fsdd",
    "load_recordings",
    "matched_models",
    "split_speakers",
    "synthetic_recordings",
]
