"""The ``decoding`` experiment: what multi-query attention costs in quality, and what the KV
cache and multi-query attention buy in decoding speed.

Three parts:

1. **Quality, from scratch.** Multi-head (MHA), grouped-query (GQA, 2 KV heads) and
   multi-query (MQA, 1 KV head) character LMs trained from scratch with the same steps, the
   same batches and the same seed, over several seeds; validation bits/char per arm and the
   MQA / MHA ratio paired by seed (Shazeer 2019 trains MQA from scratch). The MQA models are
   also scored through the 8-bit :class:`~attnkit.lm.QuantizedCache` against the fp32 cache.
2. **Uptraining curve** (full mode): an MHA base trained until validation stops improving,
   converted to MQA by mean-pooling K/V heads and uptrained for 0-20% of its pretraining
   steps (Ainslie et al. 2023), against the from-scratch MQA.
3. **Speed** in a configuration wide enough that a decoding step is bandwidth-bound
   (768 wide, 6 layers, 12 heads, context 2048, as ``benchmarks/bench_decoding.py``), random
   weights and a cache filled with random keys/values (speed does not depend on their values):
   ms per token cached and uncached, bytes read per token and the ratio to the bandwidth
   roofline per arm, and the MQA step at context 8192 with the 8-bit vs the fp32 cache.
   Timings interleave the arms round by round (:func:`stats.interleaved_times`) on one thread
   in CPU time, as the engine experiment does.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..argtypes import existing_file
from ..experiment import Decision, Experiment, Option, Result, RunContext, stats
from ..nn.attention import attention_layers
from .cache import KVCache, QuantizedCache, StaticCache
from .decoding import (
    bits_per_char_cached,
    generate,
    kv_bytes_per_token,
    kv_cache_bytes,
    weight_bytes,
)
from .model import DecoderLM
from .text import Corpus, load_text_file, pydoc_corpus
from .training import convert_kv_heads, train_lm, uptrain

#: Quality may cost at most this much (relative bits/char) for "MQA loses little".
MAX_RELATIVE_BPC_LOSS = 0.05
#: The 8-bit cache may cost at most this much (relative bits/char) against the fp32 cache.
MAX_RELATIVE_BPC_LOSS_INT8 = 0.01
ARMS = ("mha", "gqa", "mqa")
#: Bootstrap resamples per interval (dozens of intervals: 2000 keeps them cheap).
N_BOOT = 2000


@dataclass(frozen=True)
class DecodingConfig:
    """Sizes of the three parts. :meth:`quick` is the report's budget, :meth:`tiny` for tests;
    the defaults are full mode."""

    # 1. quality: arms trained from scratch
    dim: int = 128
    depth: int = 2
    num_heads: int = 4
    gqa_heads: int = 2
    seq_len: int = 128
    batch: int = 16
    lr: float = 3e-3
    steps: int = 3000
    log_every: int = 250  # validation points of the learning curve
    log_chars: int = 8192
    eval_chars: int = 1 << 30  # all of the test half
    int8_group_size: int = 32  # short windows: small groups so most keys are really 8-bit
    # 2. uptraining curve (MHA base to a plateau)
    curve: bool = True
    base_max_steps: int = 20000
    base_eval_every: int = 250
    base_patience: int = 4
    base_min_rel_gain: float = 0.002
    uptrain_pcts: tuple[float, ...] = (0.0, 2.5, 5.0, 10.0, 20.0)
    # 3. speed (random weights, bandwidth-bound sizes)
    speed_dim: int = 768
    speed_depth: int = 6
    speed_heads: int = 12
    speed_gqa_heads: int = 2
    speed_context: int = 2048
    speed_contexts_extra: tuple[int, ...] = (512, 1024, 4096)
    speed_steps: int = 4  # decoding steps per timed call
    bandwidth_mb: int = 256  # the read-bandwidth probe (far larger than CPU caches)
    speed_rounds: int = 15
    uncached_arms: tuple[str, ...] = ARMS
    uncached_rounds: int = 5
    int8_context: int = 8192
    seeds_quick: int = 3
    seeds_full: int = 3

    @classmethod
    def quick(cls) -> DecodingConfig:
        """Fits ~90 s of an idle 2-core machine: small models, a fixed step budget (past the
        steep part of the loss curve, not at a plateau: said in the notes), the speed part at
        full width with fewer rounds, no uptraining curve."""
        return cls(dim=64, depth=2, num_heads=4, gqa_heads=2, seq_len=64, batch=16, lr=6e-3,
                   steps=300, log_every=50, log_chars=4096, eval_chars=16384,
                   int8_group_size=16, curve=False, speed_contexts_extra=(), speed_rounds=7,
                   uncached_arms=("mha",), uncached_rounds=3)

    @classmethod
    def tiny(cls) -> DecodingConfig:
        """For tests: every code path (the uptraining curve included), seconds of compute."""
        return cls(dim=16, depth=1, num_heads=4, gqa_heads=2, seq_len=16, batch=4, lr=6e-3,
                   steps=6, log_every=3, log_chars=256, eval_chars=512, int8_group_size=4,
                   curve=True, base_max_steps=12, base_eval_every=3, base_patience=1,
                   uptrain_pcts=(0.0, 50.0), speed_dim=32, speed_depth=1, speed_heads=4,
                   speed_gqa_heads=2, speed_context=64, speed_contexts_extra=(32,),
                   speed_steps=2, speed_rounds=2, uncached_rounds=2, int8_context=128,
                   bandwidth_mb=16)


@torch.no_grad()
def bits_per_char(model: DecoderLM, ids: torch.Tensor, seq_len: int, max_chars: int) -> float:
    """Mean next-character cross-entropy in bits over non-overlapping windows of ``ids``
    (``(N,)``), at most ``max_chars`` predictions (the whole-sequence forward, no cache)."""
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


# ------------------------------------------------------------------------------- quality


def _kv_heads(cfg: DecodingConfig, arm: str, heads: int | None = None,
              gqa: int | None = None) -> int:
    heads = cfg.num_heads if heads is None else heads
    return {"mha": heads, "gqa": cfg.gqa_heads if gqa is None else gqa, "mqa": 1}[arm]


def _train_logged(model: DecoderLM, train_ids, log_ids, cfg: DecodingConfig, steps: int,
                  seed: int, *, every: int, patience: int | None = None,
                  min_rel_gain: float = 0.0) -> tuple[list[tuple[int, float]], int]:
    """Train ``model`` (:func:`train_lm`, cosine schedule over ``steps``), scoring validation
    bits/char on ``log_ids`` every ``every`` steps. With ``patience``, stop once that many
    evaluations in a row improved on the best by less than ``min_rel_gain`` (a plateau).
    Returns the ``(step, bits/char)`` curve and the steps run."""
    curve: list[tuple[int, float]] = []
    best, stale = math.inf, 0

    def on_step(step: int, _loss: float) -> bool:
        nonlocal best, stale
        if step % every and step != steps:
            return False
        bpc = bits_per_char(model, log_ids, cfg.seq_len, cfg.log_chars)
        model.train()
        curve.append((step, bpc))
        if bpc < best * (1.0 - min_rel_gain):
            best, stale = bpc, 0
        else:
            stale += 1
        return patience is not None and stale >= patience

    losses = train_lm(model, train_ids, steps, batch_size=cfg.batch, seq_len=cfg.seq_len,
                      lr=cfg.lr, seed=seed, callback=on_step)
    return curve, len(losses)


def _quality_seed(seed: int, cfg: DecodingConfig, corpus: Corpus, split: dict) -> dict[str, Any]:
    """One seed: the three arms from scratch (same batches), their bits/char on the test half,
    the MQA model through the 8-bit and the fp32 cache, and (``cfg.curve``) the uptraining
    curve from an MHA base trained to a plateau."""
    vocab = corpus.tokenizer.vocab_size
    out: dict[str, Any] = {"curves": {}}
    models = {}
    for arm in ARMS:
        torch.manual_seed(seed)  # same initial weights where the shapes agree
        model = DecoderLM(vocab, cfg.dim, cfg.depth, cfg.num_heads, _kv_heads(cfg, arm),
                          max_seq_len=cfg.seq_len)
        t0 = time.process_time()
        curve, _ = _train_logged(model, split["train"], split["stop"], cfg, cfg.steps, seed,
                                 every=cfg.log_every)
        out[f"train_cpu_seconds_{arm}"] = time.process_time() - t0
        out["curves"][arm] = curve
        out[f"bits_per_char_{arm}"] = bits_per_char(model, split["test"], cfg.seq_len,
                                                    cfg.eval_chars)
        models[arm] = model
    mqa = models["mqa"]
    out["bits_per_char_mqa_cached_fp32"] = bits_per_char_cached(
        mqa, split["test"], cfg.seq_len, cfg.eval_chars)
    out["bits_per_char_mqa_int8"] = bits_per_char_cached(
        mqa, split["test"], cfg.seq_len, cfg.eval_chars,
        cache_factory=lambda: QuantizedCache(cfg.int8_group_size))
    if seed == split["first_seed"]:
        gen = torch.Generator().manual_seed(seed)
        ids = generate(mqa, corpus.tokenizer.encode("The "), min(200, cfg.seq_len - 4),
                       temperature=0.8, top_k=20, generator=gen)
        out["sample"] = corpus.tokenizer.decode(ids)
    if cfg.curve:
        out.update(_uptrain_curve(seed, cfg, vocab, split))
    return out


def _uptrain_curve(seed: int, cfg: DecodingConfig, vocab: int, split: dict) -> dict[str, Any]:
    """An MHA base trained until validation (the ``stop`` half) stops improving, converted to
    MQA by mean-pooling K/V heads, each point uptrained from the conversion for a share of the
    base's pretraining steps and scored on the test half."""
    torch.manual_seed(seed + 1000)  # a different base than the from-scratch MHA arm
    base = DecoderLM(vocab, cfg.dim, cfg.depth, cfg.num_heads, max_seq_len=cfg.seq_len)
    curve, steps_run = _train_logged(base, split["train"], split["stop"], cfg,
                                     cfg.base_max_steps, seed + 1000,
                                     every=cfg.base_eval_every, patience=cfg.base_patience,
                                     min_rel_gain=cfg.base_min_rel_gain)
    out: dict[str, Any] = {
        "base_steps": steps_run,
        "base_reached_plateau": float(steps_run < cfg.base_max_steps),
        "bits_per_char_mha_base": bits_per_char(base, split["test"], cfg.seq_len,
                                                cfg.eval_chars),
        "base_curve": curve,
    }
    for pct in cfg.uptrain_pcts:
        variant = convert_kv_heads(base, 1)
        n = round(pct / 100.0 * steps_run)
        if n:
            uptrain(variant, split["train"], n, batch_size=cfg.batch, seq_len=cfg.seq_len,
                    seed=seed + 2000)
        out[f"bits_per_char_mqa_uptrained_{_pct_name(pct)}"] = bits_per_char(
            variant, split["test"], cfg.seq_len, cfg.eval_chars)
    return out


