"""Benchmark: sequence-parallel sparse attention on 2 and 4 CPU processes (gloo over loopback).

For each number of processes P and each pattern it prints JSON lines:

- ``case: "exact"``: max |error| of the output and of the q/k/v gradients against the
  single-process ``attnkit.attention`` (fp32, target 1e-5), and the bytes each rank sent,
  counted while sending (:func:`attnkit.distributed.comm_stats`), next to the analytic model
  (:func:`attnkit.distributed.communication_volume`): halo bytes (point-to-point) and global-token
  bytes (all_reduce payloads), forward and forward + backward.
- ``case: "memory"``: peak resident memory per rank (``VmHWM`` from ``/proc/self/status``,
  reset just before the work with ``/proc/self/clear_refs``, in fresh spawned processes, with a
  fixed glibc mmap threshold so peaks do not depend on allocation order) of one
  attention layer's forward + backward at total length L, next to a single process at the same
  L; ``ratio`` = per-rank peak / single-process peak (ideal: 1/P), and one process at the
  shard's length L/P (``overhead_vs_shard_length``: what sharding costs beyond a perfect split).
- ``case: "memory"`` with ``workload: "genome"``: the same for a 2-layer GenomeEncoder
  (window + exponential + hubs) forward + backward, ``sequence_parallel=True``.

    .venv/bin/python benchmarks/bench_distributed.py [--quick] [--worlds 2 4]

Timings are not the point here (the machine has 2 cores, so 4 processes share them); seconds are
printed for orientation only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit
from attnkit import patterns as P
from attnkit.distributed import (
    comm_stats,
    communication_volume,
    gather_sequence,
    reset_comm_stats,
    sequence_parallel_attention,
    shard_bounds,
    shard_sequence,
)

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def patterns(length: int, window: int) -> dict[str, attnkit.patterns.Pattern]:
    hubs = [int((i + 0.5) * length / 8) for i in range(8)]
    return {
        "sliding_window": P.sliding_window(window),
        "sliding_window|global_tokens": P.sliding_window(window) | P.global_tokens(hubs),
        "exponential": P.exponential(),
        "window|exponential|global (genome)": (P.sliding_window(window) | P.exponential()
                                               | P.global_tokens(hubs)),
    }


# ------------------------------------------------------------------------------ helpers


def _kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {STATUS}")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS; return the current RSS in bytes."""
    gc.collect()
    CLEAR_REFS.write_text("5")
    return _kib("VmRSS") * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))


