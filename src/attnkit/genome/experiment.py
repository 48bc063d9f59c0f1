"""The ``genome`` experiment: the cost of every pattern of the claim in the model, a planted
long-range task with no leaked positions, a real genome (embedded *M. genitalium* G37 by
default, ``--fasta`` for any other) in one pass, and held-out bits per base against the best
validated Markov chain."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from attnkit.argtypes import existing_file
from attnkit.distributed.data_parallel import world_size

from ..experiment import Decision, Experiment, Option, Result, RunContext, stats
from ..experiment.profiling import peak_rss_sweep
from ..experiment.workers import process_pool, stop_pool
from .embedded import EMBEDDED_GENOME_ACCESSION, embedded_genome_path
from .fasta import join_records, read_fasta
from .markov import select_markov
from .model import GenomeEncoder, GenomePattern
from .probe import run_probe
from .synthetic import DistanceCurriculum, LongRangeTask
from .train import bits_per_base, label_accuracy, train_labels, train_mlm

__all__ = ["EXPERIMENT", "GenomeConfig", "run_genome", "fit_slope", "split_genome",
           "ARMS", "COST_KINDS"]

COST_KINDS = ("window", "window_global", "window_exp_global")
#: Arms of the long-range task: (window, exponential, global tokens); None = dense.
ARMS: dict[str, tuple[bool, bool] | None] = {
    "window": (False, False), "window_exp": (True, False), "window_global": (False, True),
    "window_exp_global": (True, True), "dense": None,
}


@dataclass(frozen=True)
class GenomeConfig:
    # 1. cost of the model (GenomeEncoder.embed_genome), every pattern, repeated, 1 thread
    cost_lengths: tuple[int, ...] = (65536, 131072, 262144, 524288, 1048576)
    cost_repeats: int = 5
    cost_mem_repeats: int = 3
    cost_dim: int = 32
    cost_heads: int = 2
    cost_window: int = 64
    cost_hubs: int = 8
    slope_max: float = 1.15
    # 2. long-range task: one model per (arm, seed), trained on a curriculum over the
    # distances (shortest first), scored at every distance; identical size/steps/data per arm
    task_distances: tuple[int, ...] = (32, 100, 1000, 10000, 100000)
    task_margin: int = 32  # length = distance + max(distance, margin)
    task_window: int = 32
    task_hubs: int = 16
    task_dim: int = 16
    task_depth: int = 2
    task_heads: int = 2
    task_steps_per_stage: int = 300
    task_batch: int = 16
    # bases per training batch at most (fewer samples where samples are long): a full batch
    # at the 10^5 distance is 3.2M bases, 1.5-2 min of one-core CPU per step, ~10 h per full run
    task_step_bases: int = 65536
    task_lr: float = 1e-2
    task_eval: int = 64
    dense_max: int = 16384
    task_gain_min: float = 0.1
    task_control_min: float = 0.75  # a trained arm's accuracy where it can reach the answer
    task_workers: int = 2  # processes for the seeds (1 = in this process)
    # 3. real genome: held-out last 10%, validation the 10% before it
    genome_dim: int = 64
    genome_depth: int = 4
    genome_heads: int = 4
    genome_window: int = 128
    genome_hubs: int = 8
    # a cap (one step of 8192 bases is ~0.9 s of one-core CPU): full mode stops earlier when
    # validation stops improving; genome_steps_run says which
    genome_steps: int = 1500
    genome_window_len: int = 8192
    genome_eval_stride: int = 8
    genome_eval_passes: int = 8
    genome_early_stopping: bool = True
    genome_eval_every: int = 100
    genome_patience: int = 5
    genome_valid_len: int = 32768
    markov_orders: tuple[int, ...] = tuple(range(1, 13))
    # 4. whole-genome pass and a training step (fresh processes, one thread)
    train_step_length: int = 65536
    probe_threads: int = 1
    whole_genome_peak_max_gib: float = 8.0

    @classmethod
    def quick(cls) -> GenomeConfig:
        """The report's budget: model cost over 16k-131k bases (fixed costs a few % at the
        smallest), the task at distances 32-300 (40 steps per curriculum stage), a genome
        model of 10 steps without early stopping: said so in the notes."""
        return cls(cost_lengths=(16384, 32768, 65536, 131072), cost_repeats=5,
                   cost_mem_repeats=2, cost_dim=16, task_distances=(32, 100, 300),
                   task_steps_per_stage=40, task_eval=32, genome_dim=32, genome_depth=2,
                   genome_heads=2, genome_window=64, genome_steps=10, genome_window_len=4096,
                   genome_eval_passes=1, genome_early_stopping=False)

    @classmethod
    def tiny(cls) -> GenomeConfig:
        """For tests: every code path, seconds of compute."""
        return cls(cost_lengths=(1024, 2048), cost_repeats=2, cost_mem_repeats=1, cost_dim=8,
                   cost_window=8, cost_hubs=2, task_distances=(16, 40), task_margin=32,
                   task_window=4, task_hubs=2, task_dim=8, task_depth=1,
                   task_steps_per_stage=1, task_batch=2, task_eval=4, task_workers=1,
                   dense_max=512, genome_dim=8, genome_depth=1, genome_heads=2,
                   genome_window=8, genome_hubs=2, genome_steps=4, genome_window_len=1024,
                   genome_eval_stride=64, genome_eval_passes=1, genome_eval_every=2,
                   genome_patience=1, genome_valid_len=2048, markov_orders=(1, 2, 3),
                   train_step_length=2048)


def fit_slope(lengths: list[float], values: list[float]) -> float:
    """Least-squares slope of ``log(values)`` against ``log(lengths)``."""
    return stats.loglog_slope(lengths, values)


def split_genome(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train, valid, held)``: the first 80%, the next 10% (choosing Markov orders) and the
    last 10% of the chromosome (held out; scored once). Disjoint, in order, covering it."""
    n = tokens.numel()
    held_len, valid_len = n // 10, n // 10
    a, b = n - held_len - valid_len, n - held_len
    return tokens[:a], tokens[a:b], tokens[b:]


