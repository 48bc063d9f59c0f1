"""Experiment ``axial``: memory and time of axial vs full 3D self-attention, and a segmenter.

Memory is the peak resident memory one forward+backward adds, measured in a fresh subprocess
(:func:`attnkit.profiling.peak_rss_sweep`); time is the median wall time in this process, one
thread (the machine is shared, timings are noisy). "Full" attention over all ``N`` voxels is
measured twice: materialized (``return_weights=True``, the ``N x N`` weights every attention
map needs, as a plain implementation stores them) and fused (torch SDPA, which never stores the
scores: O(N) memory but still O(N^2) time). Sizes where full attention would not fit are
estimated from the fitted power law.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch import Tensor, nn

from ..distributed.data_parallel import rescale_mean, shard, wrap_ddp
from ..functional import attention
from ..nn.axial import AxialAttention
from ..results import Experiment, Result, RunContext
from .model import AxialVolumeTransformer, normalize_volume
from .nifti import example_nifti_path, load_nifti
from .phantom import NUM_CLASSES, make_phantoms

DIM, HEADS = 32, 2
# Full materialized attention stores ~3 (N x N x H) fp32 tensors in fwd+bwd: cap it here.
FULL_DENSE_MAX_BYTES = 1.5e9
FULL_FUSED_MAX_VOXELS = 13_824  # 24^3: its O(N^2) time is already seconds


class FullAttention(nn.Module):
    """Self-attention over all voxels of ``(B, *spatial, C)`` (flattened), for comparison."""

    def __init__(self, dim: int, num_heads: int, materialize: bool) -> None:
        super().__init__()
        self.h, self.materialize = num_heads, materialize
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        shape, C = x.shape, x.shape[-1]
        t = x.reshape(shape[0], -1, C)
        B, N, _ = t.shape
        q, k, v = self.qkv(t).view(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        res = attention(q, k, v, return_weights=self.materialize)
        o = res[0] if self.materialize else res
        return self.out(o.transpose(1, 2).reshape(B, N, C)).view(shape)


def make_layer(method: str) -> nn.Module:
    if method == "axial":
        return AxialAttention(DIM, HEADS, 3)
    if method in ("full", "full_fused"):
        return FullAttention(DIM, HEADS, materialize=(method == "full"))
    raise ValueError(f"unknown method {method!r}")


def setup_case(method: str, side: int, threads: int = 1):
    """Build the layer and a ``(1, side, side, side, DIM)`` input (not counted in memory)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = make_layer(method)
    x = torch.randn(1, side, side, side, DIM, requires_grad=True)
    return layer, x


def forward_backward(layer: nn.Module, x: Tensor) -> None:
    layer(x).square().mean().backward()


def _estimated_full_bytes(side: int) -> float:
    n = side**3
    return 3.0 * n * n * HEADS * 4


