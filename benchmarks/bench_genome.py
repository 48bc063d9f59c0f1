"""Benchmarks: a whole microbial genome through a sparse base-level encoder on CPU, and
``read_fasta`` against Biopython's ``SeqIO`` (the peer; ``pip install attnkit[bench]``).

Target (issue 4): M. genitalium (580,076 bases), 4-layer encoder, dim 64, 4 heads, window 128 +
exponential + 8 hubs: one forward pass with peak memory < 8 GiB, and a training step at 64k
bases. The peer is the same encoder with dense attention (torch SDPA), measured where it runs in
reasonable time and extrapolated quadratically (marked ``extrapolated``) to the target length.
Every measurement runs in a fresh process (peak = ``ru_maxrss``).

``read_fasta`` (issue 20): a 100 Mb multi-record FASTA (20 records of 5 Mb, 60-column lines,
random bases with N runs, written to a temporary directory); target within 1.5x of
``SeqIO.parse`` time (interleaved repeats, medians with a bootstrap interval of the ratio) and at
most ~1.2 bytes of peak memory per base (peak RSS a call adds, fresh process each).

    .venv/bin/python benchmarks/bench_genome.py [--quick] [--fasta PATH] [--only fasta|model]

Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from attnkit.experiment import stats
from attnkit.experiment.profiling import peak_rss_subprocess
from attnkit.genome import embedded_genome_path, read_fasta
from attnkit.genome.probe import run_probe

DEFAULT_FASTA = embedded_genome_path()
FASTA_RECORDS, FASTA_RECORD_LEN, FASTA_WIDTH = 20, 5_000_000, 60
FASTA_TARGET_RATIO, FASTA_TARGET_BYTES_PER_BASE = 1.5, 1.2


def write_multi_record_fasta(path: Path, records: int, length: int, width: int = FASTA_WIDTH,
                             seed: int = 0) -> int:
    """A FASTA of ``records`` random-base records of ``length`` bases each (every 100 kb an
    N run of 100), ``width`` bases per line; returns the number of bases."""
    rng = np.random.default_rng(seed)
    lut = np.frombuffer(b"ACGT", dtype=np.uint8)
    with open(path, "wb") as f:
        for r in range(records):
            seq = lut[rng.integers(0, 4, length)]
            for s in range(0, length - 100, 100_000):
                seq[s:s + 100] = ord("N")
            full = length // width  # full lines, then the short last line
            body = np.full((full, width + 1), ord("\n"), dtype=np.uint8)
            body[:, :width] = seq[: full * width].reshape(full, width)
            data = body.tobytes() + seq[full * width:].tobytes() + b"\n"
            f.write(f">rec{r} synthetic record {r}\n".encode() + data)
    return records * length


def _read_ours(path: str) -> int:
    records = read_fasta(path, max_bases=1 << 30)  # all records held, as returned
    return sum(len(r) for r in records)


def _read_biopython(path: str) -> int:
    from Bio import SeqIO

    records = list(SeqIO.parse(path, "fasta"))  # held too: the same work as ours
    return sum(len(r.seq) for r in records)


def bench_fasta(quick: bool) -> None:
    """``read_fasta`` vs Biopython on a multi-record FASTA (100 Mb; 20 Mb with --quick)."""
    try:
        import Bio  # noqa: F401
    except ImportError:
        print(json.dumps({"case": "read_fasta", "skipped": "biopython not installed "
                          "(pip install attnkit[bench])"}), flush=True)
        return
    records = 4 if quick else FASTA_RECORDS
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "multi.fa")
        bases = write_multi_record_fasta(Path(path), records, FASTA_RECORD_LEN)
        assert _read_ours(path) == _read_biopython(path) == bases  # same bases read
        times = stats.interleaved_times({"ours": lambda: _read_ours(path),
                                         "biopython": lambda: _read_biopython(path)},
                                        repeat=3 if quick else 5, warmup=0)
        ratio = stats.ratio_ci(times["ours"], times["biopython"])
        peak_ours = peak_rss_subprocess(_read_ours, path)
        peak_bio = peak_rss_subprocess(_read_biopython, path)
    print(json.dumps({
        "case": "read_fasta", "records": records, "bases": bases,
        "file_mb": round(bases * (FASTA_WIDTH + 1) / FASTA_WIDTH / 1e6, 1),
        "seconds": stats.median(times["ours"]), "peer": "Bio.SeqIO.parse (biopython)",
        "peer_seconds": stats.median(times["biopython"]),
        "ratio_ours_over_peer": ratio.value, "ratio_ci": [ratio.low, ratio.high],
        "target_ratio": FASTA_TARGET_RATIO,
        "bytes_per_base": peak_ours / bases, "peer_bytes_per_base": peak_bio / bases,
        "target_bytes_per_base": FASTA_TARGET_BYTES_PER_BASE,
        "meets_target": bool(ratio.high <= FASTA_TARGET_RATIO
                             and peak_ours / bases <= FASTA_TARGET_BYTES_PER_BASE),
    }), flush=True)
SPARSE = {"dim": 64, "depth": 4, "num_heads": 4,
          "pattern": {"window": 128, "exponential": True, "hubs": 8}}
DENSE = {**SPARSE, "pattern": None}
TARGET_PEAK_GIB = 8.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller dense peer lengths")
    ap.add_argument("--fasta", default=str(DEFAULT_FASTA))
    ap.add_argument("--only", choices=("fasta", "model"), default=None)
    args = ap.parse_args()
    if args.only != "model":
        bench_fasta(args.quick)
    if args.only == "fasta":
        return
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
