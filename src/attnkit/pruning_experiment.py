"""The ``pruning`` experiment: how many attention heads can go (Michel et al. 2019).

Why this module sits here, beside :mod:`attnkit.pruning`, and not in an application: it
studies the model-agnostic tools (head importance, physical head removal, FLOP counting) on two
applications' models, the digits ViT (:mod:`attnkit.vision`) and the character LM
(:mod:`attnkit.lm`). An application never imports another, so the experiment cannot live in
either of them. (It used to be ``attnkit.lm.pruning_experiment``; nothing imported that path
but the registry, so no alias is kept.)

Design:

* **Headline: the digits ViT** (embedded 8x8 handwritten digits, patches of 2x2 = 16 tokens)
  widened to 4 layers x 8 heads, trained **to a plateau**: AdamW with a short warm-up, the
  validation accuracy (20% of the training images, held out) checked after every epoch,
  the learning rate dropped tenfold when it has not improved for ``patience`` epochs, training
  stopped at the next such plateau (or at the epoch cap) and the best epoch's weights kept.
  Quality = test accuracy in percent, so "1 point" is one percentage point, as in Michel et
  al.
* **Second curve: the character LM** (:class:`attnkit.lm.DecoderLM`, pydoc topics), a fixed
  number of training steps; quality = validation bits per character, "1 point" = 0.05 bits/char.
* **Curves**: quality vs fraction of heads removed, by importance (expected ``|d loss / d
  gate|`` per head over training batches, normalised per layer, recomputed after every
  removal: :func:`attnkit.pruning.iterative_prune`) and by random order
  (:func:`attnkit.pruning.random_prune_order`, several orders per seed, averaged). No
  fine-tuning after pruning. Every layer keeps one head. ``ctx.seed_list()`` seeds (training,
  importance batches and random orders all follow the seed); bands are bootstrap CIs of the
  mean over seeds. The ViT is also pruned at an early checkpoint (half the epochs to its best
  epoch): Michel et al. report that importance sharpens as training proceeds.
* **At the largest fraction within 1 point** (per seed, importance order): counted FLOPs ratio
  and parameter ratio of the physically pruned model, and its latency ratio, the two models
  timed interleaved (:func:`attnkit.experiment.stats.interleaved_times`) on one thread with the
  process's CPU clock, i.e. the latency an idle core would see, robust to other processes.
  ``attention_flop_share_unpruned`` says how much of the model attention is at all (the most
  that removing heads can save).

Verdict (Decision CIs, three-valued): the mean over seeds of the ViT's largest fraction within
1 point must lie above 25% (whole CI), and importance order must beat random order in that
fraction (paired by seed, CI of the difference above 0).
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .argtypes import existing_file
from .experiment import Experiment, Option, Result, RunContext, stats
from .flops import attention_flop_share, count
from .lm.experiment import bits_per_char
from .lm.model import DecoderLM
from .lm.text import Corpus, load_text_file, pydoc_corpus
from .lm.training import train_lm
from .nn.attention import attention_layers
from .pruning import (
    PruneStep,
    gated_curve,
    iterative_prune,
    lm_loss,
    random_prune_order,
    replay_prune,
)
from .vision.data import load_digits
from .vision.model import ViT

#: "1 point" for the ViT: one percentage point of test accuracy (Michel et al. 2019).
TOLERANCE_ACC = 1.0
#: "1 point" for the character LM: this many bits per character above the unpruned model.
TOLERANCE_BPC = 0.05
#: The claim: more than this fraction of heads can go within 1 point.
MIN_FRACTION = 0.25


def _settings(quick: bool) -> dict:
    # step_heads: heads removed per importance step (quick: 2, so the 16-point curve costs half)
    vit = dict(dim=32, depth=4, num_heads=8, patch_size=2, batch=64, lr=3e-3,
               weight_decay=0.05, warmup_epochs=1, max_epochs=45, patience=5, lr_drops=1,
               val_fraction=0.2, importance_images=512, random_orders=2, step_heads=2,
               latency_repeats=9)
    lm = dict(dim=64, depth=2, num_heads=8, seq_len=64, batch=16, steps=250,
              importance_batches=4, eval_chars=8192, random_orders=2, step_heads=2)
    if not quick:
        vit.update(dim=64, max_epochs=200, patience=10, lr_drops=2, importance_images=1024,
                   random_orders=20, step_heads=1, latency_repeats=21)
        lm.update(dim=192, depth=4, num_heads=8, seq_len=128, batch=32, steps=2000,
                  importance_batches=16, eval_chars=65536, random_orders=10, step_heads=1)
    return {"vit": vit, "lm": lm}


# ------------------------------------------------------------------------------ ViT


def _vit_data(val_fraction: float) -> dict[str, Tensor]:
    """Digits: the embedded train split cut into train / validation (a fixed permutation, the
    same for every seed), and the embedded test split."""
    x, y = (torch.from_numpy(a) for a in load_digits("train"))
    xt, yt = (torch.from_numpy(a) for a in load_digits("test"))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_val = int(round(val_fraction * len(x)))
    val, tr = perm[:n_val], perm[n_val:]
    return {"x": x[tr], "y": y[tr], "x_val": x[val], "y_val": y[val], "x_test": xt, "y_test": yt}


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy in percent of ``model(x (N, C, H, W))`` logits against ``y (N,)``."""
    model.eval()
    return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy of ``model(images)`` against labels, for :func:`head_importance`."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def train_to_plateau(model: nn.Module, data: dict[str, Tensor], s: dict, seed: int,
                     ) -> tuple[nn.Module, dict]:
    """Train a classifier until its validation accuracy stops improving.

    AdamW at ``s["lr"]`` after a linear warm-up of ``s["warmup_epochs"]``; the validation
    accuracy is measured after every epoch. After ``s["patience"]`` epochs without a new best
    the learning rate drops tenfold (``s["lr_drops"]`` times, as ReduceLROnPlateau does); after
    the next such plateau, or at ``s["max_epochs"]``, training stops and the model keeps its
    best epoch's weights. Returns the model and ``{"epochs", "best_epoch", "val_accuracy",
    "states"}`` (``states[e]``: the weights after epoch ``e + 1``, for earlier checkpoints).
    """
    x, y = data["x"], data["y"]
    per_epoch = math.ceil(len(x) / s["batch"])
    warmup = max(1, s["warmup_epochs"] * per_epoch)
    scale = [1.0]  # the plateau drops; read by the schedule at every step
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: scale[0] * min(1.0, (t + 1) / warmup))
    gen = torch.Generator().manual_seed(seed)
    best, best_epoch, since, drops, states = -1.0, 0, 0, 0, []
    epoch = 0
    for epoch in range(1, s["max_epochs"] + 1):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), s["batch"]):
            idx = perm[i:i + s["batch"]]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        states.append(copy.deepcopy(model.state_dict()))
        acc = accuracy(model, data["x_val"], data["y_val"])
        if acc > best:
            best, best_epoch, since = acc, epoch, 0
            continue
        since += 1
        if since >= s["patience"]:
            if drops >= s["lr_drops"]:
                break
            drops, since = drops + 1, 0
            scale[0] *= 0.1
    model.load_state_dict(states[best_epoch - 1])
    model.eval()
    return model, {"epochs": epoch, "best_epoch": best_epoch, "val_accuracy": best,
                   "states": states}


