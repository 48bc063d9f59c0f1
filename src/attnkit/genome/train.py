"""Training loops (masked-base prediction, per-position labels) and bits per base.

Checkpoints are plain tensors and numbers (``torch.save`` of state dicts), loaded back with
``torch.load(..., weights_only=True)``: no code is ever unpickled.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_positive_int
from ..distributed.data_parallel import (
    ApplyModule,
    all_reduce_mean,
    is_main_process,
    rescale_mean,
    shard,
    wrap_ddp,
)
from .fasta import MASK_TOKEN, N_TOKEN
from .model import GenomeEncoder
from .synthetic import IGNORE_INDEX

__all__ = ["mask_tokens", "train_mlm", "train_labels", "bits_per_base", "label_accuracy",
           "save_checkpoint", "load_checkpoint"]

Progress = Callable[[Iterable, str], Iterator]


def mask_tokens(tokens: Tensor, rate: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT-style masking of ``tokens (B, L)``: a ``rate`` fraction of known bases become
    targets; of those 80% turn into ``MASK``, 10% into a random base, 10% stay.

    Returns ``(inputs (B, L), targets (B, L))`` with targets ``IGNORE_INDEX`` off the mask.
    """
    if not 0 < rate < 1:
        raise ValueError(f"mask rate must be in (0, 1), got {rate}")
    u = torch.rand(tokens.shape, generator=generator)
    chosen = (u < rate) & (tokens < N_TOKEN)
    targets = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    v = torch.rand(tokens.shape, generator=generator)
    random_bases = torch.randint(0, 4, tokens.shape, generator=generator)
    inputs = torch.where(chosen & (v < 0.8), torch.full_like(tokens, MASK_TOKEN), tokens)
    inputs = torch.where(chosen & (v >= 0.8) & (v < 0.9), random_bases, inputs)
    return inputs, targets


