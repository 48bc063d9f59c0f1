"""Kept for existing imports: the experiment types live in :mod:`attnkit.experiment.types`."""

from .experiment.types import Decision, Experiment, Option, Result, RunContext, verdict_of

__all__ = ["Decision", "Experiment", "Option", "Result", "RunContext", "verdict_of"]