# ------------------------------------------------------------------------------------ parts


def _cost_model(kind: str, cfg: GenomeConfig) -> GenomeEncoder:
    """The one-block model of cost pattern ``kind`` (same weights for every kind)."""
    torch.manual_seed(0)
    pat = GenomePattern(cfg.cost_window, exponential=kind == "window_exp_global",
                        hubs=0 if kind == "window" else cfg.cost_hubs)
    return GenomeEncoder(cfg.cost_dim, 1, cfg.cost_heads, pat).eval()


def _cost_tokens(n: int) -> torch.Tensor:
    return torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n))


def cost_memory_setup(kind: str, n: int, cfg: GenomeConfig) -> tuple:
    """Model and tokens of one memory measurement (built before the peak is taken)."""
    return _cost_model(kind, cfg), _cost_tokens(n)


def cost_memory_call(model: GenomeEncoder, tokens: torch.Tensor) -> None:
    """One whole-sequence forward on one thread (module-level: it runs in a child process)."""
    with stats.single_thread():
        model.embed_genome(tokens)


def _cost_part(ctx: RunContext, cfg: GenomeConfig) -> tuple[dict, list[dict], list[Decision]]:
    """CPU seconds of one whole-sequence streaming forward (``embed_genome``, one block, one
    thread) per pattern and length, repeats interleaved across patterns, and the peak memory
    it adds (a child process, repeated); log-log slopes with intervals."""
    models = {kind: _cost_model(kind, cfg) for kind in COST_KINDS}
    tokens = {n: _cost_tokens(n) for n in cfg.cost_lengths}
    cases = {(k, n): (lambda m=m, t=tokens[n]: m.embed_genome(t))
             for n in cfg.cost_lengths for k, m in models.items()}
    got: dict[tuple[str, int], list[float]] = {key: [] for key in cases}
    rows = []
    with stats.single_thread():
        for r in ctx.progress(range(cfg.cost_repeats), desc="genome cost rounds",
                              total=cfg.cost_repeats):
            # Each round times every pattern at every length, so a load that changes during
            # the sweep hits all lengths alike instead of tilting the slope (lengths timed one
            # after another, smallest first, read a rising load as a steeper slope), and keeps
            # each case's faster of two interleaved calls (alternating lengths refault fresh
            # buffers: single calls gave intervals up to 0.4 wide). CPU time of one thread:
            # what the call costs, whatever else runs on the machine (wall time of a 2-thread
            # call on a loaded machine gave the old slope of 1.75).
            one = stats.interleaved_min_times(cases, repeat=1, calls=2,
                                              warmup=1 if r == 0 else 0,
                                              clock=time.process_time)
            for key, ts in one.items():
                got[key].extend(ts)
    times = {k: [got[(k, n)] for n in cfg.cost_lengths] for k in COST_KINDS}
    del models, cases, tokens
    jobs = [(k, n) for n in cfg.cost_lengths for k in COST_KINDS]  # small sizes first
    ctx.log(f"genome: peak memory of {len(jobs)} x {cfg.cost_mem_repeats} model forwards "
            "in a child process ...")
    # a dropped warm-up call per pattern: first-call allocations are not the pattern's cost
    warm = [(k, cfg.cost_lengths[0], cfg) for k in COST_KINDS]
    peaks = peak_rss_sweep(cost_memory_call,
                           warm + [(k, n, cfg) for k, n in jobs] * cfg.cost_mem_repeats,
                           setup=cost_memory_setup)[len(warm):]
    mem: dict[str, dict[int, list[float]]] = {k: {} for k in COST_KINDS}
    for (k, n), peak in zip(jobs * cfg.cost_mem_repeats, peaks):
        mem[k].setdefault(n, []).append(peak / 2**30)
    metrics, decisions = {}, []
    span = f"{cfg.cost_lengths[0]}-{cfg.cost_lengths[-1]} bases"
    for k in COST_KINDS:
        for n, ts in zip(cfg.cost_lengths, times[k]):
            rows.append({"part": "cost", "pattern": k, "length": n,
                         "cpu_seconds_median": round(stats.median(ts), 4),
                         "peak_gib_median": round(stats.median(mem[k][n]), 4),
                         "repeats": len(ts), "memory_repeats": len(mem[k][n])})
        ci = stats.slope_ci(cfg.cost_lengths, times[k])
        metrics.update(ci.metrics(f"slope_{k}"))
        metrics[f"seconds_{k}_at_max"] = stats.median(times[k][-1])
        decisions.append(ci.decide(f"slope_{k}", cfg.slope_max, "<",
                                   note=f"model CPU-time slope over {span}"))
        mci = stats.slope_ci(cfg.cost_lengths, [mem[k][n] for n in cfg.cost_lengths])
        metrics.update(mci.metrics(f"mem_slope_{k}"))
        metrics[f"peak_gib_{k}_at_max"] = stats.median(mem[k][cfg.cost_lengths[-1]])
        decisions.append(mci.decide(f"mem_slope_{k}", cfg.slope_max, "<",
                                    note=f"model peak-memory slope over {span}"))
    metrics["cost_max_length"] = cfg.cost_lengths[-1]
    return metrics, rows, decisions


