"""Engine speed and memory, side by side with torch SDPA and compiled FlexAttention.

Prints one JSON object per case. Usage:
    python benchmarks/bench_engine.py [--quick] [--no-flex] [--threads N]

Cases (issue 2):
  dense        L=2048, H=8, D=64: attnkit vs SDPA (target: >= 0.95x SDPA's speed)
  window       sliding_window(128), L=2048: forward time / dense SDPA (target <= 0.14) and
               forward+backward / dense SDPA's forward+backward (target <= 0.2), interleaved
               medians, with the fused compiled band kernels (attnkit.kernels.native) and the
               engine's PyTorch band kernel, and compiled FlexAttention's ratio; where the
               forward runs on AMX (matrix_unit), the vector path's ratio in the same rounds
  scaling      sliding_window(256) | global_tokens(16), H=4, D=64, L=16k..1M: forward time vs
               allowed pairs (log-log slope <= 1.1), vs FlexAttention at 16k and 64k (>= 3x),
               peak memory of the 1M forward in a fresh process (< 8 GiB)
  gemm         the machine's GEMM GFLOP/s, beside GFLOP/s on allowed pairs
  weights      (issue 26, target 1) every sparse pattern at L = 4096 and 65536, H=4, D=64:
               return_weights=True time vs the plain forward, interleaved rounds (frame's
               interleaved_times; 7 at 4096, 5 at 64k, 3 with --quick), ratio with a
               bootstrap CI (target <= 2), and a first call's into fresh memory
               (first_call_ratio: no earlier weights' buffers to reuse)
  fwd_bwd_64k  (issue 26, target 3) sliding_window(256) | global_tokens(16) at 65536 tokens,
               forward and forward+backward, each in a fresh process (peak resident memory),
               alternating rounds; time per allowed pair of fwd+bwd vs the forward's

--case picks one group (default: all). --device cuda runs the engine, SDPA and FlexAttention
on the GPU (timings synchronize the device). With --threads 1 the weights case times CPU
seconds of this process (time.process_time), which a busy shared machine barely changes.
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

# where tensors live: "cpu" or "cuda" (set by --device)
DEVICE = "cpu"


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def qkv(b, h, length, d, requires_grad=False, seed=0, device=None):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g).to(device or DEVICE)
            .requires_grad_(requires_grad) for _ in range(3)]


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

    hub, is_hub = hub.to(DEVICE), is_hub.to(DEVICE)
    block_mask = create_block_mask(mask_mod, None, None, length, length, device=DEVICE)
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


def sparse_patterns(length: int) -> dict[str, P.Pattern]:
    """Every kind of sparse pattern (each plan component: band, masked band, offsets, key and
    row sets, edges, segments) at ``length`` tokens, for the weights case."""
    g = torch.Generator().manual_seed(0)
    deg = 16  # in-edges per node of a random graph
    src = torch.randint(0, length, (length * deg,), generator=g)
    dst = torch.arange(length).repeat_interleave(deg)
    return {
        "sliding_window(128)": P.sliding_window(128),
        "sliding_window(128)|global_tokens(16)": P.sliding_window(128)
        | P.global_tokens(hubs(length)),
        "sliding_window(128)&causal()": P.sliding_window(128) & P.causal(),
        "dilated(32,4)": P.dilated(32, 4),  # 65 offsets: the offsets kernel
        "dilated(128,2)": P.dilated(128, 2),  # 257 offsets: a masked band
        "exponential()": P.exponential(),
        "sliding_window(128)|exponential()": P.sliding_window(128) | P.exponential(),
        "random_keys(32)": P.random_keys(32),
        "block_diagonal(512)": P.block_diagonal([512] * (length // 512)),
        f"graph({deg} in-edges)": P.graph(torch.stack([src, dst]), length),
    }


def weights_case(args, lengths, h: int = 4, d: int = 64) -> None:
    """return_weights=True against the plain forward, per sparse pattern and length."""
    clock = time.process_time if args.threads == 1 and DEVICE == "cpu" else time.perf_counter
    for length in lengths:
        q, k, v = qkv(1, h, length, d)
        rounds = 3 if args.quick else 5 if length > 2**13 else 7
        for name, pat in sparse_patterns(length).items():
            if args.pattern and args.pattern not in name:
                continue
            with torch.no_grad():
                def fwd(pat=pat, q=q, k=k, v=v):
                    return attnkit.attention(q, k, v, pattern=pat)

                def wts(pat=pat, q=q, k=k, v=v):
                    return attnkit.attention(q, k, v, pattern=pat, return_weights=True)

                # a first call into fresh memory (no buffer of earlier weights to reuse, see
                # native.recycled_empty), then the interleaved rounds
                fwd()
                native.release_recycled()
                c0 = clock()
                wts()
                first = clock() - c0
                t = interleaved_times({"forward": fwd, "weights": wts}, repeat=rounds,
                                      warmup=1, clock=clock)
                _, w = attnkit.attention(q, k, v, pattern=pat, return_weights=True)
            ci = ratio_ci(t["weights"], t["forward"])
            emit(case="weights", device=DEVICE, L=length, H=h, D=d, pattern=name, nnz=w.nnz,
                 forward_s=statistics.median(t["forward"]),
                 weights_s=statistics.median(t["weights"]),
                 ratio_weights_vs_forward=statistics.median(t["weights"])
                 / statistics.median(t["forward"]),
                 ratio_ci=[ci.low, ci.high], rounds=rounds, target_max=2.0,
                 first_call_weights_s=first,
                 first_call_ratio=first / statistics.median(t["forward"]),
                 clock="process_time" if clock is time.process_time else "wall",
                 threads=args.threads, values_bytes_per_pair_head=w.values.element_size(),
                 loadavg=_loadavg())
            w = None


def _loadavg() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _fwd_bwd_worker(length: int, h: int, d: int, threads: int, backward: bool, device: str,
                    conn) -> None:
    """One forward (or forward + backward) of window(256) | global(16) in a fresh process:
    its time and the process's peak resident set (VmHWM) or peak CUDA memory."""
    torch.set_num_threads(threads)
    base = _vm_hwm_kib()
    q, k, v = qkv(1, h, length, d, requires_grad=backward, device=device)
    pat = P.sliding_window(256) | P.global_tokens(hubs(length))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    c0 = time.process_time()
    if backward:
        attnkit.attention(q, k, v, pattern=pat).sum().backward()
    else:
        with torch.no_grad():
            attnkit.attention(q, k, v, pattern=pat)
    if device == "cuda":
        torch.cuda.synchronize()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _vm_hwm_kib()
    res = {"seconds": secs, "cpu_seconds": cpu, "peak_gib": peak / 2**20,
           "above_imports_gib": (peak - base) / 2**20}
    if device == "cuda":
        res["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    conn.send(res)
    conn.close()


def fwd_bwd_case(args, length: int = 2**16, h: int = 4, d: int = 64) -> None:
    """Target 3: window(256) | global(16) at 64k tokens, forward vs forward + backward, each
    in a fresh process (alternating rounds, so load changes hit both alike)."""
    pat = P.sliding_window(256) | P.global_tokens(hubs(length))
    pairs = pat.nnz(length, length)
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {"forward": [], "forward_backward": []}
    for _ in range(1 if args.quick else 3):
        for name, backward in (("forward", False), ("forward_backward", True)):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_fwd_bwd_worker,
                               args=(length, h, d, args.threads, backward, DEVICE, child))
            proc.start()
            runs[name].append(parent.recv())
            proc.join()
    row = dict(case="fwd_bwd_64k", device=DEVICE, L=length, H=h, D=d,
               pattern="sliding_window(256)|global_tokens(16)", pairs=pairs,
               threads=args.threads, rounds=len(runs["forward"]), loadavg=_loadavg())
    for name, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        cpu = statistics.median(r["cpu_seconds"] for r in rs)
        row.update({f"{name}_s": secs, f"{name}_cpu_s": cpu,
                    f"{name}_ns_per_pair_head": secs / (pairs * h) * 1e9,
                    f"{name}_peak_gib": max(r["peak_gib"] for r in rs),
                    f"{name}_above_imports_gib": max(r["above_imports_gib"] for r in rs)})
        if DEVICE == "cuda":
            row[f"{name}_cuda_peak_gib"] = max(r["cuda_peak_gib"] for r in rs)
    row["fwd_bwd_vs_forward_time_per_pair"] = row["forward_backward_s"] / row["forward_s"]
    # CPU seconds of the worker: what a busy shared machine changes least
    row["fwd_bwd_vs_forward_cpu_per_pair"] = (row["forward_backward_cpu_s"]
                                              / row["forward_cpu_s"])
    if len(runs["forward"]) > 1:
        ci = ratio_ci([r["seconds"] for r in runs["forward_backward"]],
                      [r["seconds"] for r in runs["forward"]])
        row["ratio_ci"] = [ci.low, ci.high]
    emit(**row)


