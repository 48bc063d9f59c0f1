"""Hugging Face transformers models with attn_implementation="attnkit" (small random configs,
nothing downloaded) against transformers' own "sdpa" and "eager"."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from attnkit import patterns as P

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.masking_utils")

from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig  # noqa: E402

from attnkit.integrations.transformers import LazyMask, register  # noqa: E402

VOCAB = 97
# Larger than the default 0.02 so that attention is far from uniform and a wrong mask shows.
INIT = 0.2


def _configs():
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, initializer_range=INIT,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        "llama": LlamaConfig(num_key_value_heads=2, **common),  # grouped-query attention
        "mistral": MistralConfig(num_key_value_heads=1, sliding_window=7, **common),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                           initializer_range=INIT, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2),
    }


def _pair(name: str, impl: str, other: str = "sdpa"):
    """The same random weights under two attention implementations (configs are copied:
    from_config records the implementation on the config object it is given)."""
    cfg = _configs()[name]
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=other)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl)
    model.load_state_dict(ref.state_dict())
    assert model.config._attn_implementation == impl
    assert ref.config._attn_implementation == other
    return ref.eval(), model.eval()


def _batch(b=3, n=24, seed=1):
    """Token ids and a left-padded attention mask (row 0 full, others padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, n), generator=g)
    am = torch.ones(b, n, dtype=torch.long)
    for r in range(1, b):
        am[r, : 4 * r + 1] = 0
    ids[am == 0] = 0
    return ids, am


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register()
    register(P.sliding_window(4) & P.causal() | P.global_tokens([0, 9]), name="attnkit_sparse")


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
def test_logits_equal_sdpa_with_padding(name):
    ref, model = _pair(name, "attnkit")
    ids, am = _batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=am).logits
        got = model(input_ids=ids, attention_mask=am).logits
    keep = am.bool()
    assert want[keep].abs().max() > 1.0  # logits that a wrong mask would move
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no padding: the causal (or sliding) mask alone
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_mistral_window_is_lazy_and_cuts_keys():
    """Mistral's window (7) is shorter than the input: its mask is not materialized (the
    window band, cut by transformers' mask function per block), and the window matters."""
    ref, model = _pair("mistral", "attnkit")
    seen = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kw: seen.append(type(kw.get("attention_mask")).__name__),
            with_kwargs=True)
    ids, am = _batch()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=am).logits
    assert seen == ["LazyMask"] * len(model.model.layers)
    wide = copy.deepcopy(_configs()["mistral"])
    wide.sliding_window = None
    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(wide, attn_implementation="sdpa").eval()
    full.load_state_dict(ref.state_dict())
    with torch.no_grad():
        unwindowed = full(input_ids=ids, attention_mask=am).logits
    assert (got - unwindowed)[am.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
def test_greedy_generation_with_cache_equals_sdpa(name):
    ref, model = _pair(name, "attnkit")
    ids, am = _batch(n=12)
    kw = dict(attention_mask=am, max_new_tokens=14, do_sample=False, use_cache=True)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        got = model.generate(ids, **kw)
    assert got.shape == (3, 12 + 14)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_gradients_equal_sdpa(name):
    ref, model = _pair(name, "attnkit")
    ids, am = _batch(n=16)
    for m in (ref, model):
        m.zero_grad()
        out = m(input_ids=ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100))
        out.loss.backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=n)


def _pattern_mask(pattern, am, n):
    """The additive (B, 1, n, n) mask equivalent to pattern & causal & padding."""
    keep = pattern.to_dense(n, n) & P.causal().to_dense(n, n)
    keep = keep.unsqueeze(0) & am.bool()[:, None, :]
    return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