def _importance_batches(data: dict[str, Tensor], n: int, seed: int, batch: int = 256) -> list:
    """``n`` training images (never validation or test) in batches, chosen by ``seed``."""
    idx = torch.randperm(len(data["x"]), generator=torch.Generator().manual_seed(seed + 7))[:n]
    return [(data["x"][idx[i:i + batch]], data["y"][idx[i:i + batch]])
            for i in range(0, len(idx), batch)]


# ------------------------------------------------------------------------------ shared


def largest_within(curve: list[tuple[float, float]], tolerance: float, higher_is_better: bool
                   ) -> int:
    """Index of the largest pruned fraction whose quality is within ``tolerance`` of the
    unpruned model (``curve[0]``); ``curve`` is ``[(fraction, quality), ...]``."""
    base = curve[0][1]
    ok = [i for i, (_, q) in enumerate(curve)
          if (q >= base - tolerance if higher_is_better else q <= base + tolerance)]
    return max(ok, key=lambda i: curve[i][0])


def _prune_both_ways(model: nn.Module, batches: list, evaluate, loss_fn, flop_inputs: tuple,
                     orders: int, seed: int, tolerance: float, higher: bool,
                     step_heads: int) -> dict:
    """Importance curve (iterative, ``step_heads`` heads per step) and random-order curves of
    ``model`` (multi-head attention: one head per key/value group) on the same fractions.

    Returns fractions, the importance curve, the mean random curve, the history of
    :class:`PruneStep` and the largest fractions within ``tolerance`` (importance; random:
    the mean over orders of each order's largest fraction).
    """
    layers = attention_layers(model)
    if any(m.num_kv_heads != m.num_heads for m in layers):
        raise ValueError("the experiment's curves assume multi-head attention (one head per "
                         "key/value group)")
    total = sum(m.num_heads for m in layers)
    history: list[PruneStep] = iterative_prune(
        copy.deepcopy(model), batches, evaluate, step_heads / total, flop_inputs=flop_inputs,
        loss_fn=loss_fn)
    imp = [(h.fraction_pruned, h.metric) for h in history]
    counts = [total - h.heads for h in history]  # the random curves use the same fractions
    gen = torch.Generator().manual_seed(seed + 11)
    rand_curves, rand_best = [], []
    for _ in range(orders):
        curve = [(k / total, q) for k, q in
                 gated_curve(model, random_prune_order(model, gen), evaluate, counts)]
        rand_curves.append([q for _, q in curve])
        rand_best.append(curve[largest_within(curve, tolerance, higher)][0])
    best = largest_within(imp, tolerance, higher)
    return {"fractions": [f for f, _ in imp], "importance": [q for _, q in imp],
            "random": list(np.mean(rand_curves, axis=0)), "history": history,
            "best_step": history[best].step, "best_fraction": imp[best][0],
            "best_fraction_random": float(np.mean(rand_best))}


