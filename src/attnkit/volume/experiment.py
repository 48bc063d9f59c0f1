"""Experiment ``axial``: time and memory of axial vs full 3D self-attention, and an axial
segmenter against a matched 3D U-Net on real brain anatomy.

Scaling: one layer's forward+backward on ``side^3`` voxels. Memory is the peak resident memory
the call adds, measured in a fresh subprocess (:func:`attnkit.experiment.profiling.
peak_rss_sweep`), repeated in rounds; time is the CPU time of one thread in this process, measured
in interleaved rounds (:func:`attnkit.experiment.stats.interleaved_times`). Log-log slopes come
with bootstrap CIs over the repeats (:func:`~attnkit.experiment.stats.slope_ci`). "Full"
attention over all ``N`` voxels is measured twice: materialised (``return_weights=True``, the
``N x N`` weights any attention map needs) and fused (the engine's exact dense attention without
weights: O(N) memory, O(N^2) time). What differs is time: axial costs ``O(N * sum_a L_a) =
O(N^(4/3))`` for a cube, fused full ``O(N^2)``; memory is linear for both axial and fused.

Segmentation: the MNI152 tissue task (:mod:`attnkit.volume.mni`; train and test on disjoint
slabs of the brain, scanner-like intensity augmentation) when nilearn is installed, otherwise
the embedded 3D phantoms (:mod:`attnkit.volume.phantom`). The axial segmenter and a plain
convolutional 3D U-Net with about as many parameters train on the same patches for the same
steps, over ``ctx.seed_list()`` seeds; per-class Dice with CIs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor, nn

from ..distributed.data_parallel import rescale_mean, shard, wrap_ddp
from ..experiment import Experiment, Result, RunContext, stats
from ..functional import attention
from ..nn.axial import AxialAttention
from .mni import (
    MNI_CLASS_NAMES,
    augment_intensity,
    load_mni_task,
    nilearn_available,
    sample_patches,
)
from .model import AxialVolumeTransformer, count_parameters, matched_unet, normalize_volume
from .nifti import example_nifti_path, load_nifti, save_nifti
from .phantom import CLASS_NAMES, NUM_CLASSES, make_phantoms

DIM, HEADS = 32, 2


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


def dice_per_class(pred: Tensor, target: Tensor, num_classes: int) -> list[float]:
    """Dice ``2 |P & T| / (|P| + |T|)`` of each foreground class ``1 .. num_classes - 1`` over
    all voxels of ``pred`` and ``target`` (label tensors of one shape); NaN when a class is
    absent from both."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
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



# ------------------------------------------------------------------------- segmentation task


