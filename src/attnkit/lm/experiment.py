"""The ``decoding`` experiment: KV caches and multi-query attention on a small character LM.

Train a multi-head ``DecoderLM`` on the embedded corpus, convert it to grouped- and multi-query
attention (mean-pooled K/V heads) and uptrain each briefly; the multi-head model gets the same
extra steps so the quality comparison is fair. Then measure KV bytes per token, decoding speed
with and without the cache at contexts 256..4096, time per token against the bandwidth
roofline, and validation bits per character.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..argtypes import existing_file
from ..results import Experiment, Option, Result, RunContext
from .decoding import decode_roofline, generate, kv_cache_bytes, measure_bandwidth, time_per_token
from .model import DecoderLM
from .text import Corpus, load_text_file, pydoc_corpus
from .training import convert_kv_heads, train_lm, uptrain

# Quality may cost at most this much (relative bits/char) for the claim "MQA loses little".
MAX_RELATIVE_BPC_LOSS = 0.05


@torch.no_grad()
def bits_per_char(model: DecoderLM, ids: torch.Tensor, seq_len: int, max_chars: int) -> float:
    """Mean next-character cross-entropy in bits over non-overlapping windows of ``ids``."""
    model.eval()
    n = min(ids.numel() - 1, max_chars) // seq_len
    if n < 1:
        raise ValueError("validation text is shorter than one window")
    x = ids[: n * seq_len + 1]
    inputs, targets = x[:-1].view(n, seq_len), x[1:].view(n, seq_len)
    total = 0.0
    for i in range(0, n, 32):
        logits = model(inputs[i:i + 32])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       targets[i:i + 32].reshape(-1), reduction="sum"))
    return total / (n * seq_len) / math.log(2)


def _settings(quick: bool) -> dict:
    if quick:
        return dict(dim=128, depth=2, num_heads=4, gqa_heads=2, seq_len=128, batch=16, lr=3e-3,
                    steps=400, uptrain_steps=60, eval_chars=16384,
                    contexts=(256, 1024, 2048, 4096), cached_steps=12, uncached_steps=2)
    return dict(dim=256, depth=4, num_heads=8, gqa_heads=2, seq_len=256, batch=32, lr=3e-3,
                steps=2000, uptrain_steps=200, eval_chars=1 << 30,
                contexts=(256, 512, 1024, 2048, 4096), cached_steps=64, uncached_steps=4)


def run(ctx: RunContext) -> Result:
    torch.manual_seed(ctx.seed)
    s = _settings(ctx.quick)
    path = ctx.options.get("text")
    corpus: Corpus = load_text_file(path) if path else pydoc_corpus()
    tok = corpus.tokenizer
    train_ids, val_ids = corpus.train_ids, corpus.val_ids
    ctx.log(f"decoding: corpus {corpus.name}: {len(corpus.train_text)} train / "
            f"{len(corpus.val_text)} validation chars, vocab {tok.vocab_size}")
    max_ctx = max(s["contexts"])
    model = DecoderLM(tok.vocab_size, s["dim"], s["depth"], s["num_heads"],
                      max_seq_len=max_ctx + max(s["cached_steps"], s["uncached_steps"]))
    train_kw = dict(batch_size=s["batch"], seq_len=s["seq_len"], seed=ctx.seed)
    t0 = time.perf_counter()
    train_lm(model, train_ids, s["steps"], lr=s["lr"], progress=ctx.progress, **train_kw)
    train_s = time.perf_counter() - t0
    ctx.log(f"decoding: trained {s['steps']} steps in {train_s:.1f} s")

    heads = {"mha": s["num_heads"], "gqa": s["gqa_heads"], "mqa": 1}
    variants, bpc_converted = {}, {}
    for name, kv in heads.items():
        variant = convert_kv_heads(model, kv)
        if name != "mha":
            bpc_converted[name] = bits_per_char(variant, val_ids, s["seq_len"], s["eval_chars"])
        # The multi-head model trains for the same extra steps: same total compute for all.
        uptrain(variant, train_ids, s["uptrain_steps"], lr=s["lr"],
                **{**train_kw, "seed": ctx.seed + 1})
        variants[name] = variant
    ctx.log(f"decoding: converted and uptrained at {time.perf_counter() - t0:.1f} s")

    metrics: dict[str, float] = {}
    table: list[dict] = []
    for name, variant in variants.items():
        metrics[f"kv_bytes_per_token_{name}"] = kv_cache_bytes(variant, 1)
        metrics[f"bits_per_char_{name}"] = bits_per_char(variant, val_ids, s["seq_len"],
                                                          s["eval_chars"])
        if name in bpc_converted:
            metrics[f"bits_per_char_{name}_before_uptrain"] = bpc_converted[name]

    ctx.log(f"decoding: evaluated at {time.perf_counter() - t0:.1f} s")
    bandwidth = measure_bandwidth()
    metrics["bandwidth_gb_per_s"] = bandwidth / 1e9
    for c in ctx.progress(s["contexts"], "speed"):
        for name, variant in variants.items():
            cached = time_per_token(variant, c, steps=s["cached_steps"], use_cache=True,
                                    cache="static")
            uncached = time_per_token(variant, c, steps=s["uncached_steps"], use_cache=False)
            roof = decode_roofline(variant, c, bandwidth)
            metrics[f"tokens_per_s_cached_{name}_{c}"] = 1.0 / cached
            metrics[f"tokens_per_s_uncached_{name}_{c}"] = 1.0 / uncached
            metrics[f"roofline_ratio_{name}_{c}"] = cached / roof
            table.append({"variant": name, "kv_heads": heads[name], "context": c,
                          "cached_tok_s": round(1.0 / cached, 1),
                          "uncached_tok_s": round(1.0 / uncached, 2),
                          "ms_per_token": round(1e3 * cached, 3),
                          "roofline_ms": round(1e3 * roof, 4),
                          "kv_bytes_per_token": metrics[f"kv_bytes_per_token_{name}"],
                          "bits_per_char": round(metrics[f"bits_per_char_{name}"], 4)})

    ctx.log(f"decoding: speed measured at {time.perf_counter() - t0:.1f} s")
    prompt = tok.encode("The ")
    gen = torch.Generator().manual_seed(ctx.seed)
    sample_ids = generate(variants["mqa"], prompt, 200, temperature=0.8, top_k=20,
                          generator=gen)
    sample = tok.decode(sample_ids)

    ref = max(c for c in s["contexts"] if c <= 2048)
    cache_helps = all(
        metrics[f"tokens_per_s_cached_{n}_{ref}"] > metrics[f"tokens_per_s_uncached_{n}_{ref}"]
        for n in variants)
    mqa_faster = (metrics[f"tokens_per_s_cached_mqa_{max_ctx}"]
                  > metrics[f"tokens_per_s_cached_mha_{max_ctx}"])
    bpc_mha, bpc_mqa = metrics["bits_per_char_mha"], metrics["bits_per_char_mqa"]
    mqa_close = bpc_mqa <= bpc_mha * (1.0 + MAX_RELATIVE_BPC_LOSS)
    mqa_bytes_ok = (metrics["kv_bytes_per_token_mqa"] * s["num_heads"]
                    == metrics["kv_bytes_per_token_mha"])
    held = cache_helps and mqa_faster and mqa_close and mqa_bytes_ok
    metrics["kv_cache_speedup_mha_2048"] = (metrics.get("tokens_per_s_cached_mha_2048", 0.0)
                                           / metrics.get("tokens_per_s_uncached_mha_2048", 1.0))
    metrics["mqa_speedup_cached_4096"] = (metrics.get("tokens_per_s_cached_mqa_4096", 0.0)
                                         / metrics.get("tokens_per_s_cached_mha_4096", 1.0))
    metrics["train_seconds"] = train_s

    figures = _plot(ctx, metrics, variants, s["contexts"])
    notes = (
        f"Char-level DecoderLM dim={s['dim']} depth={s['depth']} heads={s['num_heads']}, "
        f"{s['steps']} steps on {corpus.name}; GQA ({s['gqa_heads']} KV heads) and MQA "
        f"converted by mean-pooling K/V heads, then every variant (MHA included) uptrained "
        f"{s['uptrain_steps']} steps. Speed uses these trained models with random prompts "
        f"(weights do not affect speed), greedy, static cache, batch 1, "
        f"{torch.get_num_threads()} threads; timings are noisy on a shared CPU. Roofline = "
        f"(weight bytes + KV bytes) / measured read bandwidth "
        f"({metrics['bandwidth_gb_per_s']:.1f} GB/s); a tiny model is dominated by per-step "
        f"overhead, so its ratio is far above 1. Verdict: cache faster than no cache at "
        f"{ref} for every variant ({cache_helps}); MQA cached faster than MHA at {max_ctx} "
        f"({mqa_faster}); MQA bits/char within {MAX_RELATIVE_BPC_LOSS:.0%} of MHA "
        f"({mqa_close}); MQA KV bytes = MHA/{s['num_heads']} ({mqa_bytes_ok}).\n"
        f"MQA sample (T=0.8, top-k 20): {sample!r}"
    )
    return Result(metrics=metrics, held=held, table=table, figures=figures,
                  params={k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
                  | {"corpus": corpus.name, "seed": ctx.seed},
                  notes=notes)


def _plot(ctx: RunContext, metrics: dict, variants: dict, contexts) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = list(variants)
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    ax[0, 0].bar(names, [metrics[f"kv_bytes_per_token_{n}"] for n in names], color="C0")
    ax[0, 0].set_ylabel("KV-cache bytes per token")
    ax[0, 0].set_title("KV cache size")
    for i, n in enumerate(names):
        ax[0, 1].plot(contexts, [metrics[f"tokens_per_s_cached_{n}_{c}"] for c in contexts],
                      "-o", color=f"C{i}", label=f"{n} cached")
        ax[0, 1].plot(contexts, [metrics[f"tokens_per_s_uncached_{n}_{c}"] for c in contexts],
                      "--x", color=f"C{i}", label=f"{n} uncached")
        roof = [1e3 * decode_roofline(variants[n], c, metrics["bandwidth_gb_per_s"] * 1e9)
                for c in contexts]
        meas = [1e3 / metrics[f"tokens_per_s_cached_{n}_{c}"] for c in contexts]
        ax[1, 0].plot(contexts, meas, "-o", color=f"C{i}", label=f"{n} measured")
        ax[1, 0].plot(contexts, roof, ":", color=f"C{i}", label=f"{n} roofline")
    for a, title, ylabel in ((ax[0, 1], "Decoding speed", "tokens / s"),
                             (ax[1, 0], "Cached step vs bandwidth roofline", "ms / token")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("context length")
        a.set_ylabel(ylabel)
        a.set_title(title)
        a.legend(fontsize=7)
    ax[1, 1].bar(names, [metrics[f"bits_per_char_{n}"] for n in names], color="C2")
    ax[1, 1].set_ylabel("validation bits / char")
    ax[1, 1].set_title("Quality cost of sharing K/V heads")
    path = ctx.save_figure(fig, "decoding.png", dpi=110)
    return [str(path)]


EXPERIMENT = Experiment(
    name="decoding",
    claim=("A KV cache and multi-query attention each speed up autoregressive decoding, while "
           "multi-query attention (converted from multi-head and briefly uptrained) loses at "
           f"most {MAX_RELATIVE_BPC_LOSS:.0%} in validation bits per character."),
    run=run,
    options=(Option("--text", type=existing_file, default=None,
                    help="UTF-8 text file to train on (default: Python's pydoc topics)"),),
    description="MHA/GQA/MQA with KV caches on a character-level language model.",
)
