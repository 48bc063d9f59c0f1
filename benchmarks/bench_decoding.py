"""Decoding speed: attnkit DecoderLM vs Hugging Face transformers (Llama architecture).

Both models have the same sizes (width, depth, heads, KV heads, vocabulary, rotary positions,
tied embeddings; the Llama SwiGLU MLP gets hidden size 8*dim/3 so both MLPs have the same
parameter count) and random weights. Cases, one JSON line each:

- ``generate``: greedy generation of 256 tokens after a 512-token prompt (prefill included),
  tokens/second for attnkit and transformers, MHA and MQA;
- ``roofline``: the cached MQA (and MHA) step at context 2048 against the bandwidth roofline
  (weights + KV bytes / measured read bandwidth), with transformers' step time beside it. Each
  step time is paired with the bandwidth measured just before and after it; the ratios are
  reported as the best and the median of five such pairs (``--pairs``; issue 26's target:
  median <= 1.25x, MHA and MQA), the median's bootstrap interval and the verdict from it (held:
  the interval's top <= 1.25; not held: its bottom above; else inconclusive), with the load
  average. The native step keeps weights and cache on huge pages
  where the system grants them, so the ratios to a roofline over a huge-page buffer's
  bandwidth (the stricter figure where huge pages stream faster) are reported too.
- ``int8``: the cached MQA step at context 8192 (2048 with ``--quick``) with the fp32 cache
  and with the 8-bit :class:`attnkit.lm.QuantizedCache`, transformers' (fp32) step beside
  them, interleaved; bytes per cached position for both caches.

Run: ``.venv/bin/python benchmarks/bench_decoding.py [--quick]``. Timings on a shared CPU are
noisy; run on an idle machine for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from attnkit.experiment.stats import bootstrap_ci
from attnkit.lm import (
    DecoderLM,
    QuantizedCache,
    decode_roofline,
    generate,
    kv_bytes_per_token,
    measure_bandwidth,
    time_per_token,
)


def hf_model(vocab: int, dim: int, depth: int, heads: int, kv_heads: int, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=round(8 * dim / 3),
        num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_len, tie_word_embeddings=True, rope_theta=10000.0,
        attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


class _Stamps:
    """A transformers streamer that records when each token arrives (the prompt comes first)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def hf_generate(model, prompt: torch.Tensor, new: int, streamer=None) -> torch.Tensor:
    return model.generate(
        prompt.unsqueeze(0), attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
        max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer,
    )[0]