def _task_model(cfg: GenomeConfig, arm: str) -> GenomeEncoder:
    spec = ARMS[arm]
    pattern = None if spec is None else GenomePattern(
        cfg.task_window, exponential=spec[0], hubs=cfg.task_hubs if spec[1] else 0)
    return GenomeEncoder(cfg.task_dim, cfg.task_depth, cfg.task_heads, pattern, num_labels=2)


def task_length(cfg: GenomeConfig, distance: int) -> int:
    """Bases per sample at ``distance``: the planted pair's start is uniform over
    ``max(distance, margin)`` positions."""
    return distance + max(distance, cfg.task_margin)


def task_job(cfg: GenomeConfig, seed: int, arm: str) -> dict[str, float]:
    """Accuracy of ``arm`` at every distance it can hold for one seed (module-level: it runs
    in a worker process). Every arm trains one model on the same curriculum (the distances it
    can hold, shortest first; dense only up to ``dense_max`` bases), from the same
    initialization seed and the same batches, and is scored on the same held-out samples."""
    ds = [d for d in cfg.task_distances
          if arm != "dense" or task_length(cfg, d) <= cfg.dense_max]
    if not ds:
        return {}
    tasks = [LongRangeTask(d, task_length(cfg, d), seed=seed) for d in ds]
    out = {}
    with stats.single_thread():
        curriculum = DistanceCurriculum(tasks, cfg.task_steps_per_stage,
                                        max_bases=cfg.task_step_bases)
        torch.manual_seed(seed)  # identical initialization, data and steps for each arm
        model = _task_model(cfg, arm)
        train_labels(model, curriculum.sample, steps=curriculum.total_steps,
                     batch_size=cfg.task_batch, lr=cfg.task_lr, seed=seed)
        for d, task in zip(ds, tasks):
            ev = task.sample(cfg.task_eval, torch.Generator().manual_seed(10_000 + seed))
            out[f"hub_task_acc_{arm}_at_{d}"] = label_accuracy(model, *ev)
    return out


