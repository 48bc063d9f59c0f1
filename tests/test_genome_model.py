"""GenomeEncoder (sparse == dense masked), Markov baselines, training and bits per base."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnkit import patterns as P
from attnkit.genome import (
    GenomeEncoder,
    GenomePattern,
    HubTask,
    MarkovModel,
    bits_per_base,
    encode,
    markov_baselines,
    train_mlm,
)
from attnkit.genome import model as model_mod
from attnkit.genome.train import label_accuracy, load_checkpoint, mask_tokens

PATTERNS = [
    GenomePattern(window=3, exponential=True, hubs=2),
    GenomePattern(window=2, exponential=False, hubs=(0, 17)),
    GenomePattern(window=4, exponential=True, hubs=0),
    P.sliding_window(2) | P.dilated(3, 4),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_sparse_equals_dense_masked_forward_and_grad(pattern):
    L = 37
    torch.manual_seed(0)
    model = GenomeEncoder(16, 2, 2, pattern).double()
    tokens = torch.randint(0, 6, (2, L))
    pat = pattern(L) if isinstance(pattern, GenomePattern) else pattern
    assert not pat.to_dense(L, L).all()  # meaningful only when the pattern is sparse
    w = torch.randn(2, L, 16, dtype=torch.float64)
    grads = []
    outs = []
    for ref in (False, True):
        model.zero_grad()
        h = model(tokens, dense_reference=ref)
        (h * w).sum().backward()
        outs.append(h.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    assert grads[0].keys() == grads[1].keys() and "blocks.0.attn.q_proj.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-10,
                                   msg=name)
    # the dense reference is the plain SDPA path with an explicit mask; without the mask
    # (all keys) the answer differs, so the comparison can fail
    dense = GenomeEncoder(16, 2, 2, None).double()
    dense.load_state_dict(model.state_dict())
    assert not torch.allclose(dense(tokens), outs[0])


@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_streaming_whole_sequence_equals_forward(chunk):
    torch.manual_seed(1)
    model = GenomeEncoder(16, 2, 2, GenomePattern(window=4, hubs=3), stem_kernel=5).double()
    tokens = torch.randint(0, 6, (53,))
    torch.testing.assert_close(model.embed_genome(tokens, chunk_size=chunk),
                               model(tokens[None])[0], rtol=1e-10, atol=1e-10)


def test_streaming_default_chunks_equal_forward_fp32(monkeypatch):
    """The default cache-sized chunks (several per sequence here), per-chunk rotary tables and
    the pre-scaled queries give the unchunked forward's numbers to fp32 rounding."""
    monkeypatch.setattr(model_mod, "STREAM_CHUNK_BYTES", 64 * 1024)
    torch.manual_seed(2)
    model = GenomeEncoder(16, 2, 2, GenomePattern(window=8, hubs=4)).eval()
    chunk = model.stream_chunk()
    assert chunk == 64 * 1024 // (4 * 16 * 4)  # MLP hidden of a chunk = the byte budget
    tokens = torch.randint(0, 6, (5 * chunk + 37,))
    with torch.no_grad():
        ref = model(tokens[None])[0]
    got = model.embed_genome(tokens)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.embed_genome(tokens, chunk_size=tokens.numel()), got,
                               rtol=1e-4, atol=1e-5)
    # per-chunk tables must carry the chunk's own positions: shifting every chunk but the
    # first by one position (rotary is relative, so only a non-uniform shift shows) changes
    # the result far beyond rounding
    orig = model_mod._rope_tables
    monkeypatch.setattr(model_mod, "_rope_tables",
                        lambda attn, s, e, *a: orig(attn, s + (s > 0), e + (s > 0), *a))
    assert not torch.allclose(model.embed_genome(tokens), ref, rtol=1e-3, atol=1e-3)


def test_encoder_bad_input():
    model = GenomeEncoder(8, 1, 2)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must be in"):
        model(torch.full((1, 5), 9))
    with pytest.raises(ValueError, match="divisible"):
        GenomeEncoder(10, 1, 3)
    with pytest.raises(ValueError, match="window"):
        GenomePattern(window=-1)
    with pytest.raises(ValueError, match="outside"):
        GenomePattern(hubs=(3, 100))(50)