def _spawn(fn, world: int, *args) -> list[dict]:
    """Run ``fn(rank, world, port, out_dir, *args)`` in ``world`` fresh processes."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(fn, args=(world, _free_port(), tmp, *args), nprocs=world,
                           start_method="spawn", join=True)
        return [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]


# ------------------------------------------------------------------------------ exactness


def _exact_worker(rank, world, port, out_dir, length, window, heads, dim):
    _init(rank, world, port)
    rows = {}
    for name, pat in patterns(length, window).items():
        g = torch.Generator().manual_seed(0)
        q, k, v, w = (torch.randn(1, heads, length, dim, generator=g) for _ in range(4))
        loc = [shard_sequence(t, world, rank).clone().requires_grad_() for t in (q, k, v)]
        reset_comm_stats()
        t0 = time.perf_counter()
        out = sequence_parallel_attention(*loc, pat)
        t_fwd = time.perf_counter() - t0
        fwd = comm_stats()
        (out * shard_sequence(w, world, rank)).sum().backward()
        both = comm_stats()
        got = [gather_sequence(t) for t in (out, loc[0].grad, loc[1].grad, loc[2].grad)]
        row = {"p2p_fwd": fwd.p2p_bytes, "coll_fwd": fwd.collective_bytes,
               "p2p_fwd_bwd": both.p2p_bytes, "coll_fwd_bwd": both.collective_bytes,
               "seconds_fwd": t_fwd}
        if rank == 0:
            ref = [t.clone().requires_grad_() for t in (q, k, v)]
            o = attnkit.attention(*ref, pattern=pat)
            (o * w).sum().backward()
            want = [o.detach()] + [t.grad for t in ref]
            row["err_out"] = float((got[0] - want[0]).abs().max())
            row["err_grad"] = max(float((a - b).abs().max()) for a, b in zip(got[1:], want[1:]))
            row["rel_err"] = max(float((a - b).abs().max() / b.abs().max())
                                 for a, b in zip(got, want))
        rows[name] = row
    Path(out_dir, f"{rank}.json").write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def bench_exact(world: int, length: int, window: int, heads: int, dim: int) -> None:
    res = _spawn(_exact_worker, world, length, window, heads, dim)
    for name, pat in patterns(length, window).items():
        model = communication_volume(pat, length, world, q_heads=heads, head_dim=dim)
        model_bwd = communication_volume(pat, length, world, q_heads=heads, head_dim=dim,
                                         backward=True)
        r0 = res[0][name]
        print(json.dumps({
            "bench": "distributed", "case": "exact", "world": world, "pattern": name,
            "length": length, "shape": [1, heads, length, dim], "dtype": "float32",
            "max_err_out": r0["err_out"], "max_err_grad": r0["err_grad"],
            "max_rel_err": r0["rel_err"], "exact_1e-5": r0["rel_err"] < 1e-5,
            "halo_bytes_fwd_per_rank": [r[name]["p2p_fwd"] for r in res],
            "analytic_halo_bytes_fwd_per_rank": [m["halo_bytes"] for m in model],
            "global_bytes_fwd_per_rank": [r[name]["coll_fwd"] for r in res],
            "analytic_global_bytes_fwd_per_rank": [m["global_bytes"] for m in model],
            "bytes_fwd_bwd_per_rank": [r[name]["p2p_fwd_bwd"] + r[name]["coll_fwd_bwd"]
                                       for r in res],
            "analytic_bytes_fwd_bwd_per_rank": [m["total_bytes"] for m in model_bwd],
            "shard_kv_bytes": max(m["shard"] for m in model) * heads * 2 * dim * 4,
            "seconds_fwd_rank0": r0["seconds_fwd"],
        }), flush=True)


# ------------------------------------------------------------------------------ memory


def _memory_worker(rank, world, port, out_dir, workload, length, window, name, heads, dim):
    """One measured forward + backward; ``world == 1`` is the single-process engine / model."""
    _init(rank, world, port)
    torch.manual_seed(rank)
    s, e = shard_bounds(length, world, rank)
    if workload == "attention":
        pat = patterns(length, window)[name]
        base = _reset_peak()
        t0 = time.perf_counter()
        q, k, v = (torch.randn(1, heads, e - s, dim, requires_grad=True) for _ in range(3))
        if world == 1:
            out = attnkit.attention(q, k, v, pattern=pat)
        else:
            out = sequence_parallel_attention(q, k, v, pat)
        out.backward(torch.randn_like(out))
    else:
        from attnkit.genome import GenomeEncoder, GenomePattern

        model = GenomeEncoder(64, 2, 4, GenomePattern(window=window, exponential=True, hubs=8))
        tokens = torch.randint(0, 4, (1, length), generator=torch.Generator().manual_seed(0))
        base = _reset_peak()
        t0 = time.perf_counter()
        if world == 1:
            h = model(tokens)
        else:
            h = model(tokens[:, s:e], sequence_parallel=True)
        h.backward(torch.randn_like(h))
    seconds = time.perf_counter() - t0
    peak = _kib("VmHWM") * 1024
    Path(out_dir, f"{rank}.json").write_text(json.dumps(
        {"added": peak - base, "vmhwm": peak, "seconds": seconds}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def bench_memory(worlds, workload, length, window, names, heads, dim) -> None:
    for name in names:
        single = _spawn(_memory_worker, 1, workload, length, window, name, heads, dim)[0]
        for world in worlds:
            res = _spawn(_memory_worker, world, workload, length, window, name, heads, dim)
            shard = shard_bounds(length, world, 0)[1]
            # a perfect split: one process at the shard's length (same pattern family)
            ideal = _spawn(_memory_worker, 1, workload, shard, window, name, heads, dim)[0]
            per_rank = [r["added"] for r in res]
            print(json.dumps({
                "bench": "distributed", "case": "memory", "workload": workload,
                "world": world, "pattern": name, "length": length,
                "peak_added_mib_per_rank": [round(b / 2**20, 1) for b in per_rank],
                "single_process_peak_added_mib": round(single["added"] / 2**20, 1),
                "ratio": max(per_rank) / single["added"], "ideal_ratio": 1 / world,
                "single_process_at_shard_length_mib": round(ideal["added"] / 2**20, 1),
                "overhead_vs_shard_length": max(per_rank) / ideal["added"],
                "vmhwm_mib_per_rank": [round(r["vmhwm"] / 2**20, 1) for r in res],
                "single_process_vmhwm_mib": round(single["vmhwm"] / 2**20, 1),
                "seconds_per_rank": [round(r["seconds"], 2) for r in res],
                "single_process_seconds": round(single["seconds"], 2),
            }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter sequences")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--skip-genome", action="store_true")
    args = ap.parse_args()
    if not CLEAR_REFS.exists():
        sys.exit("needs Linux /proc/self/clear_refs to measure per-call peak memory")
    # glibc raises its mmap threshold after large frees, so freed blocks stay in the heap and
    # VmHWM then depends on allocation order (it differed by ~400 MiB between identical ranks).
    # A fixed threshold (inherited by every spawned process, single or sharded) makes peaks
    # reproducible.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    exact_len = 4099  # uneven over 2 and 4 ranks
    mem_len = 1 << 14 if args.quick else 1 << 15
    genome_len = 1 << 14 if args.quick else 1 << 16
    for world in args.worlds:
        bench_exact(world, exact_len, window=64, heads=4, dim=32)
    names = list(patterns(mem_len, 128))[1:]
    if args.quick:
        names = names[:1]
    bench_memory(args.worlds, "attention", mem_len, 128, names, heads=8, dim=64)
    if not args.quick:
        # long enough that the engine's fixed chunk workspace (~150 MiB) no longer dominates
        bench_memory(args.worlds, "attention", 1 << 17, 128, names[:1], heads=8, dim=64)
    if not args.skip_genome:
        bench_memory(args.worlds, "genome", genome_len, 128, ["window|exponential|8 hubs"],
                     heads=4, dim=16)


if __name__ == "__main__":
    main()
