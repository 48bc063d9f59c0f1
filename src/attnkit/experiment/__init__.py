"""The experiment frame: what an experiment is (:mod:`.types`), the registry of the
applications' experiments (:mod:`.registry`), statistics for deciding claims from intervals
(:mod:`.stats`), timing and memory measurement (:mod:`.profiling`), and running them into JSON
and an HTML report (:mod:`.report`).

An application's ``experiment.py`` imports from here::

    from ..experiment import Experiment, Option, Result, RunContext, stats

    def run(ctx: RunContext) -> Result:
        per_seed = stats.over_seeds(lambda s: train_and_score(s), ctx.seed_list())
        gain = stats.paired_diff_ci([r["ours"] for r in per_seed], [r["base"] for r in per_seed])
        return Result(metrics=gain.metrics("gain"), seeds=len(per_seed),
                      decisions=[gain.decide("gain", threshold=0.0, direction=">")])
"""

from . import stats
from .types import (
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    NOT_RUN,
    Decision,
    Experiment,
    Option,
    Result,
    RunContext,
    verdict_of,
)

__all__ = [
    "HELD",
    "INCONCLUSIVE",
    "NOT_HELD",
    "NOT_RUN",
    "Decision",
    "Experiment",
    "Option",
    "Result",
    "RunContext",
    "stats",
    "verdict_of",
]
