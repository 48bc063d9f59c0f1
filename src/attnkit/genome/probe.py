"""Measurements that need a fresh process: time and peak resident memory (``VmHWM``).

Run as ``python -m attnkit.genome.probe COMMAND ...``; prints one JSON object per line on
stdout. Commands:

* ``cost --kind K --lengths 1024,4096,...``: one attention call (no autograd) on random
  ``(1, H, L, Dh)`` q, k, v per length with pattern ``K`` in ``dense`` (torch SDPA),
  ``window``, ``window_global``, ``window_exp_global``. Lengths run in increasing order, so the
  process's high-water mark right after a length is that length's peak; ``peak_delta_gib`` is it
  minus the high-water mark before the first input was allocated.
* ``forward --fasta PATH --config JSON [--state FILE]``: one streaming forward pass of a
  :class:`GenomeEncoder` over the whole genome (records joined by ``N`` runs); ``--length L``
  instead of ``--fasta`` uses ``L`` random bases.
* ``train-step --length L --config JSON``: one masked-base training step on ``L`` bases of a
  synthetic background (forward, backward, optimizer step).

:func:`run_probe` calls these from Python and parses the lines.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

KINDS = ("dense", "window", "window_global", "window_exp_global")
_GIB = float(1 << 30)


def peak_rss_gib() -> float:
    """This process's peak resident set size so far, in GiB.

    Reads ``VmHWM`` where Linux has it: ``ru_maxrss`` survives ``exec``, so a fresh probe
    process would otherwise start at its (larger) parent's high-water mark and report no growth.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / _GIB
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform != "darwin" else 1 / 1024) * 1024 / _GIB


def run_probe(args: list[str], timeout: float = 1800.0) -> list[dict[str, Any]]:
    """Run ``python -m attnkit.genome.probe *args`` in a fresh process; its JSON lines."""
    proc = subprocess.run([sys.executable, "-m", "attnkit.genome.probe", *args],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {' '.join(args[:1])} failed:\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _model_from_config(config: dict[str, Any]):
    from .model import GenomeEncoder, GenomePattern

    pat = config.get("pattern", {})
    pattern = None if pat is None else GenomePattern(
        window=int(pat.get("window", 128)), exponential=bool(pat.get("exponential", True)),
        hubs=pat.get("hubs", 8) if isinstance(pat.get("hubs", 8), int) else tuple(pat["hubs"]))
    keys = ("dim", "depth", "num_heads", "num_labels", "stem_kernel", "ff_mult")
    return GenomeEncoder(pattern=pattern, **{k: int(config[k]) for k in keys if k in config})


def _cost(ns: argparse.Namespace) -> None:
    import torch

    import attnkit
    from attnkit import patterns as P

    from .model import GenomePattern

    lengths = sorted(int(x) for x in ns.lengths.split(",") if x)

    def pattern_for(n: int):
        if ns.kind == "dense":
            return None
        if ns.kind == "window":
            return P.sliding_window(ns.window)
        exp = ns.kind == "window_exp_global"
        return GenomePattern(window=ns.window, exponential=exp, hubs=ns.hubs)(n)

    def call(n: int) -> float:
        q, k, v = (torch.randn(1, ns.heads, n, ns.head_dim) for _ in range(3))
        pat = pattern_for(n)
        t0 = time.perf_counter()
        with torch.no_grad():
            attnkit.attention(q, k, v, pattern=pat)
        return time.perf_counter() - t0

    base = peak_rss_gib()
    call(min(lengths[0], 1024))  # warm-up: first-call allocations and dispatch
    for n in lengths:
        reps = 3 if n <= 16384 else 1
        secs = min(call(n) for _ in range(reps))
        _emit({"kind": ns.kind, "length": n, "seconds": secs, "peak_gib": peak_rss_gib(),
               "peak_delta_gib": peak_rss_gib() - base, "repeats": reps})


def _forward(ns: argparse.Namespace) -> None:
    import torch

    from .fasta import join_records, read_fasta

    config = json.loads(ns.config)
    model = _model_from_config(config).eval()
    if ns.state:
        state = torch.load(ns.state, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))
    window = int((config.get("pattern") or {}).get("window", 0))
    if ns.fasta:
        records = read_fasta(ns.fasta, min_length=window + 1)
        tokens, num_records = join_records(records, max(window, 1)), len(records)
    elif ns.length:
        tokens = torch.randint(0, 4, (ns.length,), generator=torch.Generator().manual_seed(0))
        num_records = 0
    else:
        raise SystemExit("forward needs --fasta or --length")
    base = peak_rss_gib()
    c0, t0 = time.process_time(), time.perf_counter()
    hidden = model.embed_genome(tokens)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    _emit({"length": int(tokens.numel()), "records": num_records, "seconds": secs,
           "cpu_seconds": cpu, "threads": torch.get_num_threads(),
           "peak_gib": peak_rss_gib(), "peak_delta_gib": peak_rss_gib() - base,
           "finite": bool(torch.isfinite(hidden).all())})


def _train_step(ns: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from .synthetic import IGNORE_INDEX, markov_background, random_markov_chain
    from .train import mask_tokens

    config = json.loads(ns.config)
    model = _model_from_config(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    tokens = markov_background(1, ns.length, random_markov_chain(3, gen), gen)
    inputs, targets = mask_tokens(tokens, 0.15, gen)
    base = peak_rss_gib()
    c0, t0 = time.process_time(), time.perf_counter()
    logits = model.mlm_logits(model(inputs))
    loss = F.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    opt.zero_grad()
    loss.backward()
    opt.step()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    _emit({"length": ns.length, "seconds": secs, "cpu_seconds": cpu,
           "threads": torch.get_num_threads(), "loss": float(loss.detach()),
           "peak_gib": peak_rss_gib(), "peak_delta_gib": peak_rss_gib() - base})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m attnkit.genome.probe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--kind", choices=KINDS, required=True)
    c.add_argument("--lengths", required=True)
    c.add_argument("--heads", type=int, default=2)
    c.add_argument("--head-dim", type=int, default=16)
    c.add_argument("--window", type=int, default=64)
    c.add_argument("--hubs", type=int, default=8)
    f = sub.add_parser("forward")
    f.add_argument("--fasta", default=None)
    f.add_argument("--length", type=int, default=0, help="random bases instead of a FASTA")
    f.add_argument("--config", required=True)
    f.add_argument("--state", default=None)
    t = sub.add_parser("train-step")
    t.add_argument("--length", type=int, required=True)
    t.add_argument("--config", required=True)
    for p in (f, t):
        p.add_argument("--threads", type=int, default=0,
                       help="torch threads (0: torch's default)")
    ns = ap.parse_args(argv)
    if getattr(ns, "threads", 0) > 0:
        import torch

        torch.set_num_threads(ns.threads)
    {"cost": _cost, "forward": _forward, "train-step": _train_step}[ns.cmd](ns)


if __name__ == "__main__":
    main()
