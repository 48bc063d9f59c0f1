"""A synthetic genome with realistic local statistics and planted long-range structure.

Background: an order-3 Markov chain with AT-rich (Mycoplasma-like) composition and random
transition preferences. Planted structure, modelled on transcription-factor regulation: the
genome is cut into ``num_hubs`` segments; each segment starts with a promoter-like *hub* motif
``tag + class`` at a known hub position; the genes of that segment, placed at least
``min_distance`` bases downstream, carry the same ``tag`` as a binding site and take the hub's
``class`` as their label. Tags are shuffled and classes drawn afresh for every sample, so a gene's
label is decided only by the hub motif thousands of bases upstream: a model whose receptive field
stays inside a local window sees the tag but not the class (chance accuracy), while attention to
global hub tokens can match the tag and read the class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..checks import check_positive_int

__all__ = ["HubTask", "LongRangeTask", "DistanceCurriculum", "markov_background",
           "random_markov_chain", "IGNORE_INDEX"]

#: Label of positions that carry no gene (``torch.nn.functional.cross_entropy`` ignores it).
IGNORE_INDEX = -100


def random_markov_chain(order: int, generator: torch.Generator, gc: float = 0.32,
                        concentration: float = 2.0) -> Tensor:
    """``(4**order, 4)`` transition probabilities: a Dirichlet draw around the composition
    ``(A, C, G, T) = ((1-gc)/2, gc/2, gc/2, (1-gc)/2)``. Contexts are little-endian (the base
    just before is the lowest base-4 digit), as in :mod:`attnkit.genome.markov`."""
    if not 0 < gc < 1:
        raise ValueError(f"gc must be in (0, 1), got {gc}")
    comp = np.array([(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2])
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    probs = torch.from_numpy(rng.dirichlet(comp * 4 * concentration, size=4**order))
    return probs


def markov_background(num_seqs: int, length: int, probs: Tensor,
                      generator: torch.Generator) -> Tensor:
    """Sample ``(num_seqs, length)`` tokens from the chain ``probs (4**k, 4)`` (vectorized over
    sequences, sequential along them)."""
    order = 0
    while 4**order < probs.shape[0]:
        order += 1
    if probs.shape != (4**order, 4):
        raise ValueError(f"probs must have shape (4**k, 4), got {tuple(probs.shape)}")
    cum = probs.cumsum(1).float()
    u = torch.rand(num_seqs, length, generator=generator)
    out = torch.empty(num_seqs, length, dtype=torch.long)
    start = torch.randint(0, 4, (num_seqs, max(order, 1)), generator=generator)
    out[:, :order] = start[:, :order]
    ctx = torch.zeros(num_seqs, dtype=torch.long)
    for r in range(1, order + 1):
        ctx += out[:, order - r] * 4 ** (r - 1)
    top = 4 ** max(order - 1, 0)
    for j in range(order, length):
        base = (u[:, j : j + 1] > cum[ctx]).sum(1).clamp_(max=3)
        out[:, j] = base
        ctx = (ctx % top) * 4 + base if order else ctx
    return out


@dataclass
class HubTask:
    """Generator of the planted hub-motif task.

    Args:
        length: bases per sample.
        num_hubs: hubs (= segments = distinct tags); hub ``h`` sits near the start of segment
            ``h`` at :attr:`hub_positions`.
        genes_per_hub: genes per segment.
        min_distance: each gene lies at least this far downstream of its hub (set it beyond
            the local receptive field: ``depth * window + stem``).
        motif_len: bases of a tag and of a class motif (a hub motif is ``tag + class``).
        num_classes: label classes.
        seed: fixes the motifs and the background chain.
    """

    length: int = 4096
    num_hubs: int = 4
    genes_per_hub: int = 4
    min_distance: int = 256
    motif_len: int = 4
    num_classes: int = 2
    seed: int = 0
    pool_size: int = 64
    hub_positions: Tensor = field(init=False)

    def __post_init__(self) -> None:
        seg = self.length // max(self.num_hubs, 1)
        room = seg - self.min_distance - 3 * self.motif_len
        if self.num_hubs < 1 or room < self.genes_per_hub * 2 * self.motif_len:
            raise ValueError(
                f"length={self.length} leaves no room for {self.genes_per_hub} genes per hub "
                f"at min_distance={self.min_distance} with {self.num_hubs} hubs"
            )
        gen = torch.Generator().manual_seed(self.seed)
        need = self.num_hubs + self.num_classes
        motifs: list[tuple[int, ...]] = []
        while len(motifs) < need:  # distinct tag and class motifs
            m = tuple(torch.randint(0, 4, (self.motif_len,), generator=gen).tolist())
            if m not in motifs:
                motifs.append(m)
        self.tags = torch.tensor(motifs[: self.num_hubs])
        self.classes = torch.tensor(motifs[self.num_hubs :])
        self.hub_positions = torch.arange(self.num_hubs) * seg + 2 * self.motif_len
        self._segment = seg
        self._chain = random_markov_chain(3, gen)
        self._pool = markov_background(self.pool_size, self.length, self._chain, gen)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(tokens (B, L) int64, labels (B, L) int64)``; labels are ``IGNORE_INDEX`` except
        on gene motifs, where they are the class of the gene's hub."""
        L, m, seg = self.length, self.motif_len, self._segment
        rows = torch.randint(0, self.pool_size, (batch,), generator=generator)
        shifts = torch.randint(0, L, (batch,), generator=generator).tolist()
        tokens = torch.stack([self._pool[r].roll(s) for r, s in zip(rows.tolist(), shifts)])
        labels = torch.full((batch, L), IGNORE_INDEX, dtype=torch.long)
        slots = (seg - self.min_distance - 3 * m) // (2 * m)
        for b in range(batch):
            perm = torch.randperm(self.num_hubs, generator=generator)
            cls = torch.randint(0, self.num_classes, (self.num_hubs,), generator=generator)
            for h in range(self.num_hubs):
                p = int(self.hub_positions[h])
                tag = self.tags[perm[h]]
                tokens[b, p - m : p] = tag  # tag ends at the hub position
                tokens[b, p : p + m] = self.classes[cls[h]]  # class starts at it
                first = p + self.min_distance
                picks = torch.randperm(slots, generator=generator)[: self.genes_per_hub]
                for s in picks.tolist():
                    g = first + 2 * m * s
                    tokens[b, g : g + m] = tag
                    labels[b, g : g + m] = int(cls[h])
        return tokens, labels


