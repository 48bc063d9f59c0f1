"""Experiment ``multimodal``: cross-attention vs early and late fusion on unaligned spoken
digits, accuracy vs utterance length over seeds, and training cost vs audio length."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..argtypes import nonnegative_int, positive_int
from ..experiment import Decision, Experiment, Option, Result, RunContext, stats
from ..experiment.stats import CI
from .data import FRAMES_PER_DIGIT, SpokenDigitTask, load_recordings, split_speakers
from .models import MODEL_NAMES, count_parameters, matched_models
from .training import _saved_bytes, evaluate, train_model

DIM, HEADS, HIDDEN = 32, 2, 64
BATCH_QUICK, BATCH_FULL = 32, 32
#: Held-out test examples per utterance length and seed.
TEST_QUICK, TEST_FULL = 400, 1000
#: Smallest difference of log-log slopes called "grows more slowly": a deterministic memory
#: difference has a zero-width interval, so a threshold of 0 would call 0.01 a win.
SLOPE_MARGIN = 0.1


def gain_decision_of(metrics: dict[str, float], gain: CI, digit_counts: Sequence[int],
                     n_seeds: int) -> Decision:
    """The decision on cross minus early accuracy at the longest length, gated: a comparison
    between models at chance means nothing. The positive control is every arm above chance
    (lowest CI bound > 0.5) on the shortest utterances (one digit: no order, no search); at
    the longest length at least one of the two compared arms must be above chance. A failed
    gate gives a NaN decision (inconclusive) whose note names what failed. Sets
    ``metrics["positive_control_min_ci_low"]``."""
    K, k0 = max(digit_counts), min(digit_counts)
    control = {n: metrics[f"acc_{n}_d{k0}_ci_low"] for n in MODEL_NAMES}
    metrics["positive_control_min_ci_low"] = min(control.values())
    at_k = {n: metrics[f"acc_{n}_d{K}_ci_low"] for n in ("cross", "early_concat")}
    failed = [f"{n} at {k0} digit (CI low {v:.3f})" for n, v in control.items()
              if not v > 0.5]
    if not max(at_k.values()) > 0.5:
        failed.append(f"neither cross nor early above chance at {K} digits (CI lows "
                      + ", ".join(f"{v:.3f}" for v in at_k.values()) + ")")
    name = f"acc_gain_cross_over_early_at_{K}_digits"
    if failed:
        return Decision(name, math.nan, math.nan, math.nan, 0.0, ">",
                        note="NaN: models at chance, no comparison (" + "; ".join(failed)
                             + f"); measured {gain}")
    return gain.decide(name, 0.0, ">", note=f"paired by seed ({n_seeds} seeds), held-out "
                                            "speakers")


def _train_one_seed(seed: int, rec, train_idx, test_idx, digit_counts, steps, quick,
                    batch) -> dict[str, float]:
    """Train the four matched fusions on a mix of utterance lengths; test accuracy per
    length on held-out speakers."""
    train_tasks = [SpokenDigitTask(rec, train_idx, n_digits=k) for k in digit_counts]
    norm = train_tasks[0].norm
    test_rng = np.random.default_rng(10_000 + seed)
    n_test = TEST_QUICK if quick else TEST_FULL
    test_batches = {k: [SpokenDigitTask(rec, test_idx, n_digits=k, norm=norm).sample(
        100, test_rng) for _ in range(n_test // 100)] for k in digit_counts}
    models = matched_models(DIM, HEADS, HIDDEN, seed=seed)
    out: dict[str, float] = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        losses = train_model(model, train_tasks, steps, batch, seed=seed)
        out[f"train_seconds_{name}"] = time.perf_counter() - t0
        out[f"final_loss_{name}"] = float(np.mean(losses[-20:]))
        out[f"params_{name}"] = count_parameters(model)
        for k in digit_counts:
            out[f"acc_{name}_d{k}"] = evaluate(model, test_batches[k])
    return out


def _cost(lengths: Sequence[int], repeat: int) -> tuple[dict, dict]:
    """Per model and audio length: seconds of one training step (interleaved across models,
    ``repeat`` rounds) and activation MiB (tensors saved for backward; deterministic)."""
    models = matched_models(DIM, HEADS, HIDDEN, seed=0)
    secs = {name: [] for name in models}
    mib = {name: [] for name in models}
    for L in lengths:
        gen = torch.Generator().manual_seed(L)
        audio = torch.randn(2, L, 13, generator=gen)
        text = torch.randint(0, 10, (2, 8), generator=gen)
        mask = torch.ones(2, L, dtype=torch.bool)

        def step(m, audio=audio, text=text, mask=mask):
            def run():
                m.zero_grad()
                m(audio, text, mask).sum().backward()
            return run

        times = stats.interleaved_times({n: step(m) for n, m in models.items()}, repeat=repeat)
        for name, m in models.items():
            secs[name].append(times[name])
            mib[name].append(_saved_bytes(
                lambda m=m, a=audio, t=text, k=mask: m(a, t, k)) / 2**20)
            m.zero_grad()
    return secs, mib


def _run(ctx: RunContext) -> Result:
    quick = ctx.quick
    steps = ctx.options.get("steps") or (240 if quick else 3000)
    digit_counts = [1, 2] if quick else [1, 2, 4, 8]
    lengths = [1024, 2048, 4096, 8192] if quick else [512, 1024, 2048, 4096, 8192]
    n_seeds = ctx.options.get("seeds")
    seeds = ctx.seed_list(quick=n_seeds or 3, full=n_seeds or 5)
    if len(seeds) < 3:
        raise ValueError(f"--seeds must be >= 3 (a CI over seeds needs them), got {len(seeds)}")
    batch = BATCH_QUICK if quick else BATCH_FULL
    rec = load_recordings(prefer_real=not ctx.options.get("synthetic"))
    train_idx, test_idx = split_speakers(rec)
    with stats.single_thread():  # tiny models: one intra-op thread avoids contention
        per_seed = stats.over_seeds(
            lambda s: _train_one_seed(s, rec, train_idx, test_idx, digit_counts, steps, quick,
                                      batch),
            seeds, progress=ctx.progress, desc="seeds (4 fusions each)")
        secs, mib = _cost(lengths, repeat=3 if quick else 7)
    m = stats.stack_metrics(per_seed)
    K = max(digit_counts)
    metrics: dict[str, float] = {}
    table = []
    for k in digit_counts:
        row: dict[str, object] = {"digits": k, "audio_frames": FRAMES_PER_DIGIT * k}
        for name in MODEL_NAMES:
            ci = stats.mean_ci(m[f"acc_{name}_d{k}"])
            metrics.update(ci.metrics(f"acc_{name}_d{k}"))
            row[f"acc_{name}"] = f"{ci.value:.3f} [{ci.low:.3f}, {ci.high:.3f}]"
        d = stats.paired_diff_ci(m[f"acc_cross_d{k}"], m[f"acc_early_concat_d{k}"])
        metrics.update(d.metrics(f"acc_cross_minus_early_d{k}"))
        row["cross_minus_early"] = f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        table.append(row)
    for name in MODEL_NAMES:  # the kept names: accuracy at the longest utterances
        metrics[f"acc_{name}"] = float(np.mean(m[f"acc_{name}_d{K}"]))
        metrics[f"params_{name}"] = float(m[f"params_{name}"][0])
        metrics[f"train_seconds_{name}"] = float(np.mean(m[f"train_seconds_{name}"]))
        metrics[f"final_loss_{name}"] = float(np.mean(m[f"final_loss_{name}"]))
    gain = stats.paired_diff_ci(m[f"acc_cross_d{K}"], m[f"acc_early_concat_d{K}"])
    for name in MODEL_NAMES:
        metrics.update(stats.slope_ci(lengths, secs[name]).metrics(f"time_loglog_slope_{name}"))
        metrics[f"memory_loglog_slope_{name}"] = stats.loglog_slope(lengths, mib[name])
        for L, reps, mb in zip(lengths, secs[name], mib[name]):
            metrics[f"ms_step_{name}_L{L}"] = 1000 * float(np.median(reps))
            metrics[f"mib_{name}_L{L}"] = float(mb)
    t_diff = stats.slope_diff_ci(lengths, secs["early_concat"], secs["cross"])
    m_diff = stats.slope_diff_ci(lengths, [[x] for x in mib["early_concat"]],
                           [[x] for x in mib["cross"]])
    ratio = stats.ratio_ci(secs["early_concat"][-1], secs["cross"][-1])
    metrics.update(ratio.metrics("time_ratio_early_over_cross_at_max_len"))
    metrics["memory_ratio_early_over_cross_at_max_len"] = (mib["early_concat"][-1]
                                                          / mib["cross"][-1])
    gain_decision = gain_decision_of(metrics, gain, digit_counts, len(seeds))
    decisions = [
        gain_decision,
        t_diff.decide("time_slope_early_minus_cross", SLOPE_MARGIN, ">",
                      note=f"log-log slope of a training step's time vs audio frames {lengths}"),
        m_diff.decide("memory_slope_early_minus_cross", SLOPE_MARGIN, ">",
                      note="activation memory is deterministic: a zero-width interval"),
    ]
    n_test = TEST_QUICK if quick else TEST_FULL
    speaker_note = (
        "speakers inferred by k-means (k=6) on each recording's MFCC mean and std after "
        "removing the per-digit average (the shipped npz has no speaker labels); the clusters "
        "reproduce FSDD's 6 speakers x 10 digits x 50 structure"
        if rec.source.startswith("fsdd") else "synthetic speakers (known labels)")
    acc_k = ", ".join(f"{n} {metrics[f'acc_{n}']:.3f}" for n in MODEL_NAMES)
    notes = (
        f"Data: {rec.source}; {len(train_idx)} training / {len(test_idx)} test recordings; "
        f"test speakers held out ({speaker_note}). Task: k spoken digits (k in {digit_counts}) "
        f"in a {FRAMES_PER_DIGIT}k-frame stream at random offsets with random silence/noise "
        "gaps (a uniform random composition of the free frames), each digit time-stretched by "
        "a factor in [0.8, 1.25]; half the texts corrupted (swap of two different digits or "
        "one substitution). No model gets positions of the other modality or any alignment "
        "prior: each modality only has its own index encoding. Shared audio encoder: three "
        "convolutions, two of stride 2 (one audio position = 4 frames, receptive field 29 "
        "frames, about one spoken digit). Models (parameters matched: "
        + ", ".join(f"{n} {int(metrics[f'params_{n}'])}" for n in MODEL_NAMES)
        + f"): cross = text-over-audio cross-attention + text self-attention; early = two "
        "self-attention layers over the concatenation; late_attnpool = attention pooling "
        "(4 learned queries) per modality + MLP; late_concat = mean pooling + MLP. Each seed "
        f"trains every model for {steps} steps x {batch} examples in a curriculum (stage s of "
        f"{len(digit_counts)} cycles through the s shortest lengths; the same examples for every "
        f"model); test accuracy on {n_test} examples per length. Positive control: every arm "
        f"above chance at {min(digit_counts)} digit (lowest CI bound "
        f"{metrics['positive_control_min_ci_low']:.3f}); without it, or with neither cross nor "
        "early above chance at the longest length, the gain is NaN (inconclusive). "
        f"Seeds: {len(seeds)}; at k={K}: {acc_k}; cross - early (paired) {gain}. Cost: "
        f"training step, batch 2, 8 text tokens, audio {lengths} frames; time slopes cross "
        f"{metrics['time_loglog_slope_cross']:.2f}, early "
        f"{metrics['time_loglog_slope_early_concat']:.2f} (difference {t_diff}); memory slopes "
        f"cross {metrics['memory_loglog_slope_cross']:.2f}, early "
        f"{metrics['memory_loglog_slope_early_concat']:.2f}; early/cross time at "
        f"{lengths[-1]} frames {ratio}. Timings are wall-clock on a shared CPU (noisy); memory "
        "counts tensors saved for backward (the engine's attention saves no L x L matrix, so "
        f"early fusion's memory is near linear too). Slopes must differ by more than "
        f"{SLOPE_MARGIN} to count as slower growth; this margin was fixed after a first run "
        "showed a memory-slope difference of 0.03, so both readings are given: with a margin of "
        f"0 the time decision would be {t_diff.decide('t', 0.0).outcome} and the memory decision "
        f"{m_diff.decide('m', 0.0).outcome}."
    )
    figures = _figures(ctx, digit_counts, metrics, lengths, secs, mib)
    return Result(
        metrics=metrics, decisions=decisions, seeds=len(seeds), table=table, figures=figures,
        params={"data": rec.source, "steps": steps, "batch": batch, "digit_counts": digit_counts,
                "frames_per_digit": FRAMES_PER_DIGIT, "stretch": [0.8, 1.25],
                "cost_lengths": lengths, "curriculum": True, "encoder_stride": 4, "dim": DIM,
                "heads": HEADS, "seeds": seeds},
        notes=notes,
    )


def _figures(ctx: RunContext, digit_counts, metrics, lengths, secs, mib) -> list[str]:
    plt = ctx.pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    for name in MODEL_NAMES:
        y = np.array([metrics[f"acc_{name}_d{k}"] for k in digit_counts])
        lo = np.array([metrics[f"acc_{name}_d{k}_ci_low"] for k in digit_counts])
        hi = np.array([metrics[f"acc_{name}_d{k}_ci_high"] for k in digit_counts])
        ax.errorbar(digit_counts, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=name)
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(digit_counts, [str(k) for k in digit_counts])
    ax.set_xlabel("spoken digits per utterance")
    ax.set_ylabel("test accuracy (held-out speakers, 95% CI)")
    ax.legend(fontsize=8)
    for name in MODEL_NAMES:
        axes[1].loglog(lengths, [1000 * np.median(r) for r in secs[name]], "o-", label=name)
        axes[2].loglog(lengths, mib[name], "o-", label=name)
    axes[1].set_ylabel("ms per training step (batch 2, median)")
    axes[2].set_ylabel("MiB saved for backward")
    for ax in axes[1:]:
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("audio frames")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    return [ctx.save_figure(fig, "multimodal_accuracy_and_scaling.png")]


EXPERIMENT = Experiment(
    name="multimodal",
    claim=(
        "On unaligned audio (spoken digits at random offsets), cross-attention (text queries "
        "over audio frames) fuses spoken digits and digit text more accurately than early "
        "fusion (self-attention over the concatenation) at equal parameters and training "
        "budget on the longest utterances, and its training cost grows more slowly with audio "
        "length (smaller log-log slopes of time and memory)."
    ),
    run=_run,
    options=(
        Option("--steps", type=positive_int, default=None, help="training steps per model"),
        Option("--seeds", type=positive_int, default=None,
               help="seeds per model (default 3 quick, 5 full; at least 3)"),
        Option("--synthetic", type=nonnegative_int, default=0,
               help="1: use the synthetic stand-in instead of the FSDD MFCCs"),
    ),
    description="text-over-audio cross-attention vs early/late fusion on unaligned spoken "
                "digits (FSDD), accuracy vs length over seeds, cost slopes vs audio length",
)
