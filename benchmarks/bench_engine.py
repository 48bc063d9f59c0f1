"""Engine speed and memory, side by side with torch SDPA and compiled FlexAttention.

Prints one JSON object per case. Usage:
    python benchmarks/bench_engine.py [--quick] [--no-flex] [--threads N]

Cases (issue 2):
  dense        L=2048, H=8, D=64: attnkit vs SDPA (target: >= 0.95x SDPA's speed)
  window       sliding_window(128), L=2048: forward time / dense SDPA (target <= 0.14) and
               forward+backward / dense SDPA's forward+backward (target <= 0.2), interleaved
               medians, with the fused compiled band kernels (attnkit.kernels.native) and the
               engine's PyTorch band kernel, and compiled FlexAttention's ratio
  scaling      sliding_window(256) | global_tokens(16), H=4, D=64, L=16k..1M: forward time vs
               allowed pairs (log-log slope <= 1.1), vs FlexAttention at 16k and 64k (>= 3x),
               peak memory of the 1M forward in a fresh process (< 8 GiB)
  gemm         the machine's GEMM GFLOP/s, beside GFLOP/s on allowed pairs
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit import patterns as P
from attnkit.experiment.stats import interleaved_times, median, ratio_ci, single_thread
from attnkit.kernels import native


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def qkv(b, h, length, d, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g).requires_grad_(requires_grad)
            for _ in range(3)]


def hubs(length: int, n: int = 16) -> list[int]:
    return [int(i * length / n) for i in range(n)]


def attn_flops(pairs: int, h: int, d: int) -> float:
    return 4.0 * pairs * h * d  # QK^T and PV: 2 flops per multiply-add each


# ------------------------------------------------------------------------------ FlexAttention


def flex_forward(length: int, pattern: str, h: int, d: int):
    """A compiled FlexAttention forward for the same pattern, or raise."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    w = 128 if pattern == "window128" else 256
    hub = torch.tensor(hubs(length))
    is_hub = torch.zeros(length, dtype=torch.bool)
    is_hub[hub] = True

    def mask_mod(b, hh, qi, kj):
        m = (qi - kj).abs() <= w
        if pattern == "window256_global":
            m = m | is_hub[qi] | is_hub[kj]
        return m

    block_mask = create_block_mask(mask_mod, None, None, length, length, device="cpu")
    compiled = torch.compile(flex_attention)
    q, k, v = qkv(1, h, length, d)
    t0 = time.perf_counter()
    compiled(q, k, v, block_mask=block_mask)
    compile_s = time.perf_counter() - t0
    return (lambda: compiled(q, k, v, block_mask=block_mask)), compile_s


# ------------------------------------------------------------------------------ peak memory


def _vm_hwm_kib() -> int:
    """Peak resident set of this process (VmHWM). Unlike ru_maxrss, which Linux carries over
    from the forking parent, VmHWM starts afresh in a spawned interpreter."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_worker(length: int, h: int, d: int, threads: int, conn) -> None:
    """Runs in a fresh process, so ru_maxrss is this forward's peak (plus the interpreter)."""
    torch.set_num_threads(threads)
    base = _vm_hwm_kib()
    q, k, v = qkv(1, h, length, d)
    pat = P.sliding_window(256) | P.global_tokens(hubs(length))
    t0 = time.perf_counter()
    with torch.no_grad():
        attnkit.attention(q, k, v, pattern=pat)
    secs = time.perf_counter() - t0
    peak = _vm_hwm_kib()
    conn.send({"seconds": secs, "peak_gib": peak / 2**20,
               "above_imports_gib": (peak - base) / 2**20})
    conn.close()


def peak_in_fresh_process(length: int, h: int, d: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_worker, args=(length, h, d, threads, child))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


