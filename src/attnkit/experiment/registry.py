"""The registry of experiments. Each application module listed here defines ``EXPERIMENT``
(or ``EXPERIMENTS``, a list) of type :class:`attnkit.experiment.Experiment`."""

from __future__ import annotations

import importlib

from .types import Experiment

# Module paths, in report order. Imported lazily so one application's optional dependency
# never breaks another's.
MODULES: list[str] = [
    "attnkit.bench.experiment",  # the engine's own experiment (engine modules are math only)
    "attnkit.lm.experiment",
    "attnkit.pruning_experiment",  # tools beside attnkit.pruning, on the ViT and the LM
    "attnkit.genome.experiment",
    "attnkit.vision.experiment",
    "attnkit.volume.experiment",
    "attnkit.graphs.experiment",
    "attnkit.ecology.experiment",
    "attnkit.multimodal.experiment",
    "attnkit.knapsack.experiment",
]


def registry() -> dict[str, Experiment]:
    found: dict[str, Experiment] = {}
    for path in MODULES:
        try:
            mod = importlib.import_module(path)
        except ModuleNotFoundError as e:
            if e.name and (e.name == path or path.startswith(e.name + ".")):
                continue  # not written yet
            raise
        exps = getattr(mod, "EXPERIMENTS", None) or [mod.EXPERIMENT]
        for exp in exps:
            found[exp.name] = exp
    return found