class _TaskRuns:
    """The task's (seed, arm) jobs, started early in ``task_workers`` worker processes (one
    thread each) so they use the cores the single-threaded genome part leaves idle (the cost
    part runs before, alone); in this process when there is one worker or under torchrun."""

    def __init__(self, cfg: GenomeConfig, seeds: list[int]):
        self.cfg, self.seeds, self.pool, self.futures = cfg, seeds, None, {}
        if cfg.task_workers > 1 and world_size() == 1:
            self.pool = process_pool(cfg.task_workers)  # workers die with this process
            for arm in ARMS:
                for seed in seeds:
                    self.futures[seed, arm] = self.pool.submit(task_job, cfg, seed, arm)

    def results(self, ctx: RunContext) -> list[dict[str, float]]:
        """Per seed, ``{metric: accuracy}`` over every arm."""
        per_seed: dict[int, dict[str, float]] = {s: {} for s in self.seeds}
        if self.pool is None:
            for seed in ctx.progress(self.seeds, desc="long-range task seeds",
                                     total=len(self.seeds)):
                for arm in ARMS:
                    per_seed[seed].update(task_job(self.cfg, seed, arm))
        else:
            from concurrent.futures import as_completed

            done = {f: key for key, f in self.futures.items()}
            for f in ctx.progress(as_completed(done), desc="long-range task (seed, arm)",
                                  total=len(done)):
                per_seed[done[f][0]].update(f.result())
            self.pool.shutdown(wait=True)
            self.pool = None
        # keys in a fixed order (arm, then distance), whatever order the jobs finished in
        order = [f"hub_task_acc_{a}_at_{d}" for a in ARMS for d in self.cfg.task_distances]
        return [{k: per_seed[s][k] for k in order if k in per_seed[s]} for s in self.seeds]

    def close(self) -> None:
        """Release the workers: after :meth:`results` they are idle; before (the run was
        interrupted), the jobs still running are stopped, not waited for."""
        if self.pool is not None:
            stop_pool(self.pool)
            self.pool = None