def _vit_seed(seed: int, s: dict, data: dict[str, Tensor]) -> dict:
    torch.manual_seed(seed)
    model = ViT(8, s["patch_size"], 1, 10, s["dim"], s["depth"], s["num_heads"])
    t0 = time.perf_counter()
    model, info = train_to_plateau(model, data, s, seed)
    train_s = time.perf_counter() - t0
    xt, yt = data["x_test"], data["y_test"]

    def evaluate(m: nn.Module) -> float:
        return accuracy(m, xt, yt)

    batches = _importance_batches(data, s["importance_images"], seed)
    out = _prune_both_ways(model, batches, evaluate, classification_loss, (xt,),
                           s["random_orders"], seed, TOLERANCE_ACC, True, s["step_heads"])
    # An early checkpoint: half way to the best epoch.
    early_epoch = max(1, round(info["best_epoch"] / 2))
    early = copy.deepcopy(model)
    early.load_state_dict(info["states"][early_epoch - 1])
    early.eval()
    out_early = _prune_both_ways(early, batches, evaluate, classification_loss, (xt,),
                                 1, seed, TOLERANCE_ACC, True, s["step_heads"])

    history, base = out["history"], out["history"][0]
    best = next(h for h in history if h.step == out["best_step"])
    pruned = replay_prune(model, history, best.step)
    if count(pruned, xt).total != best.flops:
        raise RuntimeError("replayed pruned ViT does not match the recorded step")
    with torch.no_grad():
        times = stats.interleaved_times(
            {"unpruned": lambda: model(xt), "pruned": lambda: pruned(xt)},
            repeat=s["latency_repeats"], clock=time.process_time)
    share, core_share = attention_flop_share(model, xt)
    return {
        **out, "early": out_early, "early_epoch": early_epoch, "train_s": train_s,
        "epochs": info["epochs"], "best_epoch": info["best_epoch"],
        "val_accuracy": info["val_accuracy"],
        "flops_ratio": best.flops / base.flops, "params_ratio": best.params / base.params,
        "latency_ratio": stats.median(times["pruned"]) / stats.median(times["unpruned"]),
        "latency_ms_unpruned": 1e3 * stats.median(times["unpruned"]),
        "attention_share": share, "attention_core_share": core_share,
        "flops_ratio_fully_pruned": history[-1].flops / base.flops,
    }