def _pct_name(pct: float) -> str:
    """``2.5 -> "2p5"``, ``10.0 -> "10"`` (metric-name safe)."""
    return f"{pct:g}".replace(".", "p")


# ------------------------------------------------------------------------------- speed


def _filled_cache(model: DecoderLM, cache: KVCache, context: int, seed: int = 0) -> KVCache:
    """``cache`` holding ``context`` positions of random keys/values in every layer: a decoding
    step reads them exactly as it reads a real prompt's, without paying for the prefill."""
    gen = torch.Generator().manual_seed(seed)
    for layer in attention_layers(model):
        k = torch.randn(1, layer.num_kv_heads, context, layer.head_dim, generator=gen)
        cache.update(layer.layer_idx, k, torch.randn(k.shape, generator=gen))
    return cache


def _speed_models(cfg: DecodingConfig, vocab: int, max_len: int) -> dict[str, DecoderLM]:
    models = {}
    for arm in ARMS:
        torch.manual_seed(0)
        kv = _kv_heads(cfg, arm, cfg.speed_heads, cfg.speed_gqa_heads)
        models[arm] = DecoderLM(vocab, cfg.speed_dim, cfg.speed_depth, cfg.speed_heads, kv,
                                max_seq_len=max_len).eval()
    return models


def _step_case(model: DecoderLM, cache: KVCache, steps: int):
    token = torch.ones(1, 1, dtype=torch.long)

    def run() -> None:
        for _ in range(steps):
            model(token, cache=cache, last_only=True)
    return run


