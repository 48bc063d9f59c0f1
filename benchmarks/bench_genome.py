"""Benchmark: a whole microbial genome through a sparse base-level encoder on CPU.

Target (issue 4): M. genitalium (580,076 bases), 4-layer encoder, dim 64, 4 heads, window 128 +
exponential + 8 hubs: one forward pass with peak memory < 8 GiB, and a training step at 64k
bases. The peer is the same encoder with dense attention (torch SDPA), measured where it runs in
reasonable time and extrapolated quadratically (marked ``extrapolated``) to the target length.
Every measurement runs in a fresh process (peak = ``ru_maxrss``).

    .venv/bin/python benchmarks/bench_genome.py [--quick] [--fasta PATH]

Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from attnkit.genome.probe import run_probe

DEFAULT_FASTA = (Path(__file__).resolve().parents[2] / "shared" / "data" / "genomes"
                 / "Mycoplasma_genitalium_GCF_000027325.1.fna")
SPARSE = {"dim": 64, "depth": 4, "num_heads": 4,
          "pattern": {"window": 128, "exponential": True, "hubs": 8}}
DENSE = {**SPARSE, "pattern": None}
TARGET_PEAK_GIB = 8.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller dense peer lengths")
    ap.add_argument("--fasta", default=str(DEFAULT_FASTA))
    args = ap.parse_args()
    peer_len = 4096 if args.quick else 16384

    # 1. Whole-genome forward pass; peer: dense encoder at peer_len, extrapolated.
    (whole,) = run_probe(["forward", "--fasta", args.fasta, "--config", json.dumps(SPARSE)])
    n = whole["length"]
    (sparse_peer_len,) = run_probe(["forward", "--length", str(peer_len),
                                    "--config", json.dumps(SPARSE)])
    (dense_peer_len,) = run_probe(["forward", "--length", str(peer_len),
                                   "--config", json.dumps(DENSE)])
    dense_extrap = dense_peer_len["seconds"] * (n / peer_len) ** 2
    print(json.dumps({
        "case": "whole_genome_forward", "length": n, "seconds": whole["seconds"],
        "peak_gib": whole["peak_gib"], "target_peak_gib": TARGET_PEAK_GIB,
        "meets_target": whole["peak_gib"] < TARGET_PEAK_GIB,
        "peer": "dense SDPA encoder", "peer_seconds_extrapolated": dense_extrap,
        "ratio_peer_over_ours": dense_extrap / whole["seconds"],
    }), flush=True)
    print(json.dumps({
        "case": f"forward_{peer_len}", "length": peer_len,
        "seconds": sparse_peer_len["seconds"], "peak_gib": sparse_peer_len["peak_gib"],
        "peer": "dense SDPA encoder", "peer_seconds": dense_peer_len["seconds"],
        "peer_peak_gib": dense_peer_len["peak_gib"],
        "ratio_peer_over_ours": dense_peer_len["seconds"] / sparse_peer_len["seconds"],
    }), flush=True)

    # 2. One training step (forward + backward + AdamW) at 64k bases; peer dense at peer_len.
    (step,) = run_probe(["train-step", "--length", "65536", "--config", json.dumps(SPARSE)])
    (dense_step,) = run_probe(["train-step", "--length", str(peer_len),
                               "--config", json.dumps(DENSE)])
    dense_step_extrap = dense_step["seconds"] * (65536 / peer_len) ** 2
    print(json.dumps({
        "case": "train_step_65536", "length": 65536, "seconds": step["seconds"],
        "peak_gib": step["peak_gib"], "peer": "dense SDPA encoder",
        "peer_measured_length": peer_len, "peer_seconds_measured": dense_step["seconds"],
        "peer_peak_gib_measured": dense_step["peak_gib"],
        "peer_seconds_extrapolated": dense_step_extrap,
        "ratio_peer_over_ours": dense_step_extrap / step["seconds"],
    }), flush=True)


if __name__ == "__main__":
    main()