def test_sparse_pattern_equals_eager_with_additive_mask(name):
    pattern = P.sliding_window(4) & P.causal() | P.global_tokens([0, 9])
    ref, model = _pair(name, "attnkit_sparse", other="eager")
    ids, am = _batch(n=24)
    mask = _pattern_mask(pattern, am, 24)
    if name == "mistral":  # the model's window (7) applies too
        mask = mask.masked_fill(~P.sliding_window(6).to_dense(24, 24), mask.min())
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=am).logits
        dense = ref(input_ids=ids, attention_mask=am).logits
    keep = am.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    assert (got - dense)[keep].abs().max() > 1e-3  # the pattern changed something


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_sparse_pattern_generation_cache_equals_no_cache(name):
    """With a cache (Mistral: a sliding-window cache whose keys start past position 0) the
    pattern stays in absolute positions: the same tokens as recomputing every step."""
    _, model = _pair(name, "attnkit_sparse")
    ids, am = _batch(n=12)
    kw = dict(attention_mask=am, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        fresh = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, fresh)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_static_cache_generation(name):
    """A static cache (keys padded to the cache size, the mask built up front by generate):
    dense equals sdpa, and the pattern gives the same tokens as recomputing every step."""
    ref, model = _pair(name, "attnkit")
    _, sparse = _pair(name, "attnkit_sparse")
    ids, am = _batch(n=12)
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = ref.generate(ids, cache_implementation="static", **kw)
        got = model.generate(ids, cache_implementation="static", **kw)
        sparse_static = sparse.generate(ids, cache_implementation="static", **kw)
        sparse_fresh = sparse.generate(ids, use_cache=False, **kw)
    assert torch.equal(got, want)
    assert torch.equal(sparse_static, sparse_fresh)


def test_sparse_pattern_long_input_never_builds_a_dense_mask():
    """2048 tokens through a windowed pattern: the mask stays lazy."""
    register(P.sliding_window(32) & P.causal() | P.global_tokens([0]), name="attnkit_long")
    _, model = _pair("llama", "attnkit_long")
    masks = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    ids = torch.randint(3, VOCAB, (1, 2048))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert isinstance(masks[0], LazyMask)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("hint", [7, 2, 30, None])
def test_window_hint_never_changes_the_result(hint):
    """The layer's sliding_window only picks the candidates; a hint that disagrees with the
    model's mask (too narrow: 2) falls back to every key, so the result is the mask's."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import (
        AttentionMaskInterface,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    attn = AttentionInterface._global_mapping["attnkit"]
    make_mask = AttentionMaskInterface._global_mapping["attnkit"]
    mod = torch.nn.Module()
    mod.is_causal, mod.num_key_value_groups = True, 2
    g = torch.Generator().manual_seed(0)
    q = 3 * torch.randn(2, 4, 30, 16, generator=g)
    k = 3 * torch.randn(2, 2, 30, 16, generator=g)
    v = torch.randn(2, 2, 30, 16, generator=g)
    pad = torch.ones(2, 30, dtype=torch.bool)
    pad[1, :6] = False
    kw = dict(batch_size=2, q_length=30, kv_length=30, attention_mask=pad, local_size=7,
              mask_function=sliding_window_causal_mask_function(7))
    lazy = make_mask(**kw)
    assert isinstance(lazy, LazyMask)
    got, weights = attn(mod, q, k, v, lazy, scaling=0.3, sliding_window=hint)
    want, _ = sdpa_attention_forward(mod, q, k, v, sdpa_mask(**kw), scaling=0.3)
    assert weights is None and got.shape == (2, 30, 4, 16)
    torch.testing.assert_close(got[1, 6:], want[1, 6:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)


def test_unsupported_features_raise():
    from transformers import AttentionInterface

    fn = AttentionInterface._global_mapping["attnkit"]
    q = torch.randn(1, 2, 4, 8)
    mod = torch.nn.Module()
    for key, word in [("s_aux", "sinks"), ("softcap", "soft-capping"), ("alibi", "ALiBi"),
                      ("position_bias", "position bias"), ("head_mask", "head masks")]:
        with pytest.raises(NotImplementedError, match=word):
            fn(mod, q, q, q, None, **{key: torch.zeros(2)})


def test_register_bad_input():
    with pytest.raises(TypeError, match="pattern"):
        register("causal")
    with pytest.raises(TypeError, match="name"):
        register(name="")


def test_register_without_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"attnkit\[bench\]"):
        register()


def test_attnkit_never_imports_transformers():
    code = ("import sys, attnkit, attnkit.nn, attnkit.integrations.transformers; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