# ------------------------------------------------------------------------------ cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--case", choices=("all", "window"), default="all",
                    help="run only the window case (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rep = 3 if args.quick else 7

    # GEMM roofline of this machine
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = timeit(lambda: a @ b, repeat=rep)
    gemm = 2 * 2048**3 / t / 1e9
    emit(case="gemm", gflops=round(gemm, 1), threads=args.threads)

    # dense
    h, d, length = 8, 64, 2048
    q, k, v = qkv(1, h, length, d)
    t_sdpa = timeit(lambda: F.scaled_dot_product_attention(q, k, v), repeat=rep)
    t_ours = timeit(lambda: attnkit.attention(q, k, v), repeat=rep)
    if args.case == "all":
        emit(case="dense", L=length, H=h, D=d, sdpa_s=t_sdpa, attnkit_s=t_ours,
             speed_vs_sdpa=t_sdpa / t_ours, target_min=0.95,
             gflops_attnkit=attn_flops(length * length, h, d) / t_ours / 1e9)

    # sliding window 128 at 2048: forward, and forward + backward (the fused band backward),
    # each beside dense SDPA's, interleaved (load changes hit all of them alike); medians
    pat = P.sliding_window(128)
    pairs = pat.nnz(length, length)
    fused = native.band_available()
    qg, kg, vg = qkv(1, h, length, d, requires_grad=True)
    dout = torch.randn(1, h, length, d, generator=torch.Generator().manual_seed(1))
    cases = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "window": lambda: attnkit.attention(q, k, v, pattern=pat),
        "sdpa_fwd_bwd": lambda: F.scaled_dot_product_attention(qg, kg, vg).backward(dout),
        "window_fwd_bwd": lambda: attnkit.attention(qg, kg, vg, pattern=pat).backward(dout),
    }
    rounds = interleaved_times(cases, repeat=rep)
    times = {name: median(t) for name, t in rounds.items()}
    # and on one thread in CPU seconds, which other processes on a busy machine barely change
    with single_thread():
        cpu = interleaved_times(cases, repeat=rep, clock=time.process_time)
    t_sdpa, t_win = times["sdpa"], times["window"]

    def ratio(a: dict, ours: str, peer: str) -> list[float]:
        ci = ratio_ci(a[ours], a[peer])  # paired by round
        return [round(ci.value, 4), round(ci.low, 4), round(ci.high, 4)]

    native._state["ok"] = False  # the engine's PyTorch band kernel, for comparison
    t_torch_kernel = timeit(lambda: attnkit.attention(q, k, v, pattern=pat), repeat=rep)
    native._state["ok"] = fused
    row = dict(case="window", L=length, H=h, D=d, w=128, pair_fraction=pairs / length**2,
               sdpa_dense_s=t_sdpa, attnkit_s=t_win, ratio_vs_dense_sdpa=t_win / t_sdpa,
               target_max=0.14, fused_kernel=fused, attnkit_pytorch_kernel_s=t_torch_kernel,
               pytorch_kernel_ratio_vs_dense_sdpa=t_torch_kernel / t_sdpa,
               sdpa_dense_fwd_bwd_s=times["sdpa_fwd_bwd"],
               attnkit_fwd_bwd_s=times["window_fwd_bwd"],
               fwd_bwd_ratio_vs_dense_sdpa_fwd_bwd=times["window_fwd_bwd"]
               / times["sdpa_fwd_bwd"], fwd_bwd_target_max=0.2,
               ratio_mean_ci=ratio(rounds, "window", "sdpa"),
               fwd_bwd_ratio_mean_ci=ratio(rounds, "window_fwd_bwd", "sdpa_fwd_bwd"),
               one_thread_cpu_ratio_mean_ci=ratio(cpu, "window", "sdpa"),
               one_thread_cpu_fwd_bwd_ratio_mean_ci=ratio(cpu, "window_fwd_bwd", "sdpa_fwd_bwd"),
               load_average=os.getloadavg()[0],
               gflops_on_allowed_pairs=attn_flops(pairs, h, d) / t_win / 1e9, gemm_gflops=gemm)
    if not args.no_flex:
        try:
            fn, compile_s = flex_forward(length, "window128", h, d)
            t_flex = timeit(fn, repeat=rep)
            row.update(flex_s=t_flex, flex_ratio_vs_dense_sdpa=t_flex / t_sdpa,
                       flex_compile_s=compile_s)
        except Exception as e:  # FlexAttention on CPU needs a working inductor toolchain
            row.update(flex_error=f"{type(e).__name__}: {e}"[:300])
    emit(**row)
    if args.case == "window":
        return 0

    # scaling of window(256) | global(16)
    h, d = 4, 64
    lengths = [2**14, 2**15, 2**16] if args.quick else [2**14, 2**15, 2**16, 2**17, 2**18,
                                                         2**19, 2**20]
    pts = []
    for length in lengths:
        pat = P.sliding_window(256) | P.global_tokens(hubs(length))
        # allowed pairs, analytically: band (clipped at the ends) plus hub rows and columns
        pairs = pat.nnz(length, length) if length <= 2**16 else None
        q, k, v = qkv(1, h, length, d)
        with torch.no_grad():
            t_ours = timeit(lambda q=q, k=k, v=v, pat=pat: attnkit.attention(q, k, v, pattern=pat),
                            repeat=1 if length >= 2**18 else min(rep, 3))
        row = dict(case="scaling", L=length, H=h, D=d, pattern="sliding_window(256)|global(16)",
                   attnkit_s=t_ours)
        if pairs is not None:
            row.update(pairs=pairs, gflops_on_allowed_pairs=attn_flops(pairs, h, d) / t_ours / 1e9)
        if not args.no_flex and length in (2**14, 2**16):
            try:
                fn, compile_s = flex_forward(length, "window256_global", h, d)
                t_flex = timeit(fn, repeat=min(rep, 3))
                row.update(flex_s=t_flex, speedup_vs_flex=t_flex / t_ours, target_min=3.0,
                           flex_compile_s=compile_s)
            except Exception as e:
                row.update(flex_error=f"{type(e).__name__}: {e}"[:300])
        emit(**row)
        pts.append((length, t_ours))
        q = k = v = None  # free before the next size
    xs = [math.log(length * (2 * 256 + 1)) for length, _ in pts]  # pairs ~ L * (2w+1) + hubs
    ys = [math.log(t) for _, t in pts]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    emit(case="scaling_slope", slope_time_vs_pairs=slope, target_max=1.1,
         lengths=[p[0] for p in pts])

    peak_len = 2**16 if args.quick else 2**20
    res = peak_in_fresh_process(peak_len, h, d, args.threads)
    emit(case="peak_memory", L=peak_len, H=h, D=d, pattern="sliding_window(256)|global(16)",
         target_max_gib=8.0, **res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