@torch.no_grad()
def _speed(cfg: DecodingConfig, vocab: int,
           log) -> tuple[dict[str, float], list[Decision], list[dict]]:
    """Cached ms/token per arm at every context, uncached at the deciding context, the int8 vs
    fp32 cache at ``int8_context``; interleaved rounds, one thread, CPU time."""
    ctx_main = cfg.speed_context
    contexts = sorted({ctx_main, *cfg.speed_contexts_extra})
    growth = cfg.speed_steps * (max(cfg.speed_rounds, cfg.uncached_rounds) + 1) + 1
    max_len = max(*contexts, cfg.int8_context) + growth + 1
    models = _speed_models(cfg, vocab, max_len)
    metrics: dict[str, float] = {}
    decisions: list[Decision] = []
    rows: list[dict] = []
    # The read bandwidth is measured in the same rounds and with the same clock as the steps
    # (a full sum over a buffer far larger than the caches), so each step time is paired with
    # the rate at which this process could read memory in that round.
    probe = torch.ones(cfg.bandwidth_mb * (1 << 20) // 4)
    bandwidths: list[float] = []
    with stats.single_thread():
        for c in contexts:
            caches = {a: _filled_cache(m, StaticCache(c + growth), c) for a, m in models.items()}
            cases = {a: _step_case(models[a], caches[a], cfg.speed_steps) for a in ARMS}
            cases["bandwidth"] = probe.sum
            times = stats.interleaved_times(cases, repeat=cfg.speed_rounds, warmup=1,
                                            clock=time.process_time)
            bw = [probe.numel() * 4 / t for t in times["bandwidth"]]
            bandwidths += bw
            # The cache grows by speed_steps per call: the roofline at the mean timed length.
            mid = round(c + cfg.speed_steps * (1 + (cfg.speed_rounds + 1) / 2))
            for a in ARMS:
                ms = [1e3 * t / cfg.speed_steps for t in times[a]]
                read = weight_bytes(models[a]) + kv_cache_bytes(models[a], mid)
                ms_ci = _mean_ci(ms)
                roof_ci = _mean_ci([t / (1e3 * read / r) for t, r in zip(ms, bw)])
                metrics.update(ms_ci.metrics(f"ms_per_token_cached_{a}_{c}"))
                metrics.update(_tokens_per_s(ms_ci, f"tokens_per_s_cached_{a}_{c}"))
                metrics.update(roof_ci.metrics(f"roofline_ratio_{a}_{c}"))
                metrics[f"bytes_read_per_token_{a}_{c}"] = float(
                    weight_bytes(models[a]) + kv_cache_bytes(models[a], c))
                rows.append({"part": "speed", "arm": a, "context": c, "cache": "fp32",
                             "ms_per_token": str(ms_ci),
                             "MB_read_per_token": round(
                                 metrics[f"bytes_read_per_token_{a}_{c}"] / 1e6, 1),
                             "roofline_ms": round(1e3 * read / stats.median(bw), 3),
                             "roofline_ratio": str(roof_ci)})
            for a in ("gqa", "mqa"):
                sp = _ratio_ci(times["mha"], times[a])  # paired by round
                metrics.update(sp.metrics(f"{a}_speedup_cached_{c}"))
                if a == "mqa" and c == ctx_main:
                    decisions.append(sp.decide(
                        f"mqa_speedup_cached_{c}", 1.0, ">",
                        "MHA / MQA cached ms per token, paired by interleaved round"))
            del caches
        metrics["bandwidth_gb_per_s"] = stats.median(bandwidths) / 1e9
        del probe
        log(f"decoding: cached speed measured ({cfg.speed_rounds} rounds per context)")

        # Uncached: every token re-runs the whole context (what generate(use_cache=False)
        # does per step), interleaved with the cached MHA step so the ratio pairs by round.
        ids = torch.randint(0, vocab, (1, ctx_main), generator=torch.Generator().manual_seed(1))
        mha_cache = _filled_cache(models["mha"], StaticCache(ctx_main + growth), ctx_main)
        cases = {"cached_mha": _step_case(models["mha"], mha_cache, cfg.speed_steps)}
        for a in cfg.uncached_arms:
            cases[f"uncached_{a}"] = (lambda m=models[a]: m(ids, last_only=True))
        short = ids[:, :16]
        for a in cfg.uncached_arms:  # warm-up at a short length (the full one costs seconds)
            models[a](short, last_only=True)
        times = stats.interleaved_times(cases, repeat=cfg.uncached_rounds, warmup=0,
                                        clock=time.process_time)
        del mha_cache
        for a in cfg.uncached_arms:
            ms_ci = _mean_ci([1e3 * t for t in times[f"uncached_{a}"]])
            metrics.update(ms_ci.metrics(f"ms_per_token_uncached_{a}_{ctx_main}"))
            metrics.update(_tokens_per_s(ms_ci, f"tokens_per_s_uncached_{a}_{ctx_main}"))
        cached_ms = [t / cfg.speed_steps for t in times["cached_mha"]]
        sp = _ratio_ci(times["uncached_mha"], cached_ms)
        metrics.update(sp.metrics(f"kv_cache_speedup_mha_{ctx_main}"))
        decisions.append(sp.decide(f"kv_cache_speedup_mha_{ctx_main}", 1.0, ">",
                                   "uncached / cached MHA ms per token, paired by round"))
        log(f"decoding: uncached speed measured ({cfg.uncached_rounds} rounds)")

        # 8-bit vs fp32 cache, MQA, long context.
        c8 = cfg.int8_context
        mqa = models["mqa"]
        caches = {"fp32": _filled_cache(mqa, StaticCache(c8 + growth), c8),
                  "int8": _filled_cache(mqa, QuantizedCache(), c8)}
        times = stats.interleaved_times(
            {k: _step_case(mqa, v, cfg.speed_steps) for k, v in caches.items()},
            repeat=cfg.speed_rounds, warmup=1, clock=time.process_time)
        del caches
        for k in ("fp32", "int8"):
            ms_ci = _mean_ci([1e3 * t / cfg.speed_steps for t in times[k]])
            metrics.update(ms_ci.metrics(f"ms_per_token_mqa_{c8}_{k}"))
        metrics.update(_ratio_ci(times["int8"], times["fp32"]).metrics(
            f"int8_over_fp32_ms_mqa_{c8}"))
    for a in ARMS:
        metrics[f"kv_bytes_per_token_{a}"] = kv_bytes_per_token(models[a])
    metrics["kv_bytes_per_token_mqa_int8"] = kv_bytes_per_token(models["mqa"], torch.int8)
    for a in ("mha", "mqa"):
        metrics[f"weight_bytes_{a}"] = float(weight_bytes(models[a]))
    log("decoding: int8 cache speed measured")
    return metrics, decisions, rows


def _mean_ci(values) -> stats.CI:
    return stats.mean_ci(values, n_boot=N_BOOT)


def _ratio_ci(a, b) -> stats.CI:
    """``mean(a) / mean(b)``, paired by index (seed or interleaved round)."""
    return stats.ratio_ci(a, b, n_boot=N_BOOT)


def _tokens_per_s(ms: stats.CI, name: str) -> dict[str, float]:
    """Tokens per second from a ms-per-token interval (the bounds swap)."""
    def inv(x: float) -> float:
        return 1e3 / x if x > 0 else math.nan

    return {name: inv(ms.value), f"{name}_ci_low": inv(ms.high), f"{name}_ci_high": inv(ms.low)}


# ------------------------------------------------------------------------------- run


def _split(corpus: Corpus, seed: int) -> dict:
    """Train ids; the validation text halved: the first half scores the learning curves and
    stops the base's training, the second half ("test") gives every reported bits/char."""
    val = corpus.val_ids
    half = val.numel() // 2
    return {"train": corpus.train_ids, "stop": val[:half], "test": val[half:],
            "first_seed": seed}


def run_decoding(ctx: RunContext, cfg: DecodingConfig) -> Result:
    """The experiment at the sizes of ``cfg`` (see the module docstring)."""
    path = ctx.options.get("text")
    corpus: Corpus = load_text_file(path) if path else pydoc_corpus()
    tok = corpus.tokenizer
    seeds = ctx.seed_list(cfg.seeds_quick, cfg.seeds_full)
    split = _split(corpus, seeds[0])
    ctx.log(f"decoding: corpus {corpus.name}: {len(corpus.train_text)} train / "
            f"{len(corpus.val_text)} validation chars, vocab {tok.vocab_size}, seeds {seeds}")
    t0 = time.perf_counter()
    with stats.single_thread():  # small models: one thread is faster and steadier
        per_seed = stats.over_seeds(lambda s: _quality_seed(s, cfg, corpus, split), seeds,
                                    progress=ctx.progress, desc="decoding seeds")
    quality_s = time.perf_counter() - t0
    ctx.log(f"decoding: quality part {quality_s:.1f} s")

    metrics: dict[str, float] = {}
    decisions: list[Decision] = []
    table: list[dict] = []
    scalars = stats.stack_metrics([{k: v for k, v in r.items()
                                    if isinstance(v, (int, float))} for r in per_seed])
    for arm in ARMS:
        metrics.update(_mean_ci(scalars[f"bits_per_char_{arm}"]).metrics(
            f"bits_per_char_{arm}"))
    ratio = _ratio_ci(scalars["bits_per_char_mqa"], scalars["bits_per_char_mha"])
    metrics.update(ratio.metrics("mqa_bpc_ratio"))
    gqa = _ratio_ci(scalars["bits_per_char_gqa"], scalars["bits_per_char_mha"])
    metrics.update(gqa.metrics("gqa_bpc_ratio"))
    decisions.append(ratio.decide(
        "mqa_bpc_ratio", 1.0 + MAX_RELATIVE_BPC_LOSS, "<",
        "MQA / MHA validation bits/char, trained from scratch alike, paired by seed"))
    decisions.append(gqa.decide(
        "gqa_bpc_ratio", 1.0 + MAX_RELATIVE_BPC_LOSS, "<",
        "GQA / MHA validation bits/char, trained from scratch alike, paired by seed"))
    metrics.update(_mean_ci(scalars["bits_per_char_mqa_int8"]).metrics(
        "bits_per_char_mqa_int8"))
    metrics["bits_per_char_mqa_cached_fp32"] = float(
        scalars["bits_per_char_mqa_cached_fp32"].mean())
    int8 = _ratio_ci(scalars["bits_per_char_mqa_int8"],
                          scalars["bits_per_char_mqa_cached_fp32"])
    metrics.update(int8.metrics("mqa_int8_bpc_ratio"))
    decisions.append(int8.decide(
        "mqa_int8_bpc_ratio", 1.0 + MAX_RELATIVE_BPC_LOSS_INT8, "<",
        "MQA bits/char decoded through the 8-bit cache / through the fp32 cache, per seed"))
    for arm in ARMS:
        metrics[f"train_cpu_seconds_{arm}"] = float(scalars[f"train_cpu_seconds_{arm}"].mean())
        table.append({"part": "quality", "arm": arm, "kv_heads": _kv_heads(cfg, arm),
                      "steps": cfg.steps, "bits_per_char": str(_mean_ci(
                          scalars[f"bits_per_char_{arm}"])),
                      "per_seed": [round(float(x), 4) for x in scalars[f"bits_per_char_{arm}"]]})
    plateau = _plateau_summary(per_seed, cfg)
    metrics.update(plateau)
    if cfg.curve:
        metrics.update(_mean_ci(scalars["bits_per_char_mha_base"]).metrics(
            "bits_per_char_mha_base"))
        metrics["base_steps"] = float(scalars["base_steps"].mean())
        metrics["base_reached_plateau_fraction"] = float(scalars["base_reached_plateau"].mean())
        for pct in cfg.uptrain_pcts:
            name = f"bits_per_char_mqa_uptrained_{_pct_name(pct)}"
            metrics.update(_mean_ci(scalars[name]).metrics(name))
            metrics.update(_ratio_ci(scalars[name], scalars["bits_per_char_mha_base"])
                           .metrics(f"mqa_uptrained_{_pct_name(pct)}_bpc_ratio"))

    speed, speed_decisions, speed_rows = _speed(cfg, tok.vocab_size, ctx.log)
    metrics.update(speed)
    decisions.extend(speed_decisions)
    table.extend(speed_rows)
    metrics["quality_seconds"] = quality_s

    figures = _plot(ctx, cfg, metrics, per_seed)
    notes = _notes(cfg, metrics, per_seed, corpus, seeds, decisions)
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    return Result(metrics=metrics, decisions=decisions, seeds=len(seeds), table=table,
                  figures=figures, notes=notes,
                  params=params | {"corpus": corpus.name, "seeds_list": seeds})


def _plateau_summary(per_seed: list[dict], cfg: DecodingConfig) -> dict[str, float]:
    """How far the arms are from a plateau (mean over seeds): the relative fall of validation
    bits/char over the last quarter of the steps, and the share of the whole logged fall (first
    curve point to the end) that came in that last quarter."""
    out = {}
    for arm in ARMS:
        late, share = [], []
        for r in per_seed:
            steps, bpc = zip(*r["curves"][arm])
            q3 = min(range(len(steps)), key=lambda i: abs(steps[i] - 0.75 * cfg.steps))
            late.append((bpc[q3] - bpc[-1]) / bpc[q3])
            total = bpc[0] - bpc[-1]
            share.append((bpc[q3] - bpc[-1]) / total if total > 0 else math.nan)
        out[f"val_bpc_rel_drop_last_quarter_{arm}"] = float(sum(late) / len(late))
        out[f"val_bpc_last_quarter_share_{arm}"] = float(sum(share) / len(share))
    return out


def _notes(cfg: DecodingConfig, m: dict, per_seed: list[dict], corpus: Corpus,
           seeds: list[int], decisions: list[Decision]) -> str:
    c, c8 = cfg.speed_context, cfg.int8_context
    lines = [
        f"Regime. Quality: character LMs (dim {cfg.dim}, {cfg.depth} layers, {cfg.num_heads} "
        f"heads; GQA {cfg.gqa_heads} KV heads, MQA 1) trained from scratch for {cfg.steps} "
        f"steps of {cfg.batch}x{cfg.seq_len} characters on {corpus.name}, same batches and "
        f"initial seed per arm, seeds {seeds}; bits/char on the second half of the validation "
        f"text (the first half, other topics and harder for these models, draws the learning "
        f"curves on {cfg.log_chars} characters). How far from a plateau: over the "
        f"last quarter of training validation bits/char still fell "
        f"{100 * m['val_bpc_rel_drop_last_quarter_mha']:.1f}% (MHA), "
        f"{100 * m['val_bpc_rel_drop_last_quarter_mqa']:.1f}% (MQA), "
        f"{100 * m['val_bpc_last_quarter_share_mha']:.0f}% (MHA) of the fall from the first "
        f"curve point (step {cfg.log_every}) to the end. The arms train for a fixed step "
        f"budget, not to a plateau: the steep start of the loss curve is behind them, the "
        f"curve is still falling.",
        "Published anchors: Shazeer (2019) trains MQA from scratch and finds quality about "
        "equal to MHA with much faster incremental decoding; Ainslie et al. (2023, GQA) "
        "convert a converged MHA checkpoint by mean-pooling K/V heads and recover quality by "
        "uptraining with ~5% of the pretraining compute.",
        f"Quality: bits/char MHA {_ci(m, 'bits_per_char_mha')}, GQA "
        f"{_ci(m, 'bits_per_char_gqa')}, MQA {_ci(m, 'bits_per_char_mqa')}; MQA/MHA "
        f"{_ci(m, 'mqa_bpc_ratio')} (claim: < {1 + MAX_RELATIVE_BPC_LOSS:g}).",
        f"8-bit KV cache (KIVI-style, key groups of {cfg.int8_group_size} positions for these "
        f"{cfg.seq_len}-character windows): MQA bits/char decoded through it "
        f"{_ci(m, 'bits_per_char_mqa_int8')} vs {m['bits_per_char_mqa_cached_fp32']:.4f} "
        f"through the fp32 cache, ratio {_ci(m, 'mqa_int8_bpc_ratio', '.5f')} (claim: < "
        f"{1 + MAX_RELATIVE_BPC_LOSS_INT8:g}).",
    ]
    if cfg.curve:
        pts = ", ".join(f"{p:g}%: {_ci(m, 'bits_per_char_mqa_uptrained_' + _pct_name(p))}"
                        for p in cfg.uptrain_pcts)
        lines.append(
            f"Uptraining curve: MHA bases trained until validation improved < "
            f"{100 * cfg.base_min_rel_gain:g}% for {cfg.base_patience} evaluations in a row "
            f"(mean {m['base_steps']:.0f} steps, {100 * m['base_reached_plateau_fraction']:.0f}% "
            f"stopped before the {cfg.base_max_steps}-step cap; its cosine schedule spans the "
            f"cap, so a base stopped earlier still had a high learning rate), base bits/char "
            f"{_ci(m, 'bits_per_char_mha_base')}; converted to MQA and uptrained for a share of "
            f"the base's steps: {pts}; from-scratch MQA {_ci(m, 'bits_per_char_mqa')}.")
    lines += [
        f"Speed: random weights, dim {cfg.speed_dim}, {cfg.speed_depth} layers, "
        f"{cfg.speed_heads} heads (GQA {cfg.speed_gqa_heads} KV heads), context {c}, caches "
        f"filled with random keys/values (no prefill to pay for), batch 1, one thread, CPU "
        f"time (time.process_time), {cfg.speed_rounds} interleaved rounds of "
        f"{cfg.speed_steps} steps (uncached: {cfg.uncached_rounds} rounds, arms "
        f"{', '.join(cfg.uncached_arms)}). A cached step reads "
        f"{m[f'bytes_read_per_token_mha_{c}'] / 1e6:.0f} MB (MHA) / "
        f"{m[f'bytes_read_per_token_mqa_{c}'] / 1e6:.0f} MB (MQA) of weights and cache: "
        f"at the 768-wide size per-step fixed costs (Python and dispatch, a fraction of a "
        f"millisecond) are small against the step. ms/token cached MHA "
        f"{_ci(m, f'ms_per_token_cached_mha_{c}')}, GQA {_ci(m, f'ms_per_token_cached_gqa_{c}')},"
        f" MQA {_ci(m, f'ms_per_token_cached_mqa_{c}')}; uncached MHA "
        f"{_ci(m, f'ms_per_token_uncached_mha_{c}')}. Roofline = bytes read / read "
        f"bandwidth, the bandwidth measured in the same interleaved rounds and CPU clock as a "
        f"one-thread sum over {cfg.bandwidth_mb} MB (median {m['bandwidth_gb_per_s']:.1f} "
        f"GB/s; a ratio below 1 means the decoding kernels read faster than that sum): ratio "
        f"MHA {_ci(m, f'roofline_ratio_mha_{c}')}, MQA "
        f"{_ci(m, f'roofline_ratio_mqa_{c}')}. KV bytes per token: MHA "
        f"{m['kv_bytes_per_token_mha']:.0f}, GQA {m['kv_bytes_per_token_gqa']:.0f}, MQA "
        f"{m['kv_bytes_per_token_mqa']:.0f}, MQA 8-bit {m['kv_bytes_per_token_mqa_int8']:.0f} "
        f"(key groups of 64, scales included).",
        f"MQA at context {c8}: {_ci(m, f'ms_per_token_mqa_{c8}_int8')} ms/token with the 8-bit "
        f"cache vs {_ci(m, f'ms_per_token_mqa_{c8}_fp32')} with fp32 (ratio "
        f"{_ci(m, f'int8_over_fp32_ms_mqa_{c8}')}): at this width the weights "
        f"({m['weight_bytes_mqa'] / 1e6:.0f} MB) dominate the bytes of an MQA step (the fp32 "
        f"cache adds {m['kv_bytes_per_token_mqa'] * c8 / 1e6:.0f} MB), so a smaller cache "
        f"can save little, and dequantising it every step costs work.",
        "Decisions: " + "; ".join(d.explanation() for d in decisions) + ".",
    ]
    sample = per_seed[0].get("sample")
    if sample is not None:
        lines.append(f"MQA sample (seed {seeds[0]}, T=0.8, top-k 20): {sample!r}")
    return "\n".join(lines)


def _ci(m: dict, name: str, fmt: str = ".4g") -> str:
    return f"{m[name]:{fmt}} [{m[name + '_ci_low']:{fmt}}, {m[name + '_ci_high']:{fmt}}]"


def _plot(ctx: RunContext, cfg: DecodingConfig, m: dict, per_seed: list[dict]) -> list[str]:
    plt = ctx.pyplot()
    if plt is None:
        return []
    c = cfg.speed_context
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    # bits/char per arm with CIs; the axis starts near the values (they are close)
    vals = [m[f"bits_per_char_{a}"] for a in ARMS]
    err = [[m[f"bits_per_char_{a}"] - m[f"bits_per_char_{a}_ci_low"] for a in ARMS],
           [m[f"bits_per_char_{a}_ci_high"] - m[f"bits_per_char_{a}"] for a in ARMS]]
    ax[0].bar(ARMS, vals, yerr=err, capsize=6, color=["C0", "C1", "C2"])
    for i, a in enumerate(ARMS):
        ax[0].plot([i] * len(per_seed), [r[f"bits_per_char_{a}"] for r in per_seed], "k.",
                   ms=5)
    lo = min(m[f"bits_per_char_{a}_ci_low"] for a in ARMS)
    hi = max(m[f"bits_per_char_{a}_ci_high"] for a in ARMS)
    ax[0].set_ylim(lo - 0.3 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
    ax[0].set_ylabel("validation bits / char (mean, 95% CI; dots: seeds)")
    ax[0].set_title(f"From scratch, {cfg.steps} steps: MQA/MHA = "
                    f"{m['mqa_bpc_ratio']:.3f} [{m['mqa_bpc_ratio_ci_low']:.3f}, "
                    f"{m['mqa_bpc_ratio_ci_high']:.3f}]", fontsize=9)
    for i, a in enumerate(ARMS):
        for j, r in enumerate(per_seed):
            steps, bpc = zip(*r["curves"][a])
            ax[1].plot(steps, bpc, color=f"C{i}", alpha=0.7, label=a if j == 0 else None)
    ax[1].set_xlabel("training step")
    ax[1].set_ylabel("validation bits / char")
    ax[1].set_title("Learning curves (one line per seed)", fontsize=9)
    ax[1].legend()
    x = list(range(len(ARMS)))
    ms = [m[f"ms_per_token_cached_{a}_{c}"] for a in ARMS]
    ms_err = [[m[f"ms_per_token_cached_{a}_{c}"] - m[f"ms_per_token_cached_{a}_{c}_ci_low"]
               for a in ARMS],
              [m[f"ms_per_token_cached_{a}_{c}_ci_high"] - m[f"ms_per_token_cached_{a}_{c}"]
               for a in ARMS]]
    ax[2].bar(x, ms, yerr=ms_err, capsize=6, color=["C0", "C1", "C2"], label="measured")
    roof = [m[f"ms_per_token_cached_{a}_{c}"] / m[f"roofline_ratio_{a}_{c}"] for a in ARMS]
    ax[2].plot(x, roof, "k_", ms=30, mew=2, label="bandwidth roofline")
    ax[2].set_xticks(list(x), ARMS)
    ax[2].set_ylabel("ms per token (cached, CPU time, 95% CI)")
    ax[2].set_title(f"Decoding step, {cfg.speed_dim} wide x {cfg.speed_depth}, context {c}; "
                    f"uncached MHA {m[f'ms_per_token_uncached_mha_{c}']:.0f} ms", fontsize=9)
    ax[2].legend(fontsize=8)
    figures = [ctx.save_figure(fig, "decoding.png")]
    if cfg.curve:
        figures.append(_plot_curve(ctx, plt, cfg, m))
    return figures


def _plot_curve(ctx: RunContext, plt: Any, cfg: DecodingConfig, m: dict) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.6))
    pcts = list(cfg.uptrain_pcts)
    names = [f"bits_per_char_mqa_uptrained_{_pct_name(p)}" for p in pcts]
    y = [m[n] for n in names]
    err = [[m[n] - m[n + "_ci_low"] for n in names], [m[n + "_ci_high"] - m[n] for n in names]]
    ax.errorbar(pcts, y, yerr=err, fmt="-o", capsize=5, label="MHA base -> MQA, uptrained")
    for name, label, color in (("bits_per_char_mqa", f"MQA from scratch ({cfg.steps} steps)",
                                "C2"),
                               ("bits_per_char_mha_base", "MHA base (plateau)", "C0")):
        ax.axhline(m[name], color=color, ls="--", label=label)
        ax.axhspan(m[name + "_ci_low"], m[name + "_ci_high"], color=color, alpha=0.15)
    ax.set_xlabel("uptraining steps, % of the base's pretraining steps")
    ax.set_ylabel("validation bits / char (95% CI)")
    ax.set_title("Uptraining a mean-pooled MQA conversion", fontsize=10)
    ax.legend(fontsize=8)
    return ctx.save_figure(fig, "decoding_uptraining.png")


def run(ctx: RunContext) -> Result:
    return run_decoding(ctx, DecodingConfig.quick() if ctx.quick else DecodingConfig())


EXPERIMENT = Experiment(
    name="decoding",
    claim=("Multi-query (and grouped-query) attention trained from scratch loses at most "
           f"{MAX_RELATIVE_BPC_LOSS:.0%} in validation bits per character against multi-head "
           "attention trained alike, an 8-bit KV cache at most "
           f"{MAX_RELATIVE_BPC_LOSS_INT8:.0%} against the fp32 cache, and both the KV cache and "
           "multi-query attention speed up autoregressive decoding where it is bandwidth-bound."),
    run=run,
    options=(Option("--text", type=existing_file, default=None,
                    help="UTF-8 text file to train on (default: Python's pydoc topics)"),),
    description="MHA/GQA/MQA from scratch and uptrained, KV caches (fp32, 8-bit), decoding speed.",
)

__all__ = ["DecodingConfig", "EXPERIMENT", "bits_per_char", "run_decoding"]