def test_genome_pattern_hubs_and_cost():
    pat = GenomePattern(window=8, exponential=True, hubs=4)
    assert pat.hub_positions(1000).tolist() == [125, 375, 625, 875]
    p = pat(4096)
    nnz = p.nnz(4096, 4096)
    assert nnz < 4096 * (2 * 8 + 1 + 2 * 13 + 2 * 4) + 4 * 4096  # near-linear, far below L^2


# ------------------------------------------------------------------------------- markov


def test_markov_bits_known_sequence():
    m = MarkovModel(0, alpha=1.0).fit(encode("AAC"))
    # counts A=2, C=1, +1 smoothing: P(A)=3/7, P(C)=2/7
    expected = -(math.log2(3 / 7) + math.log2(2 / 7)) / 2
    assert math.isclose(m.bits_per_base(encode("AC")), expected, rel_tol=1e-12)
    # a period-4 sequence is deterministic at order 1: bits -> 0 with tiny smoothing
    seq = encode("ACGT" * 200)
    m1 = MarkovModel(1, alpha=1e-6).fit(seq)
    assert m1.bits_per_base(seq) < 1e-4
    assert math.isclose(MarkovModel(0, 1e-9).fit(seq).bits_per_base(seq), 2.0, rel_tol=1e-6)


def test_markov_masked_matches_brute_force():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 4, 400)
    test = rng.integers(0, 4, 12)
    for k in (0, 1, 2):
        m = MarkovModel(k, alpha=0.7).fit(train)

        def joint(seq, m=m):
            lp, _ = m.log2_prob(seq)
            return lp.sum()

        bits = []
        for i in range(k, len(test) - k):
            scores = []
            for b in range(4):
                s = test.copy()
                s[i] = b
                scores.append(joint(s))
            scores = np.array(scores)
            lse = np.log2(np.exp2(scores - scores.max()).sum()) + scores.max()
            bits.append(-(scores[test[i]] - lse))
        assert math.isclose(m.masked_bits_per_base(test), float(np.mean(bits)), rel_tol=1e-9)


def test_markov_skips_n_and_checks_input():
    m = MarkovModel(2).fit(encode("ACGTNNACGTACGT"))
    lp, ok = m.log2_prob(encode("ACGTNAC"))
    assert ok.tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError):
        MarkovModel(13)
    with pytest.raises(ValueError):
        m.fit(np.array([0, 1, 7]))
    rows = markov_baselines(encode("ACGT" * 50), encode("ACGT" * 10), orders=[0, 1, 2])
    assert [r["order"] for r in rows] == [0, 1, 2]
    assert rows[1]["bits_per_base"] < rows[0]["bits_per_base"]


# ------------------------------------------------------------------------------- training


def test_mask_tokens():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5, (4, 2000), generator=gen)
    inputs, targets = mask_tokens(tokens, 0.15, gen)
    chosen = targets != -100
    assert abs(float(chosen.float().mean()) - 0.15 * 0.8) < 0.02  # N (1/5) is never chosen
    assert bool((tokens[chosen] < 4).all()) and bool((targets[chosen] == tokens[chosen]).all())
    assert bool((inputs[~chosen] == tokens[~chosen]).all())
    assert abs(float((inputs[chosen] == 5).float().mean()) - 0.8) < 0.05


def test_train_mlm_learns_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    seq = encode("AACGTTGCA" * 300)  # period 9: learnable from neighbours
    model = GenomeEncoder(16, 1, 2, GenomePattern(window=8, hubs=2))
    before = bits_per_base(model, seq[:900], stride=4)
    ckpt = tmp_path / "m.pt"
    losses = train_mlm(model, seq, steps=40, window_len=512, batch_size=2, lr=3e-3,
                       checkpoint=ckpt, checkpoint_every=20)
    after = bits_per_base(model, seq[:900], stride=4)
    assert len(losses) == 40 and after < before - 0.5
    state = load_checkpoint(ckpt)
    assert state["step"] == 40 and state["config"]["dim"] == 16
    fresh = GenomeEncoder(16, 1, 2, GenomePattern(window=8, hubs=2))
    fresh.load_state_dict(state["model"])
    assert math.isclose(bits_per_base(fresh, seq[:900], stride=4), after, rel_tol=1e-6)
    # resume: continues from step 40 to 45
    assert len(train_mlm(model, seq, steps=45, window_len=512, checkpoint=ckpt,
                         resume=True)) == 5
    with pytest.raises(ValueError, match="shorter than window_len"):
        train_mlm(model, seq[:100], steps=1, window_len=512)