def main(argv=None) -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--case", choices=["all", "core", "window", "weights", "fwd_bwd_64k"],
                    default="all", help="core: gemm, dense, window, scaling, peak_memory; "
                                        "window: only the window case")
    ap.add_argument("--pattern", default="", help="weights case: only patterns whose name "
                                                  "contains this text")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    DEVICE = args.device
    torch.set_num_threads(args.threads)
    if args.case in ("all", "weights"):
        weights_case(args, [4096, 65536])
    if args.case in ("all", "fwd_bwd_64k"):
        fwd_bwd_case(args)
    if args.case in ("all", "core", "window"):
        core_cases(args)
    return 0


def core_cases(args) -> None:
    rep = 3 if args.quick else 7

    # GEMM roofline of this machine
    a, b = torch.randn(2048, 2048, device=DEVICE), torch.randn(2048, 2048, device=DEVICE)
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
    dout = torch.randn(1, h, length, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cases = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "window": lambda: attnkit.attention(q, k, v, pattern=pat),
        "sdpa_fwd_bwd": lambda: F.scaled_dot_product_attention(qg, kg, vg).backward(dout),
        "window_fwd_bwd": lambda: attnkit.attention(qg, kg, vg, pattern=pat).backward(dout),
    }
    matrix_unit = fused and native.matrix_unit_available()
    if matrix_unit:  # the same forward on the vector units alone (ATTNKIT_AMX=0), same rounds

        def window_vector():
            saved = os.environ.get("ATTNKIT_AMX")
            os.environ["ATTNKIT_AMX"] = "0"
            try:
                return attnkit.attention(q, k, v, pattern=pat)
            finally:
                if saved is None:
                    del os.environ["ATTNKIT_AMX"]
                else:
                    os.environ["ATTNKIT_AMX"] = saved

        cases["window_vector"] = window_vector
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
               gflops_on_allowed_pairs=attn_flops(pairs, h, d) / t_win / 1e9, gemm_gflops=gemm,
               matrix_unit=matrix_unit)
    if matrix_unit:
        row.update(attnkit_vector_s=times["window_vector"],
                   vector_ratio_vs_dense_sdpa=times["window_vector"] / t_sdpa,
                   vector_ratio_mean_ci=ratio(rounds, "window_vector", "sdpa"),
                   one_thread_cpu_vector_ratio_mean_ci=ratio(cpu, "window_vector", "sdpa"))
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
        return

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

    if DEVICE == "cpu":  # the peak resident set of a CPU process
        peak_len = 2**16 if args.quick else 2**20
        res = peak_in_fresh_process(peak_len, h, d, args.threads)
        emit(case="peak_memory", L=peak_len, H=h, D=d,
             pattern="sliding_window(256)|global(16)", target_max_gib=8.0, **res)


if __name__ == "__main__":
    sys.exit(main())