@dataclass
class LongRangeTask:
    """Planted long-range pairs at a fixed distance, at positions the model is not told.

    Each sample is ``length`` bases of the order-3 background with one planted pair: a *source*
    ``marker + class motif`` at a uniformly random position ``p``, and a *target* ``query``
    motif at ``p + distance``; the target's bases are labelled with the class (one of
    ``num_classes``), every other position is ``IGNORE_INDEX``. The class is drawn afresh per
    sample, so it can only be read at the source, ``distance`` bases upstream of the label.
    Nothing in the input marks where the pair is: the positions appear only in the returned
    ``sources`` (for tests), never in the tokens beyond the motifs themselves, and any global
    tokens of a model must be placed without them (evenly spaced or appended).

    Args:
        distance: bases from the source's start to the target's start (>= 2 * motif_len).
        length: bases per sample (> distance + 3 * motif_len).
        motif_len: bases of the marker, the query and each class motif.
        num_classes: label classes.
        seed: fixes the motifs and the background chain (the same for every distance).
    """

    distance: int
    length: int
    motif_len: int = 8
    num_classes: int = 2
    seed: int = 0
    pool_size: int = 32

    def __post_init__(self) -> None:
        m = self.motif_len
        if self.distance < 2 * m:
            raise ValueError(f"distance must be >= 2 * motif_len = {2 * m}, got {self.distance}")
        if self.length <= self.distance + 3 * m:
            raise ValueError(f"length must exceed distance + 3 * motif_len = "
                             f"{self.distance + 3 * m}, got {self.length}")
        gen = torch.Generator().manual_seed(self.seed)
        motifs: list[tuple[int, ...]] = []
        while len(motifs) < 2 + self.num_classes:  # marker, query, classes: all distinct
            motif = tuple(torch.randint(0, 4, (m,), generator=gen).tolist())
            if motif not in motifs:
                motifs.append(motif)
        self.marker, self.query = torch.tensor(motifs[0]), torch.tensor(motifs[1])
        self.classes = torch.tensor(motifs[2:])
        chain = random_markov_chain(3, gen)
        self._pool = markov_background(self.pool_size, self.length, chain, gen)

    def sample(self, batch: int, generator: torch.Generator
               ) -> tuple[Tensor, Tensor]:
        """``(tokens (B, L), labels (B, L))`` int64 (the training interface)."""
        tokens, labels, _ = self.sample_with_sources(batch, generator)
        return tokens, labels

    def sample_with_sources(self, batch: int, generator: torch.Generator
                            ) -> tuple[Tensor, Tensor, Tensor]:
        """``(tokens (B, L), labels (B, L), sources (B,))``: ``sources`` are the planted
        source positions (the target is at ``sources + distance``), for tests only."""
        L, m, d = self.length, self.motif_len, self.distance
        rows = torch.randint(0, self.pool_size, (batch,), generator=generator)
        shifts = torch.randint(0, L, (batch,), generator=generator)
        tokens = torch.stack([self._pool[r].roll(s) for r, s in zip(rows.tolist(),
                                                                        shifts.tolist())])
        labels = torch.full((batch, L), IGNORE_INDEX, dtype=torch.long)
        sources = torch.randint(0, L - d - m + 1, (batch,), generator=generator)
        cls = torch.randint(0, self.num_classes, (batch,), generator=generator)
        for b in range(batch):
            p, c = int(sources[b]), int(cls[b])
            tokens[b, p : p + m] = self.marker
            tokens[b, p + m : p + 2 * m] = self.classes[c]
            tokens[b, p + d : p + d + m] = self.query
            labels[b, p + d : p + d + m] = c
        return tokens, labels, sources


