"""The attnkit.lm package: generation with Hugging Face's conventions (left-padded batches,
eos, sampling filters), the 8-bit KV cache, and the model-agnostic tools on a ViT."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import attnkit
from attnkit.flops import count
from attnkit.lm import (
    DecoderLM,
    DynamicCache,
    QuantizedCache,
    bits_per_char_cached,
    generate,
    kv_bytes_per_token,
    kv_cache_bytes,
)
from attnkit.nn import SelfAttention
from attnkit.pruning import attention_layers, head_gates, head_importance, prune_heads
from attnkit.vision import ViT

VOCAB = 23


def _model(kv=None, seed=0, max_seq_len=64, window=None) -> DecoderLM:
    torch.manual_seed(seed)
    m = DecoderLM(VOCAB, 32, 2, 4, kv, max_seq_len=max_seq_len, window=window)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))  # peaked distributions: greedy ties impossible
    return m.eval()


def test_old_import_paths_still_work():
    import attnkit.cache
    import attnkit.decoding
    import attnkit.models

    assert attnkit.models.DecoderLM is DecoderLM
    assert attnkit.generate is generate and attnkit.decoding.generate is generate
    assert attnkit.cache.QuantizedCache is QuantizedCache


# ------------------------------------------------------------------------ generate


def _left_pad(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("kv", [4, 1])
@pytest.mark.parametrize("use_cache, cache", [(True, "dynamic"), (True, "static"),
                                              (False, "dynamic")])
def test_left_padded_batch_equals_one_by_one(kv, use_cache, cache):
    model = _model(kv)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (7, 3, 5, 1)]
    ids, mask = _left_pad(prompts, pad=0)
    batched = generate(model, ids, 12, attention_mask=mask, use_cache=use_cache, cache=cache)
    assert batched.shape == (4, ids.shape[1] + 12)
    assert torch.equal(batched[:, :ids.shape[1]], ids)
    for i, p in enumerate(prompts):
        alone = generate(model, p, 12)
        assert torch.equal(batched[i, ids.shape[1]:], alone[len(p):]), i


def test_padded_logits_match_unpadded_and_padding_is_not_attended():
    model = _model(2)
    p = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = model(p)
    for pad_id in (0, 5):  # whatever the padding ids, they are not seen
        ids = torch.cat([torch.full((1, 3), pad_id), p], dim=1)
        mask = torch.tensor([[0, 0, 0] + [1] * 6])
        got = model(ids, attention_mask=mask)[:, 3:]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(model(ids, attention_mask=mask)).all()


def test_greedy_cached_equals_uncached_with_padding_and_int8():
    model = _model(2)
    ids, mask = _left_pad([torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6])], pad=0)
    a = generate(model, ids, 15, attention_mask=mask)
    b = generate(model, ids, 15, attention_mask=mask, use_cache=False)
    assert torch.equal(a, b)


def test_eos_stops_each_row_and_pads_finished_rows():
    model = _model(4)
    prompt = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))
    free = generate(model, prompt, 16)
    new = free[:, 4:]
    # an eos that the first row emits at some step, the others later or never
    eos = int(new[0, 2])
    pad = VOCAB - 1
    out = generate(model, prompt, 16, eos_token_id=eos, pad_token_id=pad)
    for row in range(3):
        hits = (new[row] == eos).nonzero()
        gen = out[row, 4:]
        if len(hits):
            stop = int(hits[0])
            assert torch.equal(gen[:stop + 1], new[row, :stop + 1])  # same tokens up to eos
            assert (gen[stop + 1:] == pad).all()  # then padding
        else:
            assert torch.equal(gen, new[row, :gen.shape[0]])
    ended = [(new[r] == eos).nonzero() for r in range(3)]
    if all(len(h) for h in ended):  # every row ended: generation stopped early
        assert out.shape[1] == 4 + max(int(h[0]) for h in ended) + 1
    # a list of eos ids; pad defaults to the first eos id
    out2 = generate(model, prompt[:1], 16, eos_token_id=[eos, VOCAB - 2])
    assert int(out2[0, -1]) == eos and out2.shape[1] <= 4 + 3


def test_sampling_filters_and_seeded_generator():
    model = _model(1)
    prompt = torch.tensor([[4, 5, 6]])
    greedy = generate(model, prompt, 10)
    assert torch.equal(generate(model, prompt, 10, do_sample=True, top_k=1,
                                generator=torch.Generator().manual_seed(0)), greedy)
    # a tiny top_p keeps only the most likely token: greedy again
    assert torch.equal(generate(model, prompt, 10, do_sample=True, top_p=1e-6,
                                generator=torch.Generator().manual_seed(0)), greedy)
    s1 = generate(model, prompt, 10, do_sample=True, temperature=2.0,
                  generator=torch.Generator().manual_seed(9))
    s2 = generate(model, prompt, 10, do_sample=True, temperature=2.0,
                  generator=torch.Generator().manual_seed(9))
    assert torch.equal(s1, s2)
    others = [generate(model, prompt, 10, do_sample=True, temperature=2.0,
                       generator=torch.Generator().manual_seed(s)) for s in range(5)]
    assert any(not torch.equal(o, greedy) for o in others)  # it does sample


def test_top_p_keeps_the_smallest_nucleus():
    from attnkit.lm.decoding import _filtered_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filtered_logits(logits, 1.0, None, 0.8))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept = torch.isfinite(_filtered_logits(logits, 1.0, None, 0.81))
    assert kept.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.tensor([[1, VOCAB]])), r"token ids must be in \[0, 23\)"),
        (dict(input_ids=torch.zeros(1, 65, dtype=torch.long)), "longer than the model's context"),
        (dict(input_ids=torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5),
         "exceeds max_seq_len=64"),
        (dict(attention_mask=torch.tensor([[1, 1, 0]])), "left-padded"),
        (dict(attention_mask=torch.tensor([[0, 0, 0]])), "row without any token"),
        (dict(attention_mask=torch.tensor([[0, 2, 1]])), "only 0"),
        (dict(attention_mask=torch.tensor([[1, 1]])), "shape of input_ids"),
        (dict(eos_token_id=VOCAB), "eos_token_id must be a token id"),
        (dict(pad_token_id=-1), "pad_token_id must be a token id"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(do_sample=True, temperature=0), "temperature > 0"),
        (dict(cache="paged"), "int8"),
    ],
)
def test_generate_bad_input(kwargs, match):
    model = _model(2)
    args = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


def test_generate_refuses_a_used_cache_naming_reset():
    model = _model(2)
    cache = QuantizedCache(group_size=4)
    generate(model, torch.tensor([1, 2, 3]), 3, cache=cache)
    with pytest.raises(ValueError, match=r"reset\(\)"):
        generate(model, torch.tensor([1, 2, 3]), 3, cache=cache)


# ------------------------------------------------------------------------ 8-bit cache


@pytest.mark.parametrize("kv", [4, 1])
def test_int8_cache_attention_close_to_fp32(kv):
    torch.manual_seed(0)
    layer = SelfAttention(64, 4, kv, pattern=attnkit.patterns.causal()).eval()
    x = torch.randn(2, 150, 64)
    with torch.no_grad():
        layer.k_proj.weight[:, 3] *= 20  # an outlier input channel: per-channel key scales
        ref_cache, q_cache = DynamicCache(), QuantizedCache(group_size=32)
        outs = []
        for cache in (ref_cache, q_cache):
            prefix = layer(x[:, :100], cache=cache)
            steps = [layer(x[:, t:t + 1], cache=cache) for t in range(100, 150)]
            outs.append(torch.cat([prefix, *steps], dim=1))
    ref, got = outs
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel  # quantised (not exact) but within 2% of fp32 attention
    assert q_cache.held_length(0) == ref_cache.held_length(0) == 150


def test_int8_cache_generation_and_bytes_formula():
    model = _model(1, max_seq_len=200)
    prompt = torch.randint(0, VOCAB, (1, 128), generator=torch.Generator().manual_seed(2))
    cache = QuantizedCache()
    with torch.no_grad():
        model(prompt, cache=cache)
    assert cache.nbytes == kv_cache_bytes(model, 128, dtype=torch.int8)  # capacity fits
    fp32 = kv_bytes_per_token(model)
    int8 = kv_bytes_per_token(model, torch.int8)
    hd = 8  # 2 layers x 1 kv head x 8 channels: 2*8 codes + 8*4/64 key-scale + 4 value-scale
    assert int8 == 2 * (2 * hd + 4 * hd / 64 + 4) and fp32 == 2 * 2 * hd * 4
    a = generate(model, prompt, 20, cache="int8")
    b = generate(model, prompt, 20)
    assert (a == b).float().mean() > 0.8  # 8 bits barely move a peaked greedy decoder


def test_bits_per_char_int8_within_one_percent_of_fp32():
    model = _model(1, max_seq_len=64)
    ids = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(1))
    fp32 = bits_per_char_cached(model, ids, 48, 960)
    int8 = bits_per_char_cached(model, ids, 48, 960, lambda: QuantizedCache(group_size=16))
    with torch.no_grad():  # the cached fp32 evaluation equals the plain forward pass
        x = ids[:960].view(20, 48)
        y = ids[1:961].view(20, 48)
        nats = torch.nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
    assert fp32 == pytest.approx(float(nats) / math.log(2), rel=1e-5)
    assert abs(int8 / fp32 - 1) < 0.01 and int8 != fp32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_cache_refuses_non_finite_keys(bad):
    cache = QuantizedCache(group_size=2)
    k = torch.randn(1, 2, 3, 4)
    v = torch.randn(1, 2, 3, 4)
    k[0, 1, 2, 0] = bad
    with pytest.raises(ValueError, match="keys of layer 0 hold NaN or inf"):
        cache.update(0, k, v)
    with pytest.raises(ValueError, match="values of layer 3"):
        cache.update(3, torch.randn(1, 2, 3, 4), k)
    with pytest.raises(ValueError, match="group_size"):
        QuantizedCache(group_size=0)


def test_int8_cache_exact_for_representable_values_and_zero_channels():
    cache = QuantizedCache(group_size=2)
    k = torch.zeros(1, 1, 5, 3)
    k[..., 0] = torch.tensor([127.0, -3, 5, 1, 2])  # channel scales 1 (first group), 0, ...
    v = torch.arange(15.0).view(1, 1, 5, 3) * 0  # all-zero values: scale 0, no NaN
    ko, vo = cache.update(0, k, v)
    assert torch.equal(vo, v) and torch.isfinite(ko).all()
    torch.testing.assert_close(ko, k, atol=5 / 127 / 2 + 1e-6, rtol=0)
    assert torch.equal(ko[..., 4:, :], k[..., 4:, :])  # the open group stays unquantised


# ------------------------------------------------------------------------ tools on a ViT


def test_pruning_and_flops_work_on_the_vit():
    torch.manual_seed(0)
    vit = ViT(8, 4, 3, 5, dim=16, depth=2, num_heads=4).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    scores = head_importance(vit, [(x, labels)], loss)
    assert [s.shape for s in scores] == [(4,), (4,)]
    gates = [torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]
    gates[1][[0, 3]] = 0
    with head_gates(vit, gates):
        expected = vit(x)
    before = count(vit, x)
    pruned = prune_heads(copy.deepcopy(vit), {1: [0, 3]})
    torch.testing.assert_close(pruned(x), expected, atol=1e-12, rtol=0)
    after = count(pruned, x)
    hd, tokens = 4, 3 * 4  # 4 patches of 4x4 per image
    assert before.params - after.params == 2 * (4 * 16 * hd + 3 * hd)  # q,k,v,out + q,k,v bias
    assert before.total - after.total == 2 * (4 * 2 * 16 * hd * tokens + 2 * 2 * hd * 16 * 3)
    with pytest.raises(ValueError, match="unknown head 4 in layer 1"):
        prune_heads(pruned, {1: [4]})
    with pytest.raises(ValueError, match="all 2 heads of layer 1"):
        prune_heads(pruned, {1: [0, 1]})


def test_kept_heads_outputs_are_bit_identical_after_pruning():
    # fp32: the kept rows of q/k/v are the same dot products in the same order (MKL's fp64
    # GEMM picks another kernel for the narrower matrix and moves the last bit)
    lm = _model(4)
    ids = torch.randint(0, VOCAB, (2, 9))
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()
        return hook

    layers = attention_layers(lm)
    h = layers[0].out_proj.register_forward_pre_hook(grab("before"))
    lm(ids)
    h.remove()
    pruned = prune_heads(copy.deepcopy(lm), {0: [1, 2]})
    h = attention_layers(pruned)[0].out_proj.register_forward_pre_hook(grab("after"))
    pruned(ids)
    h.remove()
    hd = layers[0].head_dim
    kept = torch.cat([seen["before"][..., 0:hd], seen["before"][..., 3 * hd:4 * hd]], dim=-1)
    assert torch.equal(seen["after"], kept)  # layer 0 sees the same input: same bits
    assert attention_layers(pruned)[0].q_proj.weight.shape == (2 * hd, 32)
    n = sum(p.numel() for p in pruned.parameters())
    assert sum(p.numel() for p in lm.parameters()) - n == 2 * 4 * 32 * hd