def _task_part(ctx: RunContext, cfg: GenomeConfig, seeds: list[int], runs: _TaskRuns
               ) -> tuple[dict, list[dict], list[Decision], dict]:
    acc = stats.stack_metrics(runs.results(ctx))
    metrics, rows = {}, []
    for name, vals in acc.items():
        metrics.update(stats.mean_ci(vals).metrics(name))
    for d in cfg.task_distances:
        for arm in ARMS:
            key = f"hub_task_acc_{arm}_at_{d}"
            if key in acc:
                ci = stats.mean_ci(acc[key])
                rows.append({"part": "long-range task", "arm": arm, "distance": d,
                             "accuracy": round(ci.value, 4), "ci_low": round(ci.low, 4),
                             "ci_high": round(ci.high, 4), "seeds": len(seeds)})
    near, far = cfg.task_distances[0], cfg.task_distances[-1]
    local, glob = acc[f"hub_task_acc_window_at_{far}"], acc[f"hub_task_acc_window_global_at_{far}"]
    metrics.update(stats.mean_ci(local).metrics("hub_task_acc_local"))
    metrics.update(stats.mean_ci(glob).metrics("hub_task_acc_global"))
    metrics["hub_task_chance"] = 0.5
    metrics["hub_task_longest_distance"] = far
    # Positive controls: each compared arm learns the task where its window reaches the
    # answer (the shortest distance), and dense attention learns it at the longest distance it
    # fits. Without them a failing arm could just be an untrained one.
    dense_far = max((d for d in cfg.task_distances if f"hub_task_acc_dense_at_{d}" in acc),
                    default=None)
    controls = [(f"hub_task_acc_{arm}_at_{near}", acc[f"hub_task_acc_{arm}_at_{near}"])
                for arm in ("window", "window_global", "window_exp_global")]
    if dense_far is not None:
        controls.append((f"hub_task_acc_dense_at_{dense_far}",
                         acc[f"hub_task_acc_dense_at_{dense_far}"]))
    failed = []
    for name, vals in controls:
        ci = stats.mean_ci(vals)
        if not ci.low > cfg.task_control_min:
            failed.append(f"{name} = {ci}")
    metrics["hub_task_controls_passed"] = float(not failed)
    decisions = []
    for arm in ("window_global", "window_exp_global"):
        gain = stats.paired_diff_ci(acc[f"hub_task_acc_{arm}_at_{far}"], local)
        metrics.update(gain.metrics(f"hub_task_gain_{arm}"))
        note = f"accuracy of {arm} minus window only at distance {far}, paired by seed"
        if failed:  # an untrained comparison decides nothing
            gain = stats.CI(gain.value, math.nan, math.nan, gain.n)
            note += ("; INCONCLUSIVE: positive control(s) below "
                     f"{cfg.task_control_min}: {'; '.join(failed)}")
        decisions.append(gain.decide(f"hub_task_gain_{arm}", cfg.task_gain_min, ">", note=note))
    return metrics, rows, decisions, acc


def _genome_tokens(path: Path, window: int) -> tuple[torch.Tensor, int]:
    records = read_fasta(path, min_length=window + 1)
    return join_records(records, max(window, 1)), len(records)


