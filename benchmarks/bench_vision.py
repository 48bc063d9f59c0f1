"""Axial attention forward+backward: attnkit vs lucidrains ``axial_attention`` (same run).

    .venv/bin/python benchmarks/bench_vision.py [--quick] [--threads N] [--repeat R]

Prints one JSON object per case: our time and peak memory, the peer's, and the ratios. Peak
memory is the rise of peak RSS during one forward+backward in a fresh subprocess per case
(``attnkit.profiling.peak_rss_subprocess``). Time is the median wall time in this process, with
the implementations *interleaved* (ours, peer channels-first, peer channels-last, ours, ...), so
load from other processes on a shared machine hits every side alike and the ratios stay
meaningful even when the absolute times do not.
The peer is ``axial_attention.AxialAttention(dim=64, heads=4, num_dimensions=3)`` (default
``sum_axial_out=True``: the three axes run in parallel on the input and are summed; ours runs
them in sequence; the work per axis is the same). Its default layout is channels-last
(``dim_index=-1``); the channels-first ``(1, 64, 32, 32, 32)`` layout needs ``dim_index=1``, so
both are measured. Without ``--quick`` it also runs a 128^3 volume with 32 channels (ours; the
peer too with ``--peer-big``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from attnkit.nn import AxialAttention
from attnkit.profiling import measure, peak_rss_subprocess


def build(impl: str, side: int, dim: int, heads: int, threads: int):
    """Module and input (not counted in memory). ``impl``: attnkit | lucid_cf | lucid_cl."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if impl == "attnkit":
        return AxialAttention(dim, heads, 3), torch.randn(1, side, side, side, dim,
                                                          requires_grad=True)
    from axial_attention import AxialAttention as LucidAxial

    if impl == "lucid_cf":
        layer = LucidAxial(dim=dim, heads=heads, num_dimensions=3, dim_index=1)
        return layer, torch.randn(1, dim, side, side, side, requires_grad=True)
    layer = LucidAxial(dim=dim, heads=heads, num_dimensions=3, dim_index=-1)
    return layer, torch.randn(1, side, side, side, dim, requires_grad=True)


def forward_backward(layer, x) -> None:
    layer(x).square().mean().backward()


def peak_mem_mb(impl: str, side: int, dim: int, heads: int, threads: int) -> float:
    """Peak-RSS rise (MB) of one forward+backward in a fresh subprocess."""
    mem = peak_rss_subprocess(forward_backward, impl, side, dim, heads, threads, setup=build)
    return round(mem / 2**20, 1)


def run_case(impl: str, side: int, dim: int, heads: int, threads: int, repeat: int) -> dict:
    """One implementation alone: median time over ``repeat`` runs and peak memory."""
    mem = peak_mem_mb(impl, side, dim, heads, threads)
    layer, x = build(impl, side, dim, heads, threads)
    t = measure(forward_backward, layer, x, repeat=repeat, warmup=1)
    return {"time_s": round(t, 4), "peak_mem_mb": mem}


def interleaved_times(impls: list[str], side: int, dim: int, heads: int, threads: int,
                      repeat: int) -> dict[str, float]:
    """Median forward+backward seconds of each implementation, timed round-robin in one process
    (one warm-up call each, then ``repeat`` rounds of one call per implementation)."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    cases = {impl: build(impl, side, dim, heads, threads) for impl in impls}
    for layer, x in cases.values():
        forward_backward(layer, x)
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(repeat):
        for impl, (layer, x) in cases.items():
            t0 = time.perf_counter()
            forward_backward(layer, x)
            times[impl].append(time.perf_counter() - t0)
    return {impl: round(statistics.median(ts), 4) for impl, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the 128^3 case")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=9, help="interleaved rounds (median)")
    ap.add_argument("--peer-big", action="store_true",
                    help="also run the peer at 128^3 (it stores ~4 GB score matrices per axis)")
    args = ap.parse_args(argv)
    try:
        import axial_attention  # noqa: F401
        have_peer = True
    except ImportError:
        have_peer = False
        print("axial_attention is not installed: peer figures omitted", file=sys.stderr)

    side, dim, heads = 32, 64, 4
    peers = (("lucid_cf", "channels-first (1, 64, 32, 32, 32), dim_index=1"),
             ("lucid_cl", "channels-last (1, 32, 32, 32, 64), dim_index=-1"))
    impls = ["attnkit"] + ([p for p, _ in peers] if have_peer else [])
    mems = {impl: peak_mem_mb(impl, side, dim, heads, args.threads) for impl in impls}
    times = interleaved_times(impls, side, dim, heads, args.threads, args.repeat)
    for peer, layout in peers:
        line = {"case": "axial_fwd_bwd_32^3_dim64_heads4", "threads": args.threads,
                "timing": f"interleaved, median of {args.repeat}",
                "attnkit_time_s": times["attnkit"], "attnkit_peak_mem_mb": mems["attnkit"]}
        if have_peer:
            line.update({
                "peer": f"lucidrains axial_attention.AxialAttention, {layout}",
                "peer_time_s": times[peer], "peer_peak_mem_mb": mems[peer],
                "speedup": round(times[peer] / times["attnkit"], 3),
                "peer_mem_over_ours": round(mems[peer] / max(mems["attnkit"], 1e-9), 3),
            })
        print(json.dumps(line), flush=True)

    if not args.quick:
        big = run_case("attnkit", 128, 32, 4, args.threads, 1)
        line = {"case": "axial_fwd_bwd_128^3_dim32_heads4", "threads": args.threads,
                "attnkit_time_s": big["time_s"], "attnkit_peak_mem_mb": big["peak_mem_mb"],
                "within_16GiB": big["peak_mem_mb"] < 16 * 1024}
        if have_peer and args.peer_big:
            try:
                theirs = run_case("lucid_cl", 128, 32, 4, args.threads, 1)
                line.update({"peer": "lucidrains, channels-last",
                             "peer_time_s": theirs["time_s"],
                             "peer_peak_mem_mb": theirs["peak_mem_mb"],
                             "speedup": round(theirs["time_s"] / big["time_s"], 3)})
            except (RuntimeError, MemoryError) as e:
                line["peer_error"] = str(e)[-200:]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
