"""Training, evaluation and per-batch cost measurement for the fusion models."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..distributed.data_parallel import all_reduce_mean, rescale_mean, shard, wrap_ddp
from .data import N_DIGITS, N_MFCC, SpokenDigitTask
from .models import FusionModel

__all__ = ["to_tensors", "train_model", "evaluate", "step_cost"]


def to_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def train_model(
    model: FusionModel, task: SpokenDigitTask | Sequence[SpokenDigitTask], steps: int,
    batch_size: int = 32, lr: float = 3e-3, seed: int = 0, curriculum: bool = True,
) -> list[float]:
    """Adam on fresh batches from ``task`` (the same seed gives every model the same examples).

    With several tasks (e.g. utterances of 1, 2, 4 and 8 digits, shortest first) and
    ``curriculum`` the steps run in ``len(tasks)`` equal stages and stage ``s`` cycles through
    tasks ``0..s`` (new lengths are added, earlier ones replayed): every model must first learn
    what a digit sounds like, which the one-digit task teaches with the least confusion, before
    it can find several in a stream. Without ``curriculum`` step ``i`` draws from task
    ``i % len(tasks)``. Returns the loss per step. Under ``torchrun`` every rank draws the same
    batch and trains a ``DistributedDataParallel`` copy on its share of it."""
    tasks = [task] if isinstance(task, SpokenDigitTask) or hasattr(task, "sample") else list(task)
    if not tasks:
        raise ValueError("train_model needs at least one task")
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    net = wrap_ddp(model)  # the model itself unless running under torchrun
    model.train()
    losses = []
    for step in range(steps):
        stage = (step * len(tasks)) // steps + 1 if curriculum else len(tasks)
        batch = tasks[step % stage].sample(batch_size, rng)
        b = {k: shard(v) for k, v in to_tensors(batch).items()}
        logit = net(b["audio"], b["text"], b["audio_mask"])
        loss = nn.functional.binary_cross_entropy_with_logits(logit, b["label"])
        loss = rescale_mean(loss, b["label"].numel())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(all_reduce_mean(loss.detach())))
    return losses


@torch.no_grad()
def evaluate(model: FusionModel, batches: list[dict[str, np.ndarray]]) -> float:
    """Accuracy (threshold 0 on the logit) over fixed batches."""
    model.eval()
    correct = total = 0
    for batch in batches:
        b = to_tensors(batch)
        pred = model(b["audio"], b["text"], b["audio_mask"]) > 0
        correct += int((pred == (b["label"] > 0.5)).sum())
        total += len(pred)
    return correct / total


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while running ``fn`` (the
    activation memory of a training step; deterministic, unlike process RSS)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            seen[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return sum(seen.values())


def step_cost(model: FusionModel, audio_len: int, batch_size: int = 2, text_len: int = 3,
              repeats: int = 2, seed: int = 0) -> dict[str, float]:
    """Time (best of ``repeats``, after one warm-up) of one forward+backward training step on a
    random batch of ``audio_len`` frames, and its activation memory in MiB."""
    gen = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch_size, audio_len, N_MFCC, generator=gen)
    text = torch.randint(0, N_DIGITS, (batch_size, text_len), generator=gen)
    mask = torch.ones(batch_size, audio_len, dtype=torch.bool)
    model.train()

    def run():
        return model(audio, text, mask)

    mem = _saved_bytes(run)
    model.zero_grad()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run().sum().backward()
        best = min(best, time.perf_counter() - t0)
        model.zero_grad()
    return {"seconds": best, "memory_mib": mem / 2**20}