class _SegData:
    """Training batches and test volumes of one segmentation task (z-scored intensities)."""

    name: str
    class_names: tuple[str, ...]

    def batch(self, rng: np.random.Generator, size: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def test_sets(self) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError


def _zscore(v: np.ndarray) -> np.ndarray:
    return ((v - v.mean()) / max(float(v.std()), 1e-6)).astype(np.float32)


class MniData(_SegData):
    """The MNI152 tissue task: random ``patch^3`` cubes of the train slab, each from a fresh
    intensity augmentation of the whole slab; tests: the clean test slab and
    ``test_augmentations`` augmented copies (fixed seed)."""

    name = "mni152"
    class_names = MNI_CLASS_NAMES

    def __init__(self, resolution: int, patch: int, test_augmentations: int = 2) -> None:
        self.task = load_mni_task(resolution=resolution)
        self.patch = patch
        self.train_image, self.train_labels = self.task.slab("train")
        img, lab = self.task.slab("test")
        rng = np.random.default_rng(9_999)  # fixed: every seed and model sees the same tests
        views = [img] + [augment_intensity(img, rng) for _ in range(test_augmentations)]
        self._tests = [(torch.from_numpy(_zscore(v))[None], torch.from_numpy(lab)[None])
                       for v in views]

    def batch(self, rng, size):
        xs, ys = [], []
        for _ in range(size):
            aug = _zscore(augment_intensity(self.train_image, rng))
            x, y = sample_patches(aug, self.train_labels, self.patch, 1, rng)
            xs.append(x[0])
            ys.append(y[0])
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    def test_sets(self):
        return self._tests


class PhantomData(_SegData):
    """The embedded fallback: 3D phantoms (train and held-out test phantoms of other seeds)."""

    name = "phantom"
    class_names = CLASS_NAMES

    def __init__(self, side: int, n_train: int, n_test: int, seed: int = 0) -> None:
        xs, ys = make_phantoms(n_train, side, seed=seed)
        self.x = normalize_volume(torch.from_numpy(xs))
        self.y = torch.from_numpy(ys)
        xt, yt = make_phantoms(n_test, side, seed=10_000 + seed)
        self._tests = [(normalize_volume(torch.from_numpy(xt)), torch.from_numpy(yt))]

    def batch(self, rng, size):
        idx = torch.from_numpy(rng.integers(0, len(self.x), size))
        return self.x[idx], self.y[idx]

    def test_sets(self):
        return self._tests


def make_segmenters(num_classes: int, dim: int, patch: int) -> tuple[nn.Module, nn.Module]:
    """The axial segmenter and the plain 3D U-Net closest to it in parameter count."""
    axial = AxialVolumeTransformer(1, num_classes, dim=dim, depth=2, num_heads=4,
                                   rel_pos_max_distance=patch)
    return axial, matched_unet(count_parameters(axial), 1, num_classes)


def train_on(ctx: RunContext, model: nn.Module, data: _SegData, steps: int, seed: int,
             batch: int = 2, lr: float = 3e-3, desc: str = "train") -> nn.Module:
    """Class-weighted cross-entropy, AdamW + one-cycle ``lr``; batches from ``data`` with a
    generator seeded by ``seed`` (so two models with one seed see the same batches)."""
    K = len(data.class_names)
    rng = np.random.default_rng(seed)
    probe_y = data.batch(np.random.default_rng(seed + 7), 4)[1].flatten()
    freq = torch.bincount(probe_y, minlength=K).double() / probe_y.numel()
    weight = (1.0 / freq.clamp_min(1e-3)).sqrt()  # against the dominant background
    weight = (weight / weight.mean()).float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    net = wrap_ddp(model)
    model.train()
    for _ in ctx.progress(range(steps), desc=desc, total=steps):
        x, y = data.batch(rng, batch)
        idx = shard(torch.arange(len(x)))
        logits = net(x[idx])
        loss = nn.functional.cross_entropy(logits.reshape(-1, K), y[idx].flatten(),
                                           weight=weight)
        loss = rescale_mean(loss, weight[y[idx]].sum())  # a weighted mean: its weight sum
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model


@torch.no_grad()
def predict_tiled(model: nn.Module, x: Tensor, tile: int) -> Tensor:
    """Labels ``(B, *spatial)`` of ``x (B, *spatial)`` predicted tile by tile (``tile^3``
    cubes, the training patch size; the volume is padded with its edge values and cropped back),
    as patch-trained segmenters are run: both models see test inputs the size they trained on
    (instance norm statistics, relative-position range)."""
    spatial = tuple(x.shape[1:])
    pad = [p for s in reversed(spatial) for p in (0, -s % tile)]
    xp = nn.functional.pad(x.unsqueeze(1), pad, mode="replicate")[:, 0] if any(pad) else x
    out = torch.empty(xp.shape, dtype=torch.long)
    for i in range(0, xp.shape[1], tile):
        for j in range(0, xp.shape[2], tile):
            for k in range(0, xp.shape[3], tile):
                sl = (slice(None), slice(i, i + tile), slice(j, j + tile), slice(k, k + tile))
                out[sl] = model(xp[sl]).argmax(-1)
    return out[:, :spatial[0], :spatial[1], :spatial[2]]


@torch.no_grad()
def evaluate(model: nn.Module, data: _SegData, tile: int) -> tuple[list[float], Tensor]:
    """Dice per foreground class pooled over all test volumes (tiled prediction, see
    :func:`predict_tiled`), and the first test volume's prediction."""
    preds, targets = [], []
    for x, y in data.test_sets():
        preds.append(predict_tiled(model, x, tile))
        targets.append(y)
    dice = dice_per_class(torch.cat([p.flatten() for p in preds]),
                          torch.cat([t.flatten() for t in targets]), len(data.class_names))
    return dice, preds[0][0]


# ------------------------------------------------------------------------------ scaling

# Slopes are fitted on each method's FIT_POINTS largest sizes, chosen where per-call fixed
# costs (and, for full attention, the linear projections) are small against the term the claim
# is about: axial below side 24 still ran at slope < 1 (side 12 -> 16: 0.43, CPU time), and
# fused full attention at sides <= 12 spends a quarter of its time outside the N^2 term.
QUICK_SIDES = {"axial": (16, 24, 32, 48), "full_fused": (10, 14, 16, 20), "full": (8, 10, 12)}
FULL_SIDES = {"axial": (16, 24, 32, 48, 64), "full_fused": (8, 12, 16, 20, 24),
              "full": (8, 10, 12, 14, 16, 20)}
QUICK_MEM_SIDES = {"axial": (24, 32, 48), "full_fused": (8, 10, 12, 14), "full": (8, 10, 12)}
FIT_POINTS = 3


def _slope_from(sizes_reps: dict[int, list[float]]) -> stats.CI:
    sides = sorted(sizes_reps)[-FIT_POINTS:]
    return stats.slope_ci([s**3 for s in sides], [sizes_reps[s] for s in sides])


def measure_scaling(ctx: RunContext, sides: dict, mem_sides: dict, repeat: int,
                    mem_repeat: int) -> tuple[dict, dict]:
    """``(times, mems)``: ``{method: {side: [seconds or bytes per repeat]}}``."""
    cases = {f"{m}:{s}": setup_case(m, s) for m, ss in sides.items() for s in ss}
    # CPU time of the one thread, not wall time: the claim is about the work a call does, and
    # on a shared machine wall time also measures the other processes (a loaded 2-core machine
    # gave wall-clock axial slopes of 0.94 [0.74, 1.21], below the linear floor).
    with stats.single_thread():
        raw = stats.interleaved_times(
            {k: (lambda lx=lx: forward_backward(*lx)) for k, lx in cases.items()},
            repeat=repeat, warmup=1, clock=time.process_time)
    del cases
    times: dict = {m: {} for m in sides}
    for k, v in raw.items():
        m, s = k.split(":")
        times[m][int(s)] = v
    order = [(m, s) for m, ss in mem_sides.items() for s in ss]
    ctx.log(f"axial: peak memory of {len(order)} cases x {mem_repeat} in a subprocess ...")
    from ..experiment.profiling import peak_rss_sweep

    mems: dict = {m: {} for m in mem_sides}
    for _ in range(mem_repeat):  # one child per round: a freed-but-kept heap hides no repeat
        # The child's first call also pays one-time allocations (thread pools, kernel
        # buffers): a small axial warm-up case takes them and is dropped.
        mem = peak_rss_sweep(forward_backward, [("axial", 8)] + order, setup=setup_case)[1:]
        for (m, s), b in zip(order, mem):
            mems[m].setdefault(s, []).append(float(b))
    return times, mems


# ------------------------------------------------------------------------------------ run


def run(ctx: RunContext) -> Result:
    quick = ctx.quick
    seeds = ctx.seed_list(quick=3, full=5)
    times, mems = measure_scaling(ctx, QUICK_SIDES if quick else FULL_SIDES,
                                  QUICK_MEM_SIDES if quick else FULL_SIDES,
                                  repeat=5 if quick else 9, mem_repeat=3 if quick else 5)
    slopes = {f"time_slope_{m}": _slope_from(times[m]) for m in times}
    slopes.update({f"mem_slope_{m}": _slope_from(mems[m]) for m in mems})
    rows = []
    for m in times:
        for s in sorted(set(times[m]) | set(mems.get(m, {}))):
            rows.append({"method": m, "side": s, "voxels": s**3,
                         "time_s": round(stats.median(times[m][s]), 5) if s in times[m] else None,
                         "peak_mem_mb": (round(stats.median(mems[m][s]) / 2**20, 2)
                                         if s in mems.get(m, {}) else None)})

    # Segmentation: MNI152 when nilearn is installed, else phantoms.
    patch = 12 if quick else 24
    if nilearn_available():
        data: _SegData = MniData(resolution=4 if quick else 2, patch=patch)
    else:
        ctx.log("axial: nilearn not installed: segmenting the embedded phantoms instead")
        data = PhantomData(side=patch, n_train=32 if quick else 96, n_test=8 if quick else 24)
    K, names = len(data.class_names), data.class_names[1:]
    steps = 50 if quick else 800
    dim = 16 if quick else 32
    saved: dict = {}
    unet_design = make_segmenters(K, dim, patch)[1]

    def one(seed: int) -> dict[str, float]:
        out = {}
        with stats.single_thread():
            torch.manual_seed(seed)
            for kind, model in zip(("axial", "unet"), make_segmenters(K, dim, patch)):
                t0 = time.perf_counter()
                train_on(ctx, model, data, steps, seed, desc=f"{kind} seed {seed}")
                out[f"train_s_{kind}"] = time.perf_counter() - t0
                dice, pred = evaluate(model, data, patch)
                out[f"params_{kind}"] = float(count_parameters(model))
                for n, d in zip(names, dice):
                    out[f"dice_{kind}_{n}"] = d
                out[f"dice_{kind}"] = float(np.nanmean(dice))
                if kind not in saved:
                    saved[kind] = (model, pred)
        ctx.log(f"axial: seed {seed}: Dice axial {out['dice_axial']:.3f}, "
                f"U-Net {out['dice_unet']:.3f}")
        return out

    S = stats.stack_metrics(stats.over_seeds(one, seeds, progress=ctx.progress,
                                             desc="segmenter seeds"))
    metrics: dict[str, float] = {"segmentation_on_mni152": float(data.name == "mni152")}
    for name, ci in slopes.items():
        metrics.update(ci.metrics(name))
    for kind in ("axial", "unet"):
        metrics.update(stats.mean_ci(S[f"dice_{kind}"]).metrics(f"dice_{kind}"))
        metrics[f"params_{kind}"] = float(S[f"params_{kind}"][0])
        metrics[f"segmenter_train_s_{kind}"] = float(S[f"train_s_{kind}"].mean())
        for n in names:
            metrics.update(stats.mean_ci(S[f"dice_{kind}_{n}"]).metrics(f"dice_{kind}_{n}"))
    metrics.update(stats.paired_diff_ci(S["dice_axial"], S["dice_unet"])
                   .metrics("dice_gap_axial_minus_unet"))
    metrics["segmenter_train_s"] = metrics["segmenter_train_s_axial"]
    for m in mems:
        big = max(mems[m])
        metrics[f"peak_mem_mb_{m}_{big}"] = stats.median(mems[m][big]) / 2**20

    files = _write_predictions(ctx, data, saved, patch)
    real = _real_volume(ctx, saved["axial"][0])
    metrics.update(real)

    mid_time, mid_mem = (4 / 3 + 2) / 2, 1.5
    decisions = [
        slopes["time_slope_axial"].decide(
            "time_slope_axial", mid_time, "<",
            "axial time grows like N^(4/3), not N^2 (threshold: midway, 5/3)"),
        slopes["time_slope_full_fused"].decide(
            "time_slope_full_fused", mid_time, ">",
            "exact fused full attention's time grows like N^2 (threshold 5/3)"),
        slopes["mem_slope_axial"].decide(
            "mem_slope_axial", mid_mem, "<", "axial memory linear in N (threshold 1.5)"),
    ]
    m = metrics
    seg_lines = "; ".join(
        f"{n}: axial {m[f'dice_axial_{n}']:.3f} [{m[f'dice_axial_{n}_ci_low']:.3f}, "
        f"{m[f'dice_axial_{n}_ci_high']:.3f}] vs U-Net {m[f'dice_unet_{n}']:.3f} "
        f"[{m[f'dice_unet_{n}_ci_low']:.3f}, {m[f'dice_unet_{n}_ci_high']:.3f}]" for n in names)
    if data.name == "mni152":
        t = data.task
        task_text = (
            f"Segmentation task: MNI152 2009 template from nilearn at {t.resolution} mm "
            f"{t.image.shape}, labels background / csf_other / gm / wm from nilearn's brain mask "
            f"and GM/WM probability maps (argmax of 1-gm-wm, gm, wm inside the mask). Train on "
            f"{patch}^3 patches from voxels {t.train.start}..{t.train.stop - 1} along axis "
            f"{t.axis} (posterior), test on the whole slab {t.test.start}..{t.test.stop - 1} "
            f"(anterior; a {t.test.start - t.train.stop}-voxel gap; clean + 2 augmented copies; "
            f"both models predict it in {patch}^3 tiles, their training patch size). "
            "Augmentation: quadratic multiplicative bias field (+-30%), gamma 0.7-1.5, gain "
            "0.7-1.3, offset +-0.1, noise sd 0.05, then z-scoring.")
    else:
        task_text = (f"Segmentation task: embedded 3D phantoms {patch}^3 (nilearn not "
                     "installed: fallback), held-out phantoms of another seed.")
    notes = (
        "Scaling: one layer (dim 32, 2 heads), forward+backward, CPU time of 1 thread "
        "(time.process_time: the work, which other processes' load barely changes), "
        "interleaved rounds; "
        f"memory: peak RSS rise in a subprocess, repeated rounds. Slopes fitted on each "
        f"method's {FIT_POINTS} largest sizes, 95% CIs by resampling repeats. 'full' "
        "materialises the N x N weights; 'full_fused' is the engine's exact dense attention "
        "(no weights). Expected: axial time N^(4/3) (its projections, linear in N, dominate "
        "at small sides, so the measured slope sits between 1 and 4/3), fused full N^2, "
        f"memory linear for axial and fused, quadratic for materialised. Slopes: "
        + ", ".join(f"{k} {v}" for k, v in slopes.items()) + ".\n"
        + task_text + f" Both models: {steps} steps, batch 2, AdamW lr 3e-3 one-cycle, "
        f"class-weighted CE; axial dim {dim}, depth 2, 4 heads, relative positions up to "
        f"{patch} ({int(m['params_axial'])} parameters) vs a plain-conv 3D U-Net with "
        f"{unet_design.levels} pooling level(s), widths "
        f"{[unet_design.width * 2**i for i in range(unet_design.levels + 1)]}, "
        f"{unet_design.norm} norm ({int(m['params_unet'])} parameters; batch norm keeps a "
        "patch's absolute intensity, which per-patch instance norm on small patches removes); "
        f"{len(seeds)} seeds. Dice (95% CI over seeds): "
        + seg_lines + f". Mean: axial {m['dice_axial']:.3f}, U-Net {m['dice_unet']:.3f}, "
        f"paired gap {m['dice_gap_axial_minus_unet']:.3f} "
        f"[{m['dice_gap_axial_minus_unet_ci_low']:.3f}, "
        f"{m['dice_gap_axial_minus_unet_ci_high']:.3f}]. Files: {', '.join(files)}.\n"
        + "\n".join(d.explanation() for d in decisions)
    )
    figures = _figures(ctx, times, mems, data, saved)
    return Result(metrics=metrics, decisions=decisions, seeds=len(seeds), table=rows,
                  figures=figures, notes=notes,
                  params={"dim": DIM, "heads": HEADS, "sides": QUICK_SIDES if quick
                          else FULL_SIDES, "segmentation_task": data.name, "patch": patch,
                          "steps": steps, "segmenter_dim": dim, "seeds": seeds,
                          "prediction_files": files})


def _write_predictions(ctx: RunContext, data: _SegData, saved: dict, patch: int
                       ) -> list[str]:
    """The first seed's axial prediction of the whole MNI volume, and the reference labels,
    as NIfTI with the template's affine (open them beside the scan in any viewer)."""
    if data.name != "mni152" or "axial" not in saved:
        return []
    try:
        import nibabel  # noqa: F401
    except ImportError:
        return []
    from .nifti import NiftiVolume

    t = data.task
    scan = NiftiVolume(t.image, (float(t.resolution),) * 3, t.affine, "MNI152 template")
    with torch.no_grad():
        pred = predict_tiled(saved["axial"][0], torch.from_numpy(_zscore(t.image))[None],
                             patch)[0]
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    out = [save_nifti(ctx.out_dir / "axial_mni_prediction.nii.gz", pred.numpy(), like=scan),
           save_nifti(ctx.out_dir / "mni_tissue_labels.nii.gz", t.labels, like=scan)]
    return [str(p) for p in out]


def _real_volume(ctx: RunContext, model: nn.Module) -> dict[str, float]:
    """Forward time of the trained axial segmenter on nibabel's real 33x41x25 MRI."""
    path = example_nifti_path()
    if path is None:
        return {}
    vol = load_nifti(path)
    x = normalize_volume(torch.from_numpy(vol.data)[None])
    from ..experiment.profiling import measure

    with stats.single_thread(), torch.no_grad():
        t = measure(lambda: model(x), repeat=1)
    return {"real_volume_voxels": float(vol.data.size), "real_forward_s": t}


def _figures(ctx: RunContext, times: dict, mems: dict, data: _SegData, saved: dict
             ) -> list[str]:
    plt = ctx.pyplot()
    if plt is None:
        return []
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"axial": "C0", "full": "C3", "full_fused": "C1"}
    for ax, src, label, scale in ((axes[0], times, "fwd+bwd CPU time (s)", 1.0),
                                  (axes[1], mems, "peak memory (MB)", 2.0**-20)):
        for m, per in src.items():
            sides = sorted(per)
            n = [s**3 for s in sides]
            med = [stats.median(per[s]) * scale for s in sides]
            lo = [med[i] - min(per[s]) * scale for i, s in enumerate(sides)]
            hi = [max(per[s]) * scale - med[i] for i, s in enumerate(sides)]
            ax.errorbar(n, med, yerr=[lo, hi], fmt="-o", ms=3, color=colors[m], capsize=2,
                        label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("voxels N")
        ax.set_ylabel(label + ", median, min-max bars")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("axial vs full 3D self-attention, one layer")
    paths.append(ctx.save_figure(fig, "axial_scaling.png"))

    x, y = data.test_sets()[0]
    if x.dim() == 4 and len(saved) == 2:
        mid = x.shape[3] // 2
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
        im = axes[0].imshow(x[0, :, :, mid].T.numpy(), cmap="gray", origin="lower")
        fig.colorbar(im, ax=axes[0], fraction=0.046, label="z-scored intensity")
        axes[0].set_title("test image (slice)")
        K = len(data.class_names)
        panels = (("reference labels", y[0]), ("axial prediction", saved["axial"][1]),
                  ("U-Net prediction", saved["unet"][1]))
        for ax, (title, lab) in zip(axes[1:], panels):
            im = ax.imshow(lab[:, :, mid].T.numpy(), cmap="viridis", vmin=0, vmax=K - 1,
                           origin="lower", interpolation="nearest")
            ax.set_title(title)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, ticks=range(K))
            cb.ax.set_yticklabels(data.class_names, fontsize=7)
        for ax in axes:
            ax.set_xlabel("voxel (axis 0)")
            ax.set_ylabel("voxel (axis 1)")
        fig.suptitle(f"{data.name} segmentation, first seed, middle slice of the test part")
        paths.append(ctx.save_figure(fig, "axial_segmentation.png"))
    return paths


EXPERIMENT = Experiment(
    name="axial",
    claim="Axial attention's time grows like N^(4/3) in the number of voxels where exact full "
          "attention's (even fused, O(N) memory) grows like N^2, and its memory grows "
          "linearly; an axial segmenter is compared with a matched 3D U-Net on real anatomy.",
    run=run,
    description="time/memory slopes vs voxels for axial, materialised and fused full "
                "attention; axial segmenter vs matched 3D U-Net on MNI152 grey/white matter "
                "(phantoms without nilearn)",
)
