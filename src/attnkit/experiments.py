"""Kept for existing imports: the registry lives in :mod:`attnkit.experiment.registry`."""

from .experiment.registry import MODULES, registry

__all__ = ["MODULES", "registry"]