def test_hub_task_structure():
    task = HubTask(length=1024, num_hubs=2, genes_per_hub=3, min_distance=100, seed=0)
    tokens, labels = task.sample(4, torch.Generator().manual_seed(0))
    assert tokens.shape == labels.shape == (4, 1024)
    m = task.motif_len
    for b in range(4):
        for p in task.hub_positions.tolist():
            tag = tokens[b, p - m : p]
            cls = next(c for c in range(2) if torch.equal(tokens[b, p : p + m], task.classes[c]))
            seg = slice(p + 100, p + 512 - 2 * m)
            genes = (labels[b, seg] != -100).nonzero().flatten()
            assert genes.numel() == 3 * m
            assert bool((labels[b, seg][genes] == cls).all())
            start = int(genes[0]) + p + 100
            assert torch.equal(tokens[b, start : start + m], tag)
    with pytest.raises(ValueError, match="no room"):
        HubTask(length=256, num_hubs=4, min_distance=200)


def test_markov_order1_hand_computed_and_high_orders():
    # order 1 on "AACAG": transitions A->A, A->C, C->A, A->G; alpha 1:
    # P(.|A) = (A 2, C 2, G 2, T 1)/7, P(.|C) = (A 2, 1, 1, 1)/5, P(.|G) uniform (unseen)
    m = MarkovModel(1, alpha=1.0).fit(encode("AACAG"))
    lp, ok = m.log2_prob(encode("ACGT"))  # A->C, C->G, G->T
    expected = [math.log2(2 / 7), math.log2(1 / 5), math.log2(1 / 4)]
    assert ok.all() and np.allclose(lp, expected, rtol=0, atol=1e-12)
    assert np.allclose(m.counts[0], [1, 1, 1, 0]) and np.allclose(m.counts[1], [1, 0, 0, 0])
    # orders up to 12 use memory in proportion to the data, and memorize a repeated sequence
    rng = np.random.default_rng(1)
    seq = rng.integers(0, 4, 3000)
    m12 = MarkovModel(12, alpha=1e-3).fit(np.concatenate([seq, seq]))
    assert m12.bits_per_base(seq[:500]) < 0.1


def test_select_markov_chooses_on_validation_only():
    from attnkit.genome.markov import select_markov

    rng = np.random.default_rng(2)
    period = rng.integers(0, 4, 7)  # period-7 sequence: order >= 3 predicts it exactly
    seq = np.tile(period, 300)
    best, rows = select_markov(seq[:1400], seq[1400:1750], seq[1750:], orders=[0, 1, 2, 3, 4])
    assert [r["order"] for r in rows] == [0, 1, 2, 3, 4]
    assert best["order"] == min(rows, key=lambda r: r["valid_masked_bits_per_base"])["order"]
    assert best["order"] >= 3 and best["masked_bits_per_base"] < 0.05


def test_label_accuracy_in_slices_without_autograd():
    """label_accuracy over a few samples at a time (max_bases) equals one call over all of them,
    builds no autograd graph, and rejects a non-positive max_bases."""
    torch.manual_seed(0)
    model = GenomeEncoder(16, 2, 2, GenomePattern(window=4, hubs=2), num_labels=2)
    tokens = torch.randint(0, 4, (7, 50))
    labels = torch.randint(0, 2, (7, 50)).masked_fill(torch.rand(7, 50) < 0.5, -100)
    with torch.no_grad():
        pred = model.label_logits(model(tokens)).argmax(-1)
    keep = labels != -100
    whole = float((pred[keep] == labels[keep]).float().mean())
    grad_on = []
    model.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    for max_bases in (1, 120, 10_000):  # 1 and 2 samples per slice, then all
        assert label_accuracy(model, tokens, labels, max_bases=max_bases) == pytest.approx(whole)
    assert len(grad_on) == 7 + 4 + 1 and not any(grad_on)
    with pytest.raises(ValueError, match="max_bases"):
        label_accuracy(model, tokens, labels, max_bases=0)
