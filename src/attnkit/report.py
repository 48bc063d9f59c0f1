"""Kept for existing imports: running and reporting live in :mod:`attnkit.experiment.report`."""

from .experiment.report import (
    collect_experiments,
    error_dict,
    missing_required,
    render_html,
    result_dict,
    run_experiment,
    run_report,
    to_jsonable,
)

__all__ = [
    "collect_experiments",
    "error_dict",
    "missing_required",
    "render_html",
    "result_dict",
    "run_experiment",
    "run_report",
    "to_jsonable",
]