@dataclass
class DistanceCurriculum:
    """Training batches over several :class:`LongRangeTask` distances, shortest first.

    Training runs in ``len(tasks)`` stages of ``steps_per_stage`` calls to :meth:`sample`;
    stage ``s`` draws each batch from one of the ``s + 1`` shortest distances (uniformly, from
    the caller's generator), so what was learnt at short range keeps being trained while the
    distance grows. Every arm of an experiment gets the same curriculum: it carries no
    information about where a planted pair sits, only how far apart its two halves are, which
    every sample of a :class:`LongRangeTask` fixes anyway.

    Args:
        tasks: the tasks, one per distance (same ``seed``: same motifs and background chain).
        steps_per_stage: batches per stage (> 0).
        max_bases: optional cap on the bases of one batch: a batch at a distance whose
            samples are ``length`` bases long holds ``max(1, min(batch, max_bases // length))``
            samples (the cost of a step grows with its bases; at 10^5-base distances a full
            batch of 16 samples is 3.2M bases, ~1.5 min of one-core CPU per step).
    """

    tasks: list[LongRangeTask]
    steps_per_stage: int
    max_bases: int | None = None
    calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks is empty")
        check_positive_int("steps_per_stage", self.steps_per_stage)
        check_positive_int("max_bases", self.max_bases, optional=True)
        self.tasks = sorted(self.tasks, key=lambda t: t.distance)
        ref = self.tasks[0]
        for t in self.tasks[1:]:
            if not (torch.equal(t.marker, ref.marker) and torch.equal(t.query, ref.query)
                    and torch.equal(t.classes, ref.classes)):
                raise ValueError("every task must share its motifs (build them with one seed)")

    @property
    def total_steps(self) -> int:
        return self.steps_per_stage * len(self.tasks)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(tokens (B', L_d), labels (B', L_d))`` of one distance ``d`` of the current stage
        (``B' = batch`` unless ``max_bases`` caps it)."""
        stage = min(self.calls // self.steps_per_stage, len(self.tasks) - 1)
        self.calls += 1
        pick = int(torch.randint(0, stage + 1, (1,), generator=generator))
        task = self.tasks[pick]
        return task.sample(self.batch_for(task, batch), generator)

    def batch_for(self, task: LongRangeTask, batch: int) -> int:
        """Samples of ``task`` in a batch asked for as ``batch`` (see ``max_bases``)."""
        if self.max_bases is None:
            return batch
        return max(1, min(batch, self.max_bases // task.length))