# ------------------------------------------------------------------------------ LM


def _lm_seed(seed: int, s: dict, corpus: Corpus) -> dict:
    torch.manual_seed(seed)
    train_ids, val_ids = corpus.train_ids, corpus.val_ids
    model = DecoderLM(corpus.tokenizer.vocab_size, s["dim"], s["depth"], s["num_heads"],
                      max_seq_len=s["seq_len"] + 1)
    t0 = time.perf_counter()
    train_lm(model, train_ids, s["steps"], batch_size=s["batch"], seq_len=s["seq_len"],
             seed=seed)
    train_s = time.perf_counter() - t0
    # Importance batches come from the training text (never the validation text).
    gen = torch.Generator().manual_seed(seed + 1)
    offsets = torch.arange(s["seq_len"] + 1)
    batches = [train_ids[torch.randint(0, train_ids.numel() - s["seq_len"] - 1,
                                       (s["batch"], 1), generator=gen) + offsets]
               for _ in range(s["importance_batches"])]
    flop_ids = val_ids[: 8 * s["seq_len"]].view(8, -1)

    def evaluate(m: nn.Module) -> float:
        return bits_per_char(m, val_ids, s["seq_len"], s["eval_chars"])

    out = _prune_both_ways(model, batches, evaluate, lm_loss, (flop_ids,), s["random_orders"],
                           seed, TOLERANCE_BPC, False, s["step_heads"])
    history = out["history"]
    best = next(h for h in history if h.step == out["best_step"])
    share, core_share = attention_flop_share(model, flop_ids)
    return {**out, "train_s": train_s, "flops_ratio": best.flops / history[0].flops,
            "params_ratio": best.params / history[0].params, "attention_share": share,
            "attention_core_share": core_share}


# ------------------------------------------------------------------------------ run


def _curve_cis(per_seed: list[list[float]]) -> list[stats.CI]:
    """Per fraction: the mean over seeds with its bootstrap interval."""
    return [stats.mean_ci(col) for col in np.asarray(per_seed, dtype=np.float64).T]


