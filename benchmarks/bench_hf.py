"""A Hugging Face model's prefill with attention on attnkit's windowed pattern, beside SDPA.

Prints one JSON object per case. Usage:
    python benchmarks/bench_hf.py [--quick] [--threads N] [--repeat N]

Case ``hf_llama_prefill``: a small randomly initialised ``transformers`` Llama (2 layers,
hidden 256, 4 query heads sharing 2 key/value heads, head dim 64) reads one input of
16,384 tokens (``--quick``: 2,048) without a cache, under the pattern
``sliding_window(W) & causal() | global_tokens([0])`` (W = 256; ``--quick``: 128):

- ``attnkit``: ``attn_implementation="attnkit"`` after
  ``attnkit.integrations.transformers.register(pattern)``; no ``L x L`` mask is built.
- ``sdpa``: ``attn_implementation="sdpa"`` given the same mask as a 4D boolean tensor
  ``(1, 1, L, L)`` (what SDPA needs to express it).

Time is the median wall time of the forward pass, the two implementations interleaved
(attnkit, sdpa, attnkit, ...) so load from other processes hits both alike. Peak memory is the
rise of peak RSS during one forward in a fresh subprocess (the mask for SDPA is built inside
that call, as a user of SDPA would). The logits of both are compared (max abs difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from attnkit import patterns as P
from attnkit.profiling import peak_rss_subprocess

VOCAB = 1000


def pattern(window: int) -> P.Pattern:
    return P.sliding_window(window) & P.causal() | P.global_tokens([0])


def build(impl: str, length: int, window: int, threads: int):
    """(model, input ids, window) for ``impl`` in ``{"attnkit", "sdpa"}`` (not counted)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attnkit.integrations.transformers import register

    torch.set_num_threads(threads)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=length, initializer_range=0.2)
    if impl == "attnkit":
        register(pattern(window), name="attnkit_bench")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        cfg, attn_implementation="attnkit_bench" if impl == "attnkit" else "sdpa").eval()
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))
    return model, impl, ids, window


def prefill(model, impl: str, ids, window: int):
    """One forward over the whole input; SDPA gets the pattern as a dense boolean mask."""
    length = ids.shape[1]
    with torch.no_grad():
        if impl == "sdpa":
            mask = pattern(window).to_dense(length, length) & P.causal().to_dense(length, length)
            return model(input_ids=ids, attention_mask=mask[None, None], use_cache=False).logits
        return model(input_ids=ids, use_cache=False).logits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,048 tokens instead of 16,384")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds (median)")
    args = ap.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("transformers is not installed (pip install 'attnkit[bench]'): skipped",
              file=sys.stderr)
        return
    length, window = (2048, 128) if args.quick else (16384, 256)
    repeat = args.repeat or (3 if args.quick else 5)
    if repeat < 1:
        raise SystemExit("bench_hf.py: error: --repeat must be >= 1")

    mems = {impl: round(peak_rss_subprocess(prefill, impl, length, window, args.threads,
                                            setup=build) / 2**20, 1)
            for impl in ("attnkit", "sdpa")}
    cases = {impl: build(impl, length, window, args.threads) for impl in ("attnkit", "sdpa")}
    logits = {impl: prefill(*case) for impl, case in cases.items()}  # warm-up, compared below
    times: dict[str, list[float]] = {impl: [] for impl in cases}
    for _ in range(repeat):
        for impl, case in cases.items():
            t0 = time.perf_counter()
            prefill(*case)
            times[impl].append(time.perf_counter() - t0)
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    print(json.dumps({
        "case": "hf_llama_prefill", "tokens": length, "layers": 2, "heads": 4, "kv_heads": 2,
        "head_dim": 64, "pattern": repr(pattern(window)), "threads": args.threads,
        "transformers": transformers.__version__,
        "timing": f"interleaved, median of {repeat}",
        "attnkit_time_s": round(med["attnkit"], 4), "sdpa_time_s": round(med["sdpa"], 4),
        "speedup": round(med["sdpa"] / med["attnkit"], 3),
        "attnkit_peak_mem_mb": mems["attnkit"], "sdpa_peak_mem_mb": mems["sdpa"],
        "sdpa_mem_over_ours": round(mems["sdpa"] / max(mems["attnkit"], 1e-9), 3),
        "max_abs_logit_diff": float((logits["attnkit"] - logits["sdpa"]).abs().max()),
    }), flush=True)


if __name__ == "__main__":
    main()
