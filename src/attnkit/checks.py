"""Argument checks shared by every layer of attnkit, so a bad argument gets the same
``ValueError`` wording wherever it is passed."""

from __future__ import annotations

import numbers

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: object, *, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1 (Python or NumPy;
    ``bool`` is refused), or ``None`` when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        allowed = "None or a positive int" if optional else "a positive int"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
