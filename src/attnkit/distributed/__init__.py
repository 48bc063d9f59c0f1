"""attnkit on many processes (``torch.distributed``).

- :mod:`attnkit.distributed.sequence`: sequence-parallel sparse attention, one long sequence
  sharded along its length over ranks (:func:`sequence_parallel_attention`).
- :mod:`attnkit.distributed.data_parallel`: data-parallel training helpers (DDP, torchrun),
  loaded on first use of one of its names.
"""

from __future__ import annotations

import importlib

from . import sequence
from .sequence import *  # noqa: F403 - the package exports exactly sequence.__all__

__all__ = list(sequence.__all__)


def _data_parallel_names() -> list[str]:
    try:
        module = importlib.import_module(".data_parallel", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.data_parallel":
            raise
        return []
    return [n for n in getattr(module, "__all__", []) if n not in __all__]


def __getattr__(name: str):
    """Names of :mod:`.data_parallel` (its ``__all__``), imported on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name in _data_parallel_names():
        value = getattr(importlib.import_module(".data_parallel", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_data_parallel_names()))

