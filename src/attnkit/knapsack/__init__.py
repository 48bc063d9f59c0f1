"""Knapsack by attention: two designed (or learned) heads over item tokens, their product and a
greedy fill, measured against the exact optimum and classic greedy rules on Pisinger's classes.
"""

from .attention import AttentionKnapsack, KnapsackAttentionResult, item_features
from .instances import CLASSES, KnapsackInstance, check_instance, generate
from .solvers import (
    greedy_fill,
    greedy_ratio,
    greedy_value,
    greedy_weight,
    solve_exact,
    total,
)

__all__ = [
    "AttentionKnapsack",
    "CLASSES",
    "KnapsackAttentionResult",
    "KnapsackInstance",
    "check_instance",
    "generate",
    "greedy_fill",
    "greedy_ratio",
    "greedy_value",
    "greedy_weight",
    "item_features",
    "solve_exact",
    "total",
]