def _slope(xs, ys) -> float:
    """Least-squares slope of log(y) on log(x)."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(lx, ly, 1)[0]) if len(lx) >= 2 else float("nan")


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)  # tiny ops: one thread is steadier on a shared CPU
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _dice(pred: Tensor, target: Tensor, num_classes: int) -> list[float]:
    """Per foreground class Dice over all voxels (NaN when a class is absent in both)."""
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        denom = int(p.sum() + t.sum())
        out.append(2.0 * int((p & t).sum()) / denom if denom else float("nan"))
    return out


def train_segmenter(ctx: RunContext, side: int, n_train: int, steps: int, seed: int):
    xs, ys = make_phantoms(n_train, side, seed=seed)
    x = normalize_volume(torch.from_numpy(xs)).unsqueeze(-1)
    y = torch.from_numpy(ys)
    torch.manual_seed(seed)
    model = AxialVolumeTransformer(1, NUM_CLASSES, dim=32, depth=2, num_heads=4,
                                   rel_pos_max_distance=side)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    # Class weights against the dominant background (lesions are ~1% of voxels).
    freq = torch.bincount(y.flatten(), minlength=NUM_CLASSES).double() / y.numel()
    weight = (1.0 / freq.clamp_min(1e-3)).sqrt()
    weight = (weight / weight.mean()).float()
    gen = torch.Generator().manual_seed(seed)
    batch = 4
    net = wrap_ddp(model)  # under torchrun: DDP, each rank on its share of every batch
    model.train()
    for _ in ctx.progress(range(steps), desc="train segmenter", total=steps):
        idx = shard(torch.randint(0, n_train, (batch,), generator=gen))
        logits = net(x[idx])
        loss = nn.functional.cross_entropy(logits.reshape(-1, NUM_CLASSES),
                                           y[idx].flatten(), weight=weight)
        loss = rescale_mean(loss, weight[y[idx]].sum())  # a weighted mean: its weight sum
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def run(ctx: RunContext) -> Result:
    quick = ctx.quick
    sides_axial = [8, 16, 24, 32, 48, 64] + ([96, 128] if not quick else [])
    sides_full = [s for s in [8, 10, 12, 14, 16, 20, 24, 32]
                  if _estimated_full_bytes(s) <= FULL_DENSE_MAX_BYTES and (s <= 14 or not quick)]
    sides_fused = [s for s in [8, 12, 16, 20, 24]
                   if s**3 <= FULL_FUSED_MAX_VOXELS and (s <= 16 or not quick)]
    from ..profiling import measure, peak_rss_sweep

    cases = ([("full", s) for s in sides_full] + [("full_fused", s) for s in sides_fused]
             + [("axial", s) for s in sides_axial])
    ctx.log(f"axial: peak memory of {len(cases)} cases in a subprocess ...")
    mem = peak_rss_sweep(forward_backward, cases, setup=setup_case)
    mem_of = {c: m for c, m in zip(cases, mem)}
    rows, time_of = [], {}
    with _threads(1):
        for method, side in ctx.progress(cases, desc="time", total=len(cases)):
            layer, x = setup_case(method, side)
            cheap = side**3 <= (16**3 if method == "axial" else 8**3)
            time_of[(method, side)] = measure(forward_backward, layer, x,
                                              repeat=3 if cheap else 1, warmup=1 if cheap else 0)
            del layer, x
    for method, side in cases:
        rows.append({"method": method, "side": side, "voxels": side**3,
                     "peak_mem_mb": round(mem_of[(method, side)] / 2**20, 2),
                     "time_s": round(time_of[(method, side)], 4), "estimated": False})

    # Asymptotic log-log slopes: fitted on the three largest measured sizes of each method
    # (at small sizes fixed overheads flatten the curves).
    def fit(method: str, key) -> float:
        pts = sorted((s**3, key(method, s)) for m, s in cases if m == method)
        pts = [(n, v) for n, v in pts if v > 0][-3:]
        return _slope([p[0] for p in pts], [p[1] for p in pts])

    def _mem(m, s):
        return mem_of[(m, s)]

    def _time(m, s):
        return time_of[(m, s)]

    slopes = {
        "mem_slope_axial": fit("axial", _mem),
        "mem_slope_full": fit("full", _mem),
        "mem_slope_full_fused": fit("full_fused", _mem),
        "time_slope_axial": fit("axial", _time),
        "time_slope_full": fit("full", _time),
        "time_slope_full_fused": fit("full_fused", _time),
    }
    # Estimates for full attention beyond what fits, from its own power law.
    for method in ("full", "full_fused"):
        done = [s for m, s in cases if m == method]
        big = max(done)
        for side in sides_axial:
            if side <= big:
                continue
            ratio = (side / big) ** 3
            rows.append({
                "method": method, "side": side, "voxels": side**3,
                "peak_mem_mb": round(mem_of[(method, big)] / 2**20
                                     * ratio ** slopes[f"mem_slope_{method}"], 1),
                "time_s": round(time_of[(method, big)] * ratio ** slopes[f"time_slope_{method}"],
                                2),
                "estimated": True,
            })

    # Segmenter on phantoms, Dice on held-out phantoms (different seed).
    seg_side = 16 if quick else 24
    with _threads(1):
        t0 = time.perf_counter()
        model = train_segmenter(ctx, seg_side, n_train=32 if quick else 96,
                                steps=120 if quick else 600, seed=ctx.seed)
        train_s = time.perf_counter() - t0
        xs, ys = make_phantoms(8 if quick else 24, seg_side, seed=10_000 + ctx.seed)
        model.eval()
        with torch.no_grad():
            pred = model(normalize_volume(torch.from_numpy(xs)).unsqueeze(-1)).argmax(-1)
        per_class = _dice(pred, torch.from_numpy(ys), NUM_CLASSES)
        dice = float(np.nanmean(per_class))

        # Real-volume timing: nibabel's anatomical.nii through the trained segmenter.
        real = {}
        path = example_nifti_path()
        if path is not None:
            vol, spacing = load_nifti(path)
            xv = normalize_volume(torch.from_numpy(vol)[None]).unsqueeze(-1)
            model.train()
            real_fb = measure(lambda: model(xv).square().mean().backward(), repeat=1)
            model.eval()
            with torch.no_grad():
                real_f = measure(lambda: model(xv), repeat=1)
            real = {"real_volume_voxels": float(vol.size), "real_forward_s": real_f,
                    "real_fwd_bwd_s": real_fb}
            ctx.log(f"axial: {path.name} {vol.shape} spacing {spacing}: forward {real_f:.3f}s")

    metrics = {**slopes, "dice_axial": dice,
               **{f"dice_{n}": d for n, d in zip(("shell", "tissue", "lesion"), per_class)},
               "segmenter_train_s": train_s, **real}
    for method, side in cases:
        if side == max(s for m, s in cases if m == method):
            metrics[f"peak_mem_mb_{method}_{side}"] = mem_of[(method, side)] / 2**20
    held = (0.7 <= slopes["mem_slope_axial"] <= 1.3
            and 1.6 <= slopes["mem_slope_full"] <= 2.4 and dice >= 0.7)
    figures = _figures(ctx, rows)
    notes = (
        "Peak memory: rise of peak RSS during one forward+backward of one layer (dim 32, "
        "2 heads), in a fresh subprocess (attnkit.profiling.peak_rss_sweep); slopes are fitted "
        "on the three largest measured sizes of each method. Time: median wall time, 1 thread, "
        "on a shared CPU (noisy). 'full' "
        "materializes the N x N weights (what attention maps need); 'full_fused' is torch "
        "SDPA, O(N) memory but O(N^2) time. Rows marked estimated extrapolate the power law. "
        f"Segmenter: {seg_side}^3 phantoms, Dice over held-out phantoms (mean of shell, tissue, "
        "lesion)."
    )
    return Result(metrics=metrics, held=held, table=rows, figures=figures,
                  params={"dim": DIM, "heads": HEADS, "sides_axial": sides_axial,
                          "sides_full": sides_full, "sides_full_fused": sides_fused,
                          "segmenter_side": seg_side},
                  notes=notes)


def _figures(ctx: RunContext, rows: list[dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"axial": "C0", "full": "C3", "full_fused": "C1"}
    for key, ax, label in ((("peak_mem_mb"), axes[0], "peak memory (MB)"),
                           ("time_s", axes[1], "fwd+bwd time (s)")):
        for method, color in styles.items():
            for est in (False, True):
                pts = sorted((r["voxels"], r[key]) for r in rows
                             if r["method"] == method and r["estimated"] == est and r[key] > 0)
                if pts:
                    ax.loglog(*zip(*pts), "--" if est else "-o", color=color, ms=3,
                              label=None if est else method)
        ax.set_xlabel("voxels N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("axial vs full 3D self-attention (dashed: estimated)")
    path = ctx.save_figure(fig, "axial_scaling.png", dpi=110)
    return [str(path)]


EXPERIMENT = Experiment(
    name="axial",
    claim="Axial attention's memory grows linearly with the number of voxels (log-log slope "
          "about 1) where full 3D self-attention's grows quadratically (about 2), and an axial "
          "segmenter still segments 3D phantoms well.",
    run=run,
    description="memory/time vs voxels for axial and full attention; Dice on phantoms",
)