def _genome_part(ctx: RunContext, cfg: GenomeConfig, path: Path, seeds: list[int]
                 ) -> tuple[dict, list[dict], list[Decision], Decision]:
    tokens, num_records = _genome_tokens(path, cfg.genome_window)
    train, valid, held = split_genome(tokens)
    ctx.log(f"genome: {tokens.numel()} bases in {num_records} record(s); train "
            f"{train.numel()}, validation {valid.numel()}, held-out (last 10%) {held.numel()}")
    best, markov_rows = select_markov(train, valid, held, orders=cfg.markov_orders)
    pattern_cfg = {"window": cfg.genome_window, "exponential": True, "hubs": cfg.genome_hubs}
    window_len = min(cfg.genome_window_len, train.numel())

    valid_slice = valid[: cfg.genome_valid_len]

    def one_seed(seed: int) -> dict[str, float]:
        model = GenomeEncoder(cfg.genome_dim, cfg.genome_depth, cfg.genome_heads,
                              GenomePattern(**pattern_cfg))
        history: list[tuple[int, float]] = []
        # one window per step per rank (under torchrun the batch is split over the ranks);
        # full mode: early stopping on the validation slice, genome_steps is only a cap.
        # One thread in quick mode or beside the task's workers: several threads on a loaded
        # machine (the report's) burn CPU waiting at barriers, and the workers use the cores.
        one = ctx.quick or (cfg.task_workers > 1 and world_size() == 1)
        with stats.single_thread() if one else contextlib.nullcontext():
            losses = train_mlm(
                model, train, steps=cfg.genome_steps, window_len=window_len,
                batch_size=world_size(), seed=seed,
                progress=None if ctx.quick else ctx.progress,
                valid=valid_slice if cfg.genome_early_stopping else None,
                eval_every=cfg.genome_eval_every, patience=cfg.genome_patience,
                valid_stride=cfg.genome_eval_stride, history=history)
            bpb = bits_per_base(model, held, stride=cfg.genome_eval_stride,
                                passes=cfg.genome_eval_passes)
        if seed == seeds[0]:
            one_seed.state = {k: v.clone() for k, v in model.state_dict().items()}
            one_seed.config = dict(model.config, pattern=pattern_cfg)
        best_step = min(history, key=lambda h: h[1])[0] if history else len(losses)
        return {"bits_per_base_model": bpb,
                "mlm_final_loss_bits": float(np.mean(losses[-5:])) / math.log(2),
                "genome_steps_run": float(len(losses)), "genome_best_step": float(best_step)}

    per_seed = stats.stack_metrics(stats.over_seeds(one_seed, seeds, progress=ctx.progress,
                                                    desc="genome model seeds"))
    bpb = stats.mean_ci(per_seed["bits_per_base_model"])
    with tempfile.TemporaryDirectory() as tmp:  # the weights feed the fresh process only
        ckpt = Path(tmp) / "genome_mlm.pt"
        torch.save(one_seed.state, ckpt)
        fwd = run_probe(["forward", "--fasta", str(path), "--config",
                         json.dumps(one_seed.config), "--state", str(ckpt),
                         "--threads", str(cfg.probe_threads)])[0]
    step = run_probe(["train-step", "--length", str(cfg.train_step_length),
                      "--config", json.dumps(one_seed.config),
                      "--threads", str(cfg.probe_threads)])[0]
    metrics = {
        **bpb.metrics("bits_per_base_model"),
        "bits_per_base_markov_best": best["masked_bits_per_base"],
        "markov_best_order": best["order"],
        "bits_per_base_markov_best_causal": best["bits_per_base"],
        "whole_genome_forward_s": fwd["seconds"],
        "whole_genome_forward_cpu_s": fwd["cpu_seconds"],
        "train_step_cpu_s": step["cpu_seconds"],
        "genome_steps_run": float(np.mean(per_seed["genome_steps_run"])),
        "genome_best_step": float(np.mean(per_seed["genome_best_step"])),
        "whole_genome_peak_gib": fwd["peak_gib"],
        "whole_genome_length": fwd["length"],
        "train_step_s": step["seconds"], "train_step_peak_gib": step["peak_gib"],
        "train_step_length": cfg.train_step_length,
        "mlm_final_loss_bits": float(np.mean(per_seed["mlm_final_loss_bits"])),
    }
    gain = stats.mean_ci(best["masked_bits_per_base"] - per_seed["bits_per_base_model"])
    metrics.update(gain.metrics("bits_per_base_gain_vs_markov"))
    markov_decision = gain.decide("bits_per_base_gain_vs_markov", 0.0, ">",
                                  note="held-out bits/base: best validated Markov minus model")
    rows = [{"part": "markov", "order": r["order"],
             "valid_masked_bits_per_base": round(r["valid_masked_bits_per_base"], 4)}
            for r in markov_rows]
    rows.append({"part": "encoder", "bits_per_base_model": round(bpb.value, 4),
                 "ci": [round(bpb.low, 4), round(bpb.high, 4)],
                 "markov_best": round(best["masked_bits_per_base"], 4),
                 "markov_order": best["order"], "train_steps": cfg.genome_steps,
                 "window_len": window_len})
    rows.append({"part": "whole genome", "length": fwd["length"],
                 "forward_s": round(fwd["seconds"], 2), "peak_gib": round(fwd["peak_gib"], 3),
                 "train_step_length": cfg.train_step_length,
                 "train_step_s": round(step["seconds"], 2),
                 "train_step_peak_gib": round(step["peak_gib"], 3)})
    peak = stats.CI(fwd["peak_gib"], fwd["peak_gib"], fwd["peak_gib"], 1)
    decisions = [peak.decide("whole_genome_peak_gib", cfg.whole_genome_peak_max_gib, "<",
                             note="one streaming forward of the whole genome, fresh process "
                                  "(a single deterministic measurement: no interval)")]
    return metrics, rows, decisions, markov_decision


def _figures(ctx: RunContext, cfg: GenomeConfig, acc: dict[str, np.ndarray]) -> list[str]:
    plt = ctx.pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm in ARMS:
        ds = [d for d in cfg.task_distances if f"hub_task_acc_{arm}_at_{d}" in acc]
        if not ds:
            continue
        cis = [stats.mean_ci(acc[f"hub_task_acc_{arm}_at_{d}"]) for d in ds]
        ax.errorbar(ds, [c.value for c in cis],
                    yerr=[[c.value - c.low for c in cis], [c.high - c.value for c in cis]],
                    marker="o", capsize=3, label=arm.replace("_", " + ").replace(
                        "exp", "exponential"))
    ax.axhline(0.5, color="grey", ls=":", label="chance")
    ax.set(xscale="log", xlabel="distance from source motif to labelled target (bases)",
           ylabel="target accuracy (mean, 95% CI over seeds)",
           title="planted long-range task", ylim=(0.3, 1.02))
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return [ctx.save_figure(fig, "genome_long_range.png")]