def run(ctx: RunContext) -> Result:
    s = _settings(ctx.quick)
    seeds = ctx.seed_list()
    data = _vit_data(s["vit"]["val_fraction"])
    path = ctx.options.get("text")
    corpus: Corpus = load_text_file(path) if path else pydoc_corpus()
    # Small models: one thread is faster and steadier than two fighting on a shared CPU.
    with stats.single_thread():
        vit = stats.over_seeds(lambda sd: _vit_seed(sd, s["vit"], data), seeds,
                               progress=ctx.progress, desc="pruning: ViT seeds")
        ctx.log("pruning: ViT best epochs " + ", ".join(str(r["best_epoch"]) for r in vit)
                + "; train s " + ", ".join(f"{r['train_s']:.1f}" for r in vit))
        lm = stats.over_seeds(lambda sd: _lm_seed(sd, s["lm"], corpus), seeds,
                              progress=ctx.progress, desc="pruning: LM seeds")

    def col(runs: list[dict], key: str) -> list[float]:
        return [float(r[key]) for r in runs]

    frac = stats.mean_ci(col(vit, "best_fraction"))
    frac_rand = stats.mean_ci(col(vit, "best_fraction_random"))
    gain = stats.paired_diff_ci(col(vit, "best_fraction"), col(vit, "best_fraction_random"))
    flops = stats.mean_ci(col(vit, "flops_ratio"))
    params = stats.mean_ci(col(vit, "params_ratio"))
    latency = stats.mean_ci(col(vit, "latency_ratio"))
    early = stats.mean_ci([r["early"]["best_fraction"] for r in vit])
    base_acc = stats.mean_ci([r["importance"][0] for r in vit])
    early_acc = stats.mean_ci([r["early"]["importance"][0] for r in vit])
    lm_frac = stats.mean_ci(col(lm, "best_fraction"))
    lm_frac_rand = stats.mean_ci(col(lm, "best_fraction_random"))
    lm_gain = stats.paired_diff_ci(col(lm, "best_fraction"), col(lm, "best_fraction_random"))
    lm_flops = stats.mean_ci(col(lm, "flops_ratio"))
    lm_bpc = stats.mean_ci([r["importance"][0] for r in lm])
    share = float(np.mean(col(vit, "attention_share")))
    lm_share = float(np.mean(col(lm, "attention_share")))

    decisions = [
        frac.decide("max_fraction_pruned_within_1pt", MIN_FRACTION, ">",
                    note=f"ViT, mean over seeds of the largest fraction of heads removed (by "
                         f"importance) within {TOLERANCE_ACC:g} accuracy point"),
        gain.decide("importance_minus_random_fraction", 0.0, ">",
                    note="ViT, paired by seed: importance order minus random order"),
    ]
    heads_total = vit[0]["history"][0].heads
    metrics = {
        "heads_total": float(heads_total),
        **frac.metrics("max_fraction_pruned_within_1pt"),
        **frac_rand.metrics("max_fraction_pruned_within_1pt_random"),
        **gain.metrics("importance_minus_random_fraction"),
        **flops.metrics("flops_ratio_at_that_point"),
        **params.metrics("params_ratio_at_that_point"),
        **latency.metrics("latency_ratio_at_that_point"),
        "attention_flop_share_unpruned": share,
        "attention_core_flop_share_unpruned": float(np.mean(col(vit, "attention_core_share"))),
        "flops_ratio_fully_pruned": float(np.mean(col(vit, "flops_ratio_fully_pruned"))),
        **base_acc.metrics("accuracy_unpruned"),
        "epochs_to_best": float(np.mean(col(vit, "best_epoch"))),
        "epochs_run": float(np.mean(col(vit, "epochs"))),
        "latency_ms_unpruned": float(np.mean(col(vit, "latency_ms_unpruned"))),
        **early.metrics("max_fraction_pruned_within_1pt_early"),
        **early_acc.metrics("accuracy_unpruned_early"),
        "lm_heads_total": float(lm[0]["history"][0].heads),
        **lm_frac.metrics("lm_max_fraction_pruned_within_1pt"),
        **lm_frac_rand.metrics("lm_max_fraction_pruned_within_1pt_random"),
        **lm_gain.metrics("lm_importance_minus_random_fraction"),
        **lm_flops.metrics("lm_flops_ratio_at_that_point"),
        "lm_params_ratio_at_that_point": float(np.mean(col(lm, "params_ratio"))),
        **lm_bpc.metrics("lm_bits_per_char_unpruned"),
        "lm_attention_flop_share_unpruned": lm_share,
        "vit_train_seconds": float(np.mean(col(vit, "train_s"))),
        "lm_train_seconds": float(np.mean(col(lm, "train_s"))),
    }

    table = []
    for model_name, runs, quality in (("vit", vit, "accuracy_pct"), ("lm", lm, "bits_per_char")):
        curves = {"importance": [r["importance"] for r in runs],
                  "random": [r["random"] for r in runs]}
        if model_name == "vit":
            curves["importance_early"] = [r["early"]["importance"] for r in runs]
        for ranking, per_seed in curves.items():
            for f, ci in zip(runs[0]["fractions"], _curve_cis(per_seed)):
                table.append({"model": model_name, "ranking": ranking,
                              "fraction_pruned": round(f, 4), quality: round(ci.value, 4),
                              "ci_low": round(ci.low, 4), "ci_high": round(ci.high, 4)})
    figures = _plot(ctx, vit, lm)
    sv, sl = s["vit"], s["lm"]
    notes = (
        f"Headline: ViT {sv['depth']} layers x {sv['num_heads']} heads, width {sv['dim']}, on "
        f"the embedded 8x8 digits (16 patches), trained to a plateau (best of "
        f"{metrics['epochs_to_best']:.1f} epochs on average, patience {sv['patience']}, cap "
        f"{sv['max_epochs']}), test accuracy {base_acc}%. Heads removed by Michel et al. "
        f"importance (recomputed after each head, {sv['importance_images']} training images) "
        f"keep accuracy within {TOLERANCE_ACC:g} point up to {frac} of the {heads_total} heads; "
        f"a random order up to {frac_rand} (difference {gain}). At that point: FLOPs ratio "
        f"{flops}, parameter ratio {params}, latency ratio {latency} (interleaved, one thread, "
        f"CPU clock, {sv['latency_repeats']} rounds, full test set of 359 images per pass). "
        f"Attention (q/k/v/out projections + core) is {share:.0%} of the ViT's counted FLOPs "
        f"(core alone {metrics['attention_core_flop_share_unpruned']:.0%}), so removing heads "
        f"can cut at most that; every layer keeps one head (fully pruned FLOPs ratio "
        f"{metrics['flops_ratio_fully_pruned']:.3f}). Early checkpoint (half the epochs "
        f"to the best one, accuracy {early_acc}%): {early} within 1 point. "
        f"Second curve: char LM {sl['depth']}x{sl['num_heads']} heads, width {sl['dim']}, "
        f"{sl['steps']} steps on {corpus.name} (a fixed budget, not a plateau; in quick mode "
        f"far from converged), {lm_bpc} bits/char; within {TOLERANCE_BPC} "
        f"bits/char up to {lm_frac} by importance, {lm_frac_rand} at random (difference "
        f"{lm_gain}); FLOPs ratio {lm_flops}; attention is {lm_share:.0%} of its FLOPs. "
        f"No fine-tuning after pruning. {len(seeds)} seeds; CIs: 95% bootstrap over seeds."
    )
    return Result(metrics=metrics, decisions=decisions, seeds=len(seeds), table=table,
                  figures=figures, notes=notes,
                  params={"vit": sv, "lm": sl, "corpus": corpus.name,
                          "tolerance_accuracy_points": TOLERANCE_ACC,
                          "tolerance_bpc": TOLERANCE_BPC, "min_fraction": MIN_FRACTION,
                          "seeds": seeds})


