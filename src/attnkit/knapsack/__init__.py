"""Knapsack by attention: two designed (or learned) heads over item tokens, their product and a
greedy fill, measured against the exact optimum and classic greedy rules on Pisinger's classes.
"""

from .attention import AttentionKnapsack, KnapsackAttentionResult, item_features
from .instances import (
    CLASSES,
    KnapsackInstance,
    check_instance,
    generate,
    pisinger_capacity_fraction,
)
from .solvers import (
    greedy_fill,
    greedy_fill_batch,
    greedy_random,
    greedy_ratio,
    greedy_ratio_best_item,
    greedy_value,
    greedy_weight,
    optimum_value,
    solve_exact,
    total,
    with_best_item,
)

__all__ = [
    "AttentionKnapsack",
    "CLASSES",
    "KnapsackAttentionResult",
    "KnapsackInstance",
    "check_instance",
    "generate",
    "greedy_fill",
    "greedy_fill_batch",
    "greedy_random",
    "greedy_ratio",
    "greedy_ratio_best_item",
    "greedy_value",
    "greedy_weight",
    "item_features",
    "optimum_value",
    "pisinger_capacity_fraction",
    "solve_exact",
    "total",
    "with_best_item",
]
