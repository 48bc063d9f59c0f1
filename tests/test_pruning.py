"""Head importance, physical head pruning, iterative pruning and save/load of pruned models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnkit.decoding import generate
from attnkit.flops import count
from attnkit.models import DecoderLM
from attnkit.nn import SelfAttention
from attnkit.pruning import (
    attention_layers,
    head_gates,
    head_importance,
    iterative_prune,
    lm_loss,
    load_pruned,
    measure_latency,
    prune_heads,
    save_pruned,
)

VOCAB, DIM = 40, 32


def _lm(kv_heads=None, depth=2, heads=4, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    lm = DecoderLM(VOCAB, DIM, depth, heads, kv_heads, max_seq_len=64).to(dtype)
    # Larger weights than the 0.02 init so heads differ visibly in the outputs.
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return lm.eval()


def _gated(lm, request, ids):
    layers = attention_layers(lm)
    gates = [torch.ones(m.num_heads, dtype=torch.float64) for m in layers]
    for layer, heads in request.items():
        gates[layer][heads] = 0.0
    with head_gates(lm, gates):
        return lm(ids)


@settings(max_examples=12, deadline=None)
@given(kv_heads=st.sampled_from([4, 2, 1]), data=st.data())
def test_pruning_equals_gating_to_zero(kv_heads, data):
    lm = _lm(kv_heads)
    group = 4 // kv_heads
    request = {}
    for layer in range(2):
        groups = data.draw(st.lists(st.integers(0, kv_heads - 1), unique=True,
                                    max_size=kv_heads - 1), label=f"groups{layer}")
        if groups:
            request[layer] = [g * group + i for g in groups for i in range(group)]
    ids = torch.randint(0, VOCAB, (2, 12))
    expected = _gated(lm, request, ids)
    pruned = prune_heads(copy.deepcopy(lm), request)
    torch.testing.assert_close(pruned(ids), expected, atol=1e-5, rtol=0)
    for layer, m in enumerate(attention_layers(pruned)):
        removed = len(request.get(layer, []))
        assert m.num_heads == 4 - removed
        assert m.num_kv_heads == kv_heads - removed // group
        assert m.q_proj.out_features == m.num_heads * m.head_dim
        assert m.k_proj.out_features == m.v_proj.out_features == m.num_kv_heads * m.head_dim
        assert m.out_proj.in_features == m.num_heads * m.head_dim


def test_pruning_single_head_float32_and_differs_from_unpruned():
    lm = _lm(dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 10))
    gates = [torch.ones(4), torch.ones(4)]
    gates[1][2] = 0
    with head_gates(lm, gates):
        expected = lm(ids)
    pruned = prune_heads(copy.deepcopy(lm), {1: [2]})
    out = pruned(ids)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - lm(ids)).abs().max() > 1e-3  # the head mattered: the check is not vacuous


def test_prune_then_prune_again_renumbers_heads():
    lm = _lm()
    ids = torch.randint(0, VOCAB, (1, 8))
    expected = _gated(lm, {0: [0, 2]}, ids)
    pruned = prune_heads(copy.deepcopy(lm), {0: [0]})
    prune_heads(pruned, {0: [1]})  # original head 2 is now head 1
    torch.testing.assert_close(pruned(ids), expected, atol=1e-10, rtol=0)


def test_head_importance_matches_finite_difference_definition():
    lm = _lm()
    batches = [torch.randint(0, VOCAB, (2, 9)) for _ in range(2)]
    raw = head_importance(lm, batches, normalize=False)
    eps = 1e-6
    for layer, head in [(0, 1), (1, 3)]:
        diffs = []
        for b in batches:
            values = []
            for sign in (1, -1):
                gates = [torch.ones(4, dtype=torch.float64) for _ in range(2)]
                gates[layer][head] += sign * eps
                with head_gates(lm, gates), torch.no_grad():
                    values.append(float(lm_loss(lm, b)))
            diffs.append(abs(values[0] - values[1]) / (2 * eps))
        assert raw[layer][head].item() == pytest.approx(sum(diffs) / len(diffs), rel=1e-4)
    normalized = head_importance(lm, batches)
    for n, r in zip(normalized, raw):
        assert n.norm().item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(n, (r / r.norm()).float())
    assert all(p.grad is None for p in lm.parameters())


def test_save_load_round_trip(tmp_path):
    lm = _lm(kv_heads=2, depth=3, dtype=torch.float32)
    prune_heads(lm, {0: [0, 1], 2: [2, 3]})
    path = tmp_path / "pruned.pt"
    save_pruned(lm, path)
    loaded = load_pruned(path)
    assert [(m.num_heads, m.num_kv_heads) for m in attention_layers(loaded)] == [
        (2, 1), (4, 2), (2, 1)]
    ids = torch.randint(0, VOCAB, (2, 11))
    torch.testing.assert_close(loaded(ids), lm(ids), atol=0, rtol=0)
    assert loaded.head.weight is loaded.embed.weight  # tying survives


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a pruned model"):
        load_pruned(path)
    with pytest.raises(ValueError, match="no such file"):
        load_pruned(tmp_path / "missing.pt")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_pruned_model_generates_with_kv_cache(cache):
    lm = _lm(kv_heads=2, dtype=torch.float32)
    prune_heads(lm, {0: [2, 3], 1: [0, 1]})
    prompt = torch.randint(0, VOCAB, (2, 5))
    cached = generate(lm, prompt, 12, temperature=0, cache=cache)
    uncached = generate(lm, prompt, 12, temperature=0, use_cache=False)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)


def test_pruning_reduces_flops_by_the_removed_projections_and_cores():
    lm = _lm(dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 16))
    before = count(lm, ids)
    prune_heads(lm, {0: [1]})
    after = count(lm, ids)
    hd, tokens = DIM // 4, 2 * 16
    removed = 4 * 2 * DIM * hd * tokens + 2 * 2 * (16 * 17 // 2) * 2 * hd
    assert before.total - after.total == removed
    assert before.params - after.params == 4 * DIM * hd  # q, k, v rows and out_proj columns


@pytest.mark.parametrize(
    "request_,error,match",
    [
        ({5: [0]}, ValueError, "unknown layer 5"),
        ({-1: [0]}, ValueError, "unknown layer"),
        ({0: [4]}, ValueError, "unknown head 4 in layer 0"),
        ({0: [0, 1, 2, 3]}, ValueError, "refusing to prune all 4 heads"),
        ([0], TypeError, "must be a dict"),
    ],
)
def test_bad_requests(request_, error, match):
    lm = _lm()
    state = copy.deepcopy(lm.state_dict())
    with pytest.raises(error, match=match):
        prune_heads(lm, request_)
    assert all(torch.equal(state[k], v) for k, v in lm.state_dict().items())  # untouched


def test_partial_group_is_refused_with_the_group_named():
    lm = _lm(kv_heads=2)
    with pytest.raises(ValueError, match=r"query heads \[2, 3\] form key/value group 1"):
        prune_heads(lm, {1: [2]})
    lm_mqa = _lm(kv_heads=1)
    with pytest.raises(ValueError, match="refusing to prune all"):
        prune_heads(lm_mqa, {0: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"query heads \[0, 1, 2, 3\] form key/value group 0"):
        prune_heads(lm_mqa, {0: [0]})


def test_model_without_attention_is_refused():
    with pytest.raises(ValueError, match="no attnkit.nn.SelfAttention"):
        prune_heads(nn.Sequential(nn.Linear(4, 4)), {0: [0]})
    with pytest.raises(ValueError, match="no attnkit.nn.SelfAttention"):
        head_importance(nn.Linear(4, 4), [torch.zeros(1, 4)], lambda m, b: m(b).sum())


def test_gates_shape_checked():
    lm = _lm()
    with pytest.raises(ValueError, match=r"gates\[1\] must have shape \(4,\)"):
        with head_gates(lm, [torch.ones(4), torch.ones(3)]):
            pass


def test_iterative_prune_records_each_step_and_prunes_least_important_first():
    lm = _lm(depth=2, dtype=torch.float32)
    data = [torch.randint(0, VOCAB, (2, 13)) for _ in range(2)]
    ids = data[0][:, :-1]
    first_scores = head_importance(lm, data)
    finetuned = []

    def evaluate(m):
        with torch.no_grad():
            return float(lm_loss(m, data[1]))

    history = iterative_prune(
        lm, data, evaluate, 0.25, flop_inputs=(ids,),
        finetune=lambda m: finetuned.append(sum(a.num_heads for a in attention_layers(m))),
        latency_fn=lambda m: 0.0)
    assert [h.heads for h in history] == [8, 6, 4, 2]  # 2 heads per step, 1 left per layer
    assert history[-1].heads_per_layer == [1, 1]
    assert finetuned == [6, 4, 2]
    assert all(a.flops > b.flops for a, b in zip(history, history[1:]))
    assert history[0].flops == count(_lm(depth=2, dtype=torch.float32), ids).total
    assert [h.fraction_pruned for h in history] == [0.0, 0.25, 0.5, 0.75]
    assert all(math.isfinite(h.metric) for h in history)
    # step 1 removed the two heads with the lowest normalized importance
    flat = sorted((float(s), layer, h) for layer, sc in enumerate(first_scores)
                  for h, s in enumerate(sc))
    expected = {}
    for _, layer, h in flat[:2]:
        expected.setdefault(layer, []).append(h)
    assert {k: sorted(v) for k, v in history[1].removed.items()} == {
        k: sorted(v) for k, v in expected.items()}


def test_iterative_prune_gqa_removes_whole_groups():
    lm = _lm(kv_heads=2, depth=2, dtype=torch.float32)
    data = [torch.randint(0, VOCAB, (2, 9))]
    history = iterative_prune(lm, data, lambda m: 0.0, 0.1, flop_inputs=(data[0][:, :-1],))
    assert [h.heads for h in history] == [8, 6, 4]
    assert all(m.num_kv_heads == 1 and m.num_heads == 2 for m in attention_layers(lm))


def test_iterative_prune_bad_arguments():
    lm = _lm()
    with pytest.raises(ValueError, match="fraction_per_step"):
        iterative_prune(lm, [], lambda m: 0.0, 0.0, flop_inputs=(torch.zeros(1, 1),))
    with pytest.raises(TypeError, match="flop_inputs"):
        iterative_prune(lm, [], lambda m: 0.0, flop_inputs=[torch.zeros(1, 1)])


def test_gating_a_whole_mha_module_directly():
    """head_gates also works on a bare SelfAttention (layer 0 is the module itself)."""
    torch.manual_seed(1)
    m = SelfAttention(DIM, 4).double()
    x = torch.randn(1, 6, DIM, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    with head_gates(m, [mask]):
        expected = m(x)
    prune_heads(m, {0: [1]})
    torch.testing.assert_close(m(x), expected, atol=1e-10, rtol=0)


def test_measure_latency_restores_training_mode():
    lm = _lm(dtype=torch.float32).train()
    seconds = measure_latency(lm, torch.randint(0, VOCAB, (1, 8)), repeats=2)
    assert 0.0 < seconds < 10.0
    assert lm.training