def save_checkpoint(path: str | Path, model: GenomeEncoder, optimizer: torch.optim.Optimizer,
                    step: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "config": dict(model.config)}, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict (``model``, ``optimizer``, ``step``, ``config``); tensors only."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def _optimizer(model: torch.nn.Module, lr: float, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)

    def factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _step(model: torch.nn.Module, opt, sched, loss: Tensor) -> float:
    """One clipped optimizer and scheduler step on ``loss``; returns its value (under torchrun
    the mean over ranks of the rescaled local losses: the whole batch's loss)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(all_reduce_mean(loss.detach()))


def _mlm_logits(model: GenomeEncoder, inputs: Tensor) -> Tensor:
    return model.mlm_logits(model(inputs))


def _label_logits(model: GenomeEncoder, inputs: Tensor) -> Tensor:
    return model.label_logits(model(inputs))


def train_mlm(
    model: GenomeEncoder,
    tokens: Tensor,
    *,
    steps: int,
    window_len: int = 16384,
    batch_size: int = 1,
    lr: float = 2e-3,
    mask_rate: float = 0.15,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    progress: Progress | None = None,
    valid: Tensor | None = None,
    eval_every: int = 200,
    patience: int = 5,
    valid_stride: int = 8,
    history: list[tuple[int, float]] | None = None,
) -> list[float]:
    """Masked-base training on random windows of one long sequence.

    Args:
        model: the encoder (trained in place).
        tokens: ``(L,)`` int64 training sequence (``L >= window_len``).
        steps: optimizer steps; window_len: bases per training window (16k to 64k for real
            genomes); batch_size: windows per step.
        checkpoint: file to save to every ``checkpoint_every`` steps and at the end;
            ``resume=True`` continues from it when it exists.
        progress: e.g. ``ctx.progress``; wraps the step iterator (a progress bar).
        valid: ``(L_v,)`` int64 validation sequence: early stopping. Every ``eval_every``
            steps its masked bits/base (:func:`bits_per_base`, one pass at ``valid_stride``)
            is measured; training stops after ``patience`` evaluations without improvement
            (``steps`` is then a cap) and the model is left at its best evaluated weights.
            ``history`` (a list) receives ``(step, bits)`` per evaluation.

    Returns:
        The loss (nats per masked base) of every step run.

    Under ``torchrun`` every rank draws the same ``batch_size`` windows and trains a
    ``DistributedDataParallel`` copy on its share of them (``batch_size`` must be at least the
    number of ranks); only rank 0 writes the checkpoint.
    """
    check_positive_int("steps", steps)
    check_positive_int("window_len", window_len)
    check_positive_int("batch_size", batch_size)
    check_positive_int("checkpoint_every", checkpoint_every)
    if valid is not None:
        check_positive_int("eval_every", eval_every)
        check_positive_int("patience", patience)
        check_positive_int("valid_stride", valid_stride)
    if not isinstance(tokens, Tensor) or tokens.dim() != 1 or tokens.dtype != torch.long:
        raise ValueError("tokens must be a 1-D int64 tensor (see attnkit.genome.encode)")
    if tokens.numel() < window_len:
        raise ValueError(
            f"training sequence has {tokens.numel()} bases, shorter than window_len={window_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    opt, sched = _optimizer(model, lr, steps)
    start = 0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        with warnings.catch_warnings():  # fast-forward the schedule, no optimizer step yet
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):
                sched.step()
        torch.randint(0, 2, (start,), generator=gen)  # new window draws after a resume
    losses: list[float] = []
    # The label head is unused here: DDP must not wait for its gradient.
    net = wrap_ddp(ApplyModule(model), find_unused_parameters=True)
    model.train()
    it: Iterable[int] = range(start, steps)
    if progress is not None:
        it = progress(it, "genome mlm")
    best, best_state, stale = math.inf, None, 0
    for step in it:
        starts = torch.randint(0, tokens.numel() - window_len + 1, (batch_size,), generator=gen)
        batch = torch.stack([tokens[s : s + window_len] for s in starts.tolist()])
        inputs, targets = mask_tokens(batch, mask_rate, gen)
        if bool((targets == IGNORE_INDEX).all()):
            continue  # all N: nothing to learn from this window
        inputs, targets = shard(inputs), shard(targets)  # this rank's windows
        logits = net(_mlm_logits, inputs)
        loss = F.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        loss = rescale_mean(loss, int((targets != IGNORE_INDEX).sum()))
        losses.append(_step(model, opt, sched, loss))
        if checkpoint is not None and is_main_process() and (
                (step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(checkpoint, model, opt, step + 1)
        if valid is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            bits = bits_per_base(model, valid, stride=valid_stride, passes=1)
            model.train()
            if history is not None:
                history.append((step + 1, bits))
            if bits < best:
                best, stale = bits, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return losses


@torch.no_grad()
def bits_per_base(model: GenomeEncoder, tokens: Tensor, *, stride: int = 8,
                  passes: int | None = None, chunk_size: int | None = None) -> float:
    """Masked-base code length in bits per base on held-out ``tokens (L,)``.

    Pass ``r`` masks every base at positions ``= r (mod stride)`` and scores them from the rest
    of the sequence (one whole-sequence streaming forward per pass); ``passes`` defaults to
    ``stride``, which scores every known base exactly once. ``N`` positions are skipped.
    """
    check_positive_int("stride", stride)
    passes = stride if passes is None else passes
    if isinstance(passes, bool) or not isinstance(passes, int) or not 1 <= passes <= stride:
        raise ValueError(f"passes must be an int in [1, stride={stride}], got {passes!r}")
    if not isinstance(tokens, Tensor) or tokens.dim() != 1 or tokens.dtype != torch.long:
        raise ValueError("tokens must be a 1-D int64 tensor (see attnkit.genome.encode)")
    model.eval()
    pos = torch.arange(tokens.numel())
    total_bits, count = 0.0, 0
    for r in range(passes):
        sel = (pos % stride == r) & (tokens < N_TOKEN)
        if not bool(sel.any()):
            continue
        inputs = torch.where(sel, torch.full_like(tokens, MASK_TOKEN), tokens)
        hidden = model.embed_genome(inputs, chunk_size=chunk_size)
        logp = F.log_softmax(model.mlm_logits(hidden[sel]).double(), -1)
        total_bits -= float(logp.gather(1, tokens[sel].unsqueeze(1)).sum()) / math.log(2)
        count += int(sel.sum())
    if count == 0:
        raise ValueError("tokens hold no known base (all N) to score")
    return total_bits / count


def train_labels(
    model: GenomeEncoder,
    sample: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Progress | None = None,
    desc: str = "genome labels",
) -> list[float]:
    """Train the per-position label head (and the encoder) on ``sample(batch, generator) ->
    (tokens (B, L), labels (B, L))`` with labels ``IGNORE_INDEX`` where unlabeled.

    Under ``torchrun`` every rank draws the same batch and trains a ``DistributedDataParallel``
    copy on its share of it (``batch_size`` must be at least the number of ranks)."""
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    gen = torch.Generator().manual_seed(seed)
    opt, sched = _optimizer(model, lr, steps)
    losses: list[float] = []
    # The MLM head is unused here: DDP must not wait for its gradient.
    net = wrap_ddp(ApplyModule(model), find_unused_parameters=True)
    model.train()
    it: Iterable[int] = range(steps)
    if progress is not None:
        it = progress(it, desc)
    for _ in it:
        tokens, labels = sample(batch_size, gen)
        tokens, labels = shard(tokens), shard(labels)  # this rank's share of the batch
        logits = net(_label_logits, tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        loss = rescale_mean(loss, int((labels != IGNORE_INDEX).sum()))
        losses.append(_step(model, opt, sched, loss))
    model.eval()
    return losses


@torch.no_grad()
def label_accuracy(model: GenomeEncoder, tokens: Tensor, labels: Tensor,
                   max_bases: int = 1 << 20) -> float:
    """Accuracy of the label head on labeled positions of ``tokens, labels (B, L)``, without
    autograd and a few samples (at most ``max_bases`` bases, at least one sample) at a time:
    64 samples at the task's 10^5 distance are 12.8M bases, whose graph in one call held ~12 GB."""
    check_positive_int("max_bases", max_bases)
    model.eval()
    keep = labels != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("labels hold no labeled position")
    per = max(1, max_bases // max(tokens.shape[1], 1))
    right = 0
    with torch.no_grad():
        for b0 in range(0, tokens.shape[0], per):
            pred = model.label_logits(model(tokens[b0:b0 + per])).argmax(-1)
            k = keep[b0:b0 + per]
            right += int((pred[k] == labels[b0:b0 + per][k]).sum())
    return right / int(keep.sum())