def time_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of two functions, alternating so load changes hit both."""
    best_a = best_b = float("inf")
    for _ in range(repeats):
        for i, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i == 0:
                best_a = min(best_a, dt)
            else:
                best_b = min(best_b, dt)
    return best_a, best_b


def hf_step_time(model, context: int, steps: int, vocab: int) -> float:
    prompt = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(0))
    stamps = _Stamps()
    hf_generate(model, prompt, steps, streamer=stamps)
    t = stamps.times[1:]  # [0] is the prompt; [1] the first token, after the prefill
    return (t[-1] - t[0]) / (len(t) - 1)


def int8_case(ours, peer, ctx: int, steps: int, vocab: int, repeats: int, base: dict) -> None:
    """Cached step time at ``ctx`` with the fp32 and the 8-bit cache, and transformers',
    interleaved ``repeats`` times (the fastest of each is reported, and every repeat)."""
    times: dict[str, list[float]] = {"fp32": [], "int8": [], "transformers": []}
    for _ in range(repeats):
        times["fp32"].append(time_per_token(ours, ctx, steps=steps, use_cache=True,
                                            cache="static"))
        times["int8"].append(time_per_token(ours, ctx, steps=steps, use_cache=True,
                                            cache=QuantizedCache()))
        times["transformers"].append(hf_step_time(peer, ctx, steps, vocab))
    print(json.dumps({
        "case": "int8", "variant": "mqa", "kv_heads": 1, "context": ctx, **base,
        "kv_bytes_per_token_fp32": kv_bytes_per_token(ours),
        "kv_bytes_per_token_int8": kv_bytes_per_token(ours, torch.int8),
        "step_ms_attnkit_fp32_cache": round(1e3 * min(times["fp32"]), 3),
        "step_ms_attnkit_int8_cache": round(1e3 * min(times["int8"]), 3),
        "step_ms_transformers": round(1e3 * min(times["transformers"]), 3),
        "int8_over_fp32": round(min(times["int8"]) / min(times["fp32"]), 3),
        "repeats_ms": {k: [round(1e3 * t, 3) for t in v] for k, v in times.items()},
    }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller model, fewer repeats")
    ap.add_argument("--case", choices=("all", "generate", "roofline", "int8"), default="all",
                    help="run only one case (default: all)")
    ap.add_argument("--pairs", type=int, default=5,
                    help="roofline case: step/bandwidth pairs per variant (default 5)")
    args = ap.parse_args()
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    if args.quick:
        vocab, dim, depth, heads, prompt_len, new, repeats, steps = 256, 256, 4, 8, 512, 256, 2, 16
    else:
        vocab, dim, depth, heads, prompt_len, new, repeats, steps = 256, 768, 6, 12, 512, 256, 3, 32
    roof_ctx = 2048
    int8_ctx = 2048 if args.quick else 8192
    max_len = max(prompt_len + new, roof_ctx + steps, int8_ctx + steps) + 8
    torch.manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_len,))
    base = {"threads": torch.get_num_threads(), "dim": dim, "depth": depth, "heads": heads,
            "vocab": vocab}
    for name, kv in (("mha", heads), ("mqa", 1)):
        ours = DecoderLM(vocab, dim, depth, heads, kv, max_seq_len=max_len).eval()
        peer = hf_model(vocab, dim, depth, heads, kv, max_len)
        same = generate(ours, prompt[:8], 4, temperature=0)  # warm-up
        hf_generate(peer, prompt[:8], 4)
        assert same.numel() == 12
        if args.case in ("all", "generate"):
            t_ours, t_peer = time_pair(
                lambda m=ours: generate(m, prompt, new, temperature=0, cache="static"),
                lambda m=peer: hf_generate(m, prompt, new), repeats)
            print(json.dumps({
                "case": "generate", "variant": name, "kv_heads": kv, "prompt": prompt_len,
                "new_tokens": new, **base,
                "params_attnkit": sum(p.numel() for p in ours.parameters()),
                "params_transformers": sum(p.numel() for p in peer.parameters()),
                "tokens_per_s_attnkit": round(new / t_ours, 2),
                "tokens_per_s_transformers": round(new / t_peer, 2),
                "ratio": round(t_peer / t_ours, 3),
            }), flush=True)
        if name == "mqa" and args.case in ("all", "int8"):
            int8_case(ours, peer, int8_ctx, steps, vocab, max(repeats, 3), base)
        if args.case not in ("all", "roofline"):
            continue
        # The ratio pairs each step time with the bandwidth measured just before and after it:
        # on a shared machine both vary with the neighbours' load from minute to minute, and a
        # step time from one minute over a bandwidth from another says little. Best and median
        # over the repeats, alternating attnkit and transformers.
        # The native step keeps weights and cache on huge pages where the system grants them,
        # which stream faster than the 4 KiB pages of the plain bandwidth buffer on some
        # machines: the roofline over a huge-page buffer's bandwidth (stricter) is reported too.
        ours_r, peer_r, steps_ours, steps_peer, bws = [], [], [], [], []
        ours_hp, bws_hp = [], []
        for _ in range(args.pairs):
            for fn, ratios, steps_ in (
                    (lambda m=ours: time_per_token(m, roof_ctx, steps=steps, use_cache=True,
                                                   cache="static"), ours_r, steps_ours),
                    (lambda m=peer: hf_step_time(m, roof_ctx, steps, vocab), peer_r,
                     steps_peer)):
                bw_before = measure_bandwidth(repeats=3)
                hp_before = measure_bandwidth(repeats=3, huge_pages=True)
                step = fn()
                bw = (bw_before + measure_bandwidth(repeats=3)) / 2
                bw_hp = (hp_before + measure_bandwidth(repeats=3, huge_pages=True)) / 2
                bws.append(bw)
                bws_hp.append(bw_hp)
                steps_.append(step)
                ratios.append(step / decode_roofline(ours, roof_ctx, bw))
                if ratios is ours_r:
                    ours_hp.append(step / decode_roofline(ours, roof_ctx, bw_hp))
        roof = decode_roofline(ours, roof_ctx, statistics.median(bws))
        # the median's bootstrap interval: the verdict on the target from it, not the point
        ci = bootstrap_ci(ours_r, np.median)
        verdict = ("held" if ci.high <= 1.25 else "not held" if ci.low > 1.25
                   else "inconclusive")
        print(json.dumps({
            "case": "roofline", "variant": name, "kv_heads": kv, "context": roof_ctx, **base,
            "bandwidth_gb_per_s": round(statistics.median(bws) / 1e9, 2),
            "bandwidth_gb_per_s_range": [round(min(bws) / 1e9, 2), round(max(bws) / 1e9, 2)],
            "roofline_ms": round(1e3 * roof, 3),
            "step_ms_attnkit": round(1e3 * min(steps_ours), 3),
            "step_ms_transformers": round(1e3 * min(steps_peer), 3),
            "ratio_to_roofline_attnkit": round(min(ours_r), 3),
            "ratio_to_roofline_transformers": round(min(peer_r), 3),
            "ratio_to_roofline_attnkit_median": round(statistics.median(ours_r), 3),
            "ratio_to_roofline_transformers_median": round(statistics.median(peer_r), 3),
            "within_2x": min(ours_r) <= 2.0,
            "within_2x_median": statistics.median(ours_r) <= 2.0,
            "target_max_median": 1.25,
            "within_target_median": statistics.median(ours_r) <= 1.25,
            "ratio_to_roofline_attnkit_median_ci": [round(ci.low, 3), round(ci.high, 3)],
            "target_verdict": verdict,
            "pairs": len(ours_r),
            "repeats_ratio_attnkit": [round(r, 3) for r in ours_r],
            "bandwidth_gb_per_s_huge_pages": round(statistics.median(bws_hp) / 1e9, 2),
            "ratio_to_roofline_attnkit_huge_pages": round(min(ours_hp), 3),
            "ratio_to_roofline_attnkit_median_huge_pages": round(statistics.median(ours_hp), 3),
            "within_target_median_huge_pages": statistics.median(ours_hp) <= 1.25,
            # the machine's load while the case ran: timings (and the bandwidth) of a busy
            # machine say little, so every figure carries it
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }), flush=True)


if __name__ == "__main__":
    main()