def _plot(ctx: RunContext, vit: list[dict], lm: list[dict]) -> list[str]:
    plt = ctx.pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    panels = ((axes[0], vit, "test accuracy (%)", TOLERANCE_ACC, True,
               "ViT 4x8 heads, digits (headline)"),
              (axes[1], lm, "validation bits / char", TOLERANCE_BPC, False,
               "character LM (second curve)"))
    for ax, runs, ylabel, tol, higher, title in panels:
        x = np.asarray(runs[0]["fractions"])
        lines = [("importance (recomputed)", [r["importance"] for r in runs], "C0", "-"),
                 ("random order", [r["random"] for r in runs], "C1", "--")]
        if "early" in runs[0]:
            lines.append(("importance, early checkpoint", [r["early"]["importance"]
                                                            for r in runs], "C2", ":"))
        for label, per_seed, color, ls in lines:
            cis = _curve_cis(per_seed)
            ax.plot(x, [c.value for c in cis], ls, color=color, label=label)
            ax.fill_between(x, [c.low for c in cis], [c.high for c in cis], color=color,
                            alpha=0.2, lw=0)
        base = float(np.mean([r["importance"][0] for r in runs]))
        limit = base - tol if higher else base + tol
        ax.axhline(limit, color="C3", lw=1, label=f"unpruned {'-' if higher else '+'} 1 point")
        ax.axvline(MIN_FRACTION, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("fraction of heads removed")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    return [ctx.save_figure(fig, "pruning.png")]


EXPERIMENT = Experiment(
    name="pruning",
    claim=(f"More than {MIN_FRACTION:.0%} of the attention heads of a ViT trained to a plateau "
           f"(4 layers x 8 heads, handwritten digits) can be physically removed by gradient "
           f"importance (Michel et al. 2019) while test accuracy falls by at most "
           f"{TOLERANCE_ACC:g} point, and importance order beats random order; counted FLOPs, "
           f"parameters and measured latency at that point reported, with a character LM as "
           f"a second curve."),
    run=run,
    options=(Option("--text", type=existing_file, default=None,
                    help="UTF-8 text file for the character LM (default: Python's pydoc "
                         "topics)"),),
    description="Head importance vs random pruning curves on a ViT and a char LM, physical "
                "head removal, counted FLOPs and interleaved latency.",
)