def _cpu_now() -> float:
    """CPU seconds of this process and its finished children (probes, worker processes)."""
    t = os.times()
    return t[0] + t[1] + t[2] + t[3]


def run_genome(ctx: RunContext, cfg: GenomeConfig) -> Result:
    """All four parts with ``cfg``; the genome is ``ctx.options['fasta']`` or the embedded one."""
    fasta = ctx.options.get("fasta")
    path = Path(fasta) if fasta else embedded_genome_path()
    seeds = ctx.seed_list(quick=3, full=3)
    if fasta:  # a bad --fasta fails in seconds, before any worker starts
        _genome_tokens(path, cfg.genome_window)
    metrics, table, decisions = {}, [], []
    # The cost part first, alone: its timings decide the slopes, and task workers running
    # beside it share the caches and the memory bus (quick runs with them alongside gave
    # slope intervals up to 0.4 wide on an idle machine).
    cpu0 = _cpu_now()
    c_metrics, c_rows, c_decisions = _cost_part(ctx, cfg)
    cpu1 = _cpu_now()
    runs = _TaskRuns(cfg, seeds)  # the task's workers start now, beside the genome part
    try:
        g_metrics, g_rows, g_decisions, markov_decision = _genome_part(ctx, cfg, path, seeds)
        cpu2 = _cpu_now()
        t_metrics, t_rows, t_decisions, acc = _task_part(ctx, cfg, seeds, runs)
        cpu3 = _cpu_now()
    finally:
        runs.close()
    for m, rows, ds in ((c_metrics, c_rows, c_decisions), (t_metrics, t_rows, t_decisions),
                        (g_metrics, g_rows, g_decisions)):
        metrics.update(m)
        table += rows
        decisions += ds
    # with task workers the task's CPU is counted when its workers end (cpu_seconds_task)
    metrics.update({"cpu_seconds": cpu3 - cpu0, "cpu_seconds_cost": cpu1 - cpu0,
                    "cpu_seconds_genome": cpu2 - cpu1, "cpu_seconds_task": cpu3 - cpu2})
    source = (f"--fasta {fasta}" if fasta else
              f"the embedded M. genitalium G37 genome (RefSeq {EMBEDDED_GENOME_ACCESSION})")
    stages = " -> ".join(str(d) for d in cfg.task_distances)
    mode = ("QUICK mode: the report's budget, not the claim's regime: model cost over "
            f"{cfg.cost_lengths[0]}-{cfg.cost_lengths[-1]} bases (the smallest forward takes "
            "tens of ms against a per-call overhead of about a millisecond, so fixed costs are "
            f"a few % there), long-range task at distances {cfg.task_distances} (the longest "
            "is a smoke-level 'long': beyond the window arm's reach, far below 10^5), genome "
            f"model {cfg.genome_steps} steps without early stopping (far from converged: the "
            "bits/base comparison is a budget result). Full mode: 64k-1M bases, distances "
            "32-10^5, early stopping on validation. " if ctx.quick else "")
    notes = (
        mode + "Genome: " + source + "; held-out region = the last 10% of the chromosome, "
        "validation = the 10% before it, training = the first 80%. Markov orders "
        f"{cfg.markov_orders[0]}..{cfg.markov_orders[-1]} are fit on training and chosen by "
        "masked bits/base on validation; the chosen order (refit on training + validation) is "
        "scored once on the held-out region. The encoder's bits/base are masked-base code "
        f"lengths on the held-out region (stride {cfg.genome_eval_stride}, "
        f"{cfg.genome_eval_passes} pass(es)), mean and 95% CI over {len(seeds)} seeds"
        + (f"; trained with early stopping: validation bits/base on the first "
           f"{cfg.genome_valid_len} validation bases every {cfg.genome_eval_every} steps, "
           f"stop after {cfg.genome_patience} evaluations without improvement, cap "
           f"{cfg.genome_steps} steps, best weights kept" if cfg.genome_early_stopping else
           f"; {cfg.genome_steps} steps, no early stopping") + ". "
        f"Held-out modelling vs Markov (its own decision, not part of the verdict): "
        f"{markov_decision.explanation()}. "
        "Cost: GenomeEncoder.embed_genome (one block, dim "
        f"{cfg.cost_dim}, {cfg.cost_heads} heads, window {cfg.cost_window}, {cfg.cost_hubs} "
        f"global tokens), CPU time of one thread, {cfg.cost_repeats} interleaved repeats per "
        f"length; peak memory the forward adds, in a child process, {cfg.cost_mem_repeats} "
        "repeats per length; slope CIs by resampling repeats (stats.slope_ci). The old "
        "window+exponential+global slope of 1.75 was a measurement artefact: one wall-clock "
        "call per length with torch's default two threads on a loaded machine (the same "
        "engine call costs 0.17 s -> 0.77 s of one-thread CPU from 65k to 262k bases, slope "
        "1.07, while two threads under load took 11-25 s per call and burnt 4-19x the CPU "
        "waiting). The streaming forward runs its position-wise parts (stem, norms, "
        "projections, rotary tables, MLP) in chunks of ~1 MiB of MLP activations "
        "(GenomeEncoder.stream_chunk): with 65536-position chunks and whole-length rotary "
        "tables, the per-base CPU of those parts alone grew ~20% from 64k to 1M bases "
        "(page faults and cache misses of their temporaries). What per-base growth remains "
        "over 64k-1M is memory, not arithmetic: first-touch page faults of the whole-length "
        "buffers (x, q, k, v, attention output; system time at 1M, none at 64k, where the "
        "allocator recycles buffers under 32 MiB) and the engine reading q, k, v from DRAM "
        "instead of cache. "
        "Long-range task: one planted (marker + class motif, query motif) pair per sample at "
        "a uniformly random position, the query exactly d bases downstream, length "
        f"d + max(d, {cfg.task_margin}); global tokens evenly spaced (BigBird-style marked), "
        "never placed from the answer. One model per arm and seed, trained on a curriculum "
        f"over the distances ({stages}; {cfg.task_steps_per_stage} steps per stage, each "
        "stage drawing batches from it and every shorter distance; batches of "
        f"{cfg.task_batch} samples, at most {cfg.task_step_bases} bases, so fewer (at least "
        "one) at the longest distances), identical for every arm "
        "(same initialization, batches and steps); scored at every distance on held-out "
        f"samples; dense only up to {cfg.dense_max} bases. Positive controls: every compared "
        f"arm at distance {cfg.task_distances[0]} (inside the window) and dense at the "
        f"longest distance it fits must exceed {cfg.task_control_min} (CI low), else the "
        "gain decisions are inconclusive. Whole genome: one streaming forward of the first "
        f"seed's model in a fresh process ({cfg.probe_threads} thread(s); peak = the "
        f"process's VmHWM), and one training step at {cfg.train_step_length} bases in "
        "another. cpu_seconds = CPU of this process and its children (per part: _genome, "
        "_cost, _task)."
    )
    return Result(metrics=metrics, decisions=decisions, seeds=len(seeds), table=table,
                  figures=_figures(ctx, cfg, acc),
                  params={"config": asdict(cfg), "fasta": fasta or str(path)}, notes=notes)


def _run(ctx: RunContext) -> Result:
    cfg = GenomeConfig.quick() if ctx.quick else GenomeConfig()
    return run_genome(ctx, cfg)


EXPERIMENT = Experiment(
    name="genome",
    claim=(
        "Window + exponential + global attention over single bases costs near-linear time and "
        "memory in the model for every pattern (slope CI upper bounds <= 1.15), its global "
        "tokens (placed without knowing the answer) solve a planted long-range task that "
        "window attention cannot (accuracy gain > 0.1 at the longest distance), and a whole "
        "microbial genome goes through in one pass under 8 GiB on CPU."
    ),
    run=_run,
    options=(Option("--fasta", type=existing_file,
                    help="FASTA file (plain or gzip) of a genome to model instead of the "
                         "embedded M. genitalium genome"),),
    description="Whole genomes with sparse attention.",
)
