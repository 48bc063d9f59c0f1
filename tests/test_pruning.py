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
from attnkit.flops import attention_flop_share, count
from attnkit.models import DecoderLM
from attnkit.nn import SelfAttention
from attnkit.pruning import (
    attention_layers,
    gated_curve,
    head_gates,
    head_importance,
    iterative_prune,
    lm_loss,
    load_pruned,
    measure_latency,
    prune_heads,
    random_prune_order,
    replay_prune,
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


# ------------------------------------------------------------------------ the ViT, curves


def _vit(seed=0, depth=2, heads=4, dim=16):
    from attnkit.vision.model import ViT

    torch.manual_seed(seed)
    vit = ViT(8, 2, 1, 10, dim=dim, depth=depth, num_heads=heads)
    with torch.no_grad():
        for p in vit.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return vit.eval()


def test_pruning_a_vit_removes_parameters_and_keeps_kept_heads_bit_identical():
    # width 32: for a 16-wide input BLAS picks another kernel for the narrower q/k/v matrix
    # and the last bit moves (the kept rows are the same dot products otherwise)
    dim = 32
    vit = _vit(dim=dim)
    x = torch.rand(5, 1, 8, 8)
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()
        return hook

    h = attention_layers(vit)[0].out_proj.register_forward_pre_hook(grab("before"))
    vit(x)
    h.remove()
    pruned = prune_heads(copy.deepcopy(vit), {0: [0, 2]})
    h = attention_layers(pruned)[0].out_proj.register_forward_pre_hook(grab("after"))
    pruned(x)
    h.remove()
    hd = dim // 4
    kept = torch.cat([seen["before"][..., hd:2 * hd], seen["before"][..., 3 * hd:]], dim=-1)
    assert torch.equal(seen["after"], kept)  # fp32, same inputs: the same bits
    layer = attention_layers(pruned)[0]
    assert (layer.num_heads, layer.q_proj.weight.shape, layer.out_proj.weight.shape) == (
        2, (2 * hd, dim), (dim, 2 * hd))
    removed = sum(p.numel() for p in vit.parameters()) - sum(
        p.numel() for p in pruned.parameters())
    assert removed == 2 * (4 * dim * hd + 3 * hd)  # q, k, v rows + out columns, q/k/v biases
    with pytest.raises(ValueError, match="unknown head 2 in layer 0"):
        prune_heads(pruned, {0: [2]})
    with pytest.raises(ValueError, match="all 2 heads of layer 0"):
        prune_heads(pruned, {0: [0, 1]})


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_random_prune_order_keeps_one_group_per_layer_and_is_seeded(kv_heads):
    lm = _lm(kv_heads=kv_heads, depth=3, dtype=torch.float32)
    order = random_prune_order(lm, torch.Generator().manual_seed(3))
    group = 1 if kv_heads is None else 2
    assert all(len(heads) == group and heads[0] % group == 0 for _, heads in order)
    per_layer = {i: sum(len(h) for j, h in order if j == i) for i in range(3)}
    assert per_layer == {i: 4 - group for i in range(3)}  # one group left in every layer
    assert len({(i, tuple(h)) for i, h in order}) == len(order)
    assert order == random_prune_order(lm, torch.Generator().manual_seed(3))
    orders = {tuple((i, tuple(h)) for i, h in random_prune_order(lm, torch.Generator()
                                                                   .manual_seed(s)))
              for s in range(6)}
    assert len(orders) > 1


def test_gated_curve_matches_physical_pruning_and_checks_its_order():
    vit = _vit(seed=1).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    order = random_prune_order(vit, torch.Generator().manual_seed(0))
    curve = gated_curve(vit, order, lambda m: float(m(x).sum()), counts=[0, 2, 5])
    assert [k for k, _ in curve] == [0, 2, 5]
    with torch.no_grad():
        assert curve[0][1] == float(vit(x).sum())
    request: dict[int, list[int]] = {}
    for layer, heads in order[:5]:
        request.setdefault(layer, []).extend(heads)
    pruned = prune_heads(copy.deepcopy(vit), request)
    with torch.no_grad():
        assert curve[2][1] == pytest.approx(float(pruned(x).sum()), rel=1e-12)
    with pytest.raises(ValueError, match="counts must be ints"):
        gated_curve(vit, order, lambda m: 0.0, counts=[len(order) + 1])
    with pytest.raises(ValueError, match="remove every head of a layer"):
        gated_curve(vit, [(0, [0]), (0, [1]), (0, [2]), (0, [3])], lambda m: 0.0, counts=[4])
    with pytest.raises(ValueError, match="outside the model"):
        gated_curve(vit, [(0, [7])], lambda m: 0.0)


def test_replay_prune_rebuilds_the_recorded_step():
    lm = _lm(depth=2, dtype=torch.float32)
    data = [torch.randint(0, VOCAB, (2, 13)) for _ in range(2)]
    ids = data[0][:, :-1]
    work = copy.deepcopy(lm)
    history = iterative_prune(work, data, lambda m: 0.0, 0.25, flop_inputs=(ids,))
    for step in range(len(history)):
        replayed = replay_prune(lm, history, step)
        assert count(replayed, ids).total == history[step].flops
        assert [m.num_heads for m in attention_layers(replayed)] == history[step].heads_per_layer
    torch.testing.assert_close(replay_prune(lm, history, len(history) - 1)(ids), work(ids))
    assert [m.num_heads for m in attention_layers(lm)] == [4, 4]  # the original is untouched
    with pytest.raises(ValueError, match="upto_step"):
        replay_prune(lm, history, len(history))


def test_attention_flop_share_follows_the_formulas():
    vit = _vit(depth=2, heads=4, dim=16)
    x = torch.rand(3, 1, 8, 8)
    whole, core = attention_flop_share(vit, x)
    tokens, n, dim = 3 * 16, 16, 16
    proj = 4 * 2 * dim * dim * tokens  # q, k, v, out per layer
    cores = 2 * 3 * n * n * (2 * dim)  # q.k and weights @ v over all heads of one layer
    mlp = 2 * 2 * dim * (2 * dim) * tokens
    total = 2 * (proj + cores + mlp) + 2 * 4 * dim * tokens + 2 * dim * 10 * 3
    assert whole == pytest.approx(2 * (proj + cores) / total, rel=1e-12)
    assert core == pytest.approx(2 * cores / total, rel=1e-12)
    with pytest.raises(ValueError, match="no attnkit.nn.SelfAttention"):
        attention_flop_share(nn.Sequential(nn.Linear(4, 4)), torch.zeros(1, 4))
