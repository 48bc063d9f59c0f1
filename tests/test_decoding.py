"""Generation, MHA -> GQA/MQA conversion, byte accounting, roofline, text data, bad inputs."""

from __future__ import annotations

import pytest
import torch

from attnkit import generate
from attnkit.cache import StaticCache
from attnkit.decoding import (
    convert_kv_heads,
    decode_roofline,
    kv_cache_bytes,
    measure_bandwidth,
    time_per_token,
    train_lm,
    uptrain,
    weight_bytes,
)
from attnkit.lm import CharTokenizer, load_text_file, pydoc_corpus
from attnkit.models import DecoderLM

VOCAB = 19


def _model(kv=None, window=None, max_seq_len=48, seed=0) -> DecoderLM:
    torch.manual_seed(seed)
    m = DecoderLM(VOCAB, 32, 2, 4, kv, max_seq_len=max_seq_len, window=window)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))  # peaked distributions: greedy ties impossible
    return m.eval()


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("cache", ["dynamic", "static", "sliding"])
def test_greedy_same_tokens_with_and_without_cache(kv, cache):
    model = _model(kv, window=6 if cache == "sliding" else None)
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with_cache = generate(model, prompt, 20, temperature=0, cache=cache)
    without = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 29)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :9], prompt)


def test_streaming_and_1d_prompt():
    model = _model(2)
    seen: list[int] = []
    out = generate(model, torch.tensor([1, 2, 3]), 6, temperature=0, on_token=seen.append)
    assert out.shape == (9,) and seen == out[3:].tolist()
    assert all(isinstance(t, int) for t in seen)


def test_sampling_respects_top_k_and_seed():
    model = _model(1)
    prompt = torch.tensor([[4, 5]])
    a = generate(model, prompt, 15, temperature=1.0, top_k=1,
                 generator=torch.Generator().manual_seed(0))
    greedy = generate(model, prompt, 15, temperature=0)
    assert torch.equal(a, greedy)  # top_k=1 is greedy
    s1 = generate(model, prompt, 15, do_sample=True, generator=torch.Generator().manual_seed(7))
    s2 = generate(model, prompt, 15, do_sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2)
    assert int(s1.max()) < VOCAB


def test_convert_same_heads_is_exact_and_copies():
    model = _model()
    same = convert_kv_heads(model, 4)
    ids = torch.randint(0, VOCAB, (2, 15))
    assert torch.equal(same(ids), model(ids))
    assert same is not model and same.blocks[0].attn.k_proj is not model.blocks[0].attn.k_proj


@pytest.mark.parametrize("kv", [2, 1])
def test_convert_mean_pools_groups(kv):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = convert_kv_heads(model, kv)
    for name, t in model.state_dict().items():  # input untouched
        assert torch.equal(t, before[name])
    for old_b, new_b in zip(model.blocks, new.blocks):
        a, b = old_b.attn, new_b.attn
        assert (b.num_heads, b.num_kv_heads, b.head_dim) == (4, kv, a.head_dim)
        assert b.q_proj.weight.shape == a.q_proj.weight.shape
        assert b.out_proj.weight.shape == a.out_proj.weight.shape
        assert b.k_proj.weight.shape == (kv * a.head_dim, 32)
        r, d = 4 // kv, a.head_dim
        for g in range(kv):
            heads = [a.k_proj.weight[h * d:(h + 1) * d] for h in range(g * r, (g + 1) * r)]
            torch.testing.assert_close(b.k_proj.weight[g * d:(g + 1) * d],
                                       torch.stack(heads).mean(0))
            heads = [a.v_proj.weight[h * d:(h + 1) * d] for h in range(g * r, (g + 1) * r)]
            torch.testing.assert_close(b.v_proj.weight[g * d:(g + 1) * d],
                                       torch.stack(heads).mean(0))
    assert new.num_kv_heads == kv
    assert new(torch.randint(0, VOCAB, (1, 10))).shape == (1, 10, VOCAB)
    # the converted model decodes with a cache like any other
    p = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(new, p, 8, temperature=0),
                       generate(new, p, 8, temperature=0, use_cache=False))


def test_convert_bad_heads():
    model = _model()
    for bad in (3, 0, 8):
        with pytest.raises(ValueError, match="num_kv_heads"):
            convert_kv_heads(model, bad)
    with pytest.raises(ValueError, match="divide"):
        convert_kv_heads(convert_kv_heads(model, 2), 4)  # cannot un-share heads


def test_training_and_uptraining_reduce_loss():
    torch.manual_seed(0)
    data = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7] * 40)
    model = DecoderLM(8, 16, 1, 2, max_seq_len=32)
    losses = train_lm(model, data, 40, batch_size=4, seq_len=16, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    mqa = convert_kv_heads(model, 1)
    up = uptrain(mqa, data, 10, batch_size=4, seq_len=16)
    assert len(up) == 10 and all(x == x for x in up)
    with pytest.raises(ValueError, match="1-D"):
        train_lm(model, data.view(2, -1), 1)


def test_kv_bytes_and_roofline():
    mha, mqa = _model(4), _model(1)
    per_tok_mha = kv_cache_bytes(mha, 1)
    assert per_tok_mha == 2 * 2 * 4 * 8 * 4  # (k, v) * layers * heads * head_dim * fp32
    assert kv_cache_bytes(mqa, 1) * 4 == per_tok_mha
    assert kv_cache_bytes(mha, 10, batch=3, dtype=torch.float16) == per_tok_mha * 30 // 2
    # the bytes match a filled static cache
    cache = StaticCache(12)
    generate(mha, torch.tensor([[1, 2]]), 10, temperature=0, cache=cache)
    assert cache.nbytes == kv_cache_bytes(mha, 12)
    tied = sum(p.numel() for p in mha.parameters()) * 4  # parameters() yields tied ones once
    assert weight_bytes(mha) == tied
    assert decode_roofline(mha, 100, 1e9) == pytest.approx((tied + 100 * per_tok_mha) / 1e9)
    assert decode_roofline(mqa, 4096, 1e9) < decode_roofline(mha, 4096, 1e9)
    with pytest.raises(ValueError, match="bandwidth"):
        decode_roofline(mha, 10, 0)
    with pytest.raises(ValueError, match="context_len"):
        kv_cache_bytes(mha, -1)


def test_measure_bandwidth_and_step_time_are_positive():
    assert measure_bandwidth(size_mb=4, repeats=1) > 1e6
    assert measure_bandwidth(size_mb=4, repeats=1, huge_pages=True) > 1e6
    model = _model(1)
    for use_cache in (True, False):
        assert 0 < time_per_token(model, 8, steps=3, use_cache=use_cache) < 10
    with pytest.raises(ValueError, match="steps"):
        time_per_token(model, 8, steps=1, use_cache=True)


def test_bad_generation_inputs():
    model = _model(2, max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.zeros(17, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.zeros(10, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, torch.tensor([1, VOCAB]), 3)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, torch.tensor([-1, 2]), 3)
    with pytest.raises(ValueError, match="overflow"):
        generate(model, torch.tensor([1, 2, 3]), 5, cache=StaticCache(6))
    with pytest.raises(ValueError, match="sliding"):
        generate(model, torch.tensor([1, 2]), 3, cache="sliding")
    with pytest.raises(ValueError, match="cache"):
        generate(model, torch.tensor([1, 2]), 3, cache="paged")
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.tensor([1, 2]), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, torch.tensor([1, 2]), 3, top_k=0)
    with pytest.raises(ValueError, match="floating|integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="divide"):
        DecoderLM(10, 32, 1, 4, 3)
    with pytest.raises(ValueError, match="window"):
        DecoderLM(10, 32, 1, 4, window=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        DecoderLM(10, 32, 1, 4, max_seq_len=0)


def test_char_tokenizer_and_corpora(tmp_path):
    tok = CharTokenizer.from_text("hello world")
    ids = tok.encode("hello")
    assert tok.decode(ids) == "hello" and int(ids.min()) >= 1
    assert tok.decode(tok.encode("hex!")) == "he\ufffd\ufffd"
    with pytest.raises(ValueError, match="outside"):
        tok.encode("hex", strict=True)
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([tok.vocab_size])
    corpus = pydoc_corpus()
    assert 300_000 < len(corpus.train_text) + len(corpus.val_text) < 1_000_000
    assert corpus.val_ids.numel() == len(corpus.val_text)
    assert int(corpus.val_ids.max()) < corpus.tokenizer.vocab_size
    path = tmp_path / "t.txt"
    path.write_text("Plain text. " * 200, encoding="utf-8")
    c = load_text_file(path, val_fraction=0.2)
    assert len(c.val_text) == 480 and c.name == "t.txt"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00" * 500)
    with pytest.raises(ValueError, match="UTF-8"):
        load_text_file(bad)
    with pytest.raises(ValueError, match="not found"):
        load_text_file(tmp_path / "missing.txt")


def test_experiment_is_registered():
    from attnkit.experiments import MODULES
    from attnkit.lm.experiment import EXPERIMENT

    assert "attnkit.lm.experiment" in MODULES
    assert EXPERIMENT.name == "decoding" and EXPERIMENT.options[0].dest == "text"
    assert "from scratch" in EXPERIMENT.claim


def test_decoding_experiment_structure_tiny(tmp_path):
    """The whole experiment at tiny sizes: decisions, seeds and the contract metric names
    (values are not checked: at these sizes they mean nothing)."""
    from attnkit.experiment import RunContext
    from attnkit.lm.experiment import DecodingConfig, run_decoding

    cfg = DecodingConfig.tiny()
    res = run_decoding(RunContext(quick=True, out_dir=tmp_path), cfg)
    assert res.seeds == 3 and res.held is None
    names = {d.name for d in res.decisions}
    c = cfg.speed_context
    assert names == {"mqa_bpc_ratio", "gqa_bpc_ratio", "mqa_int8_bpc_ratio",
                     f"mqa_speedup_cached_{c}", f"kv_cache_speedup_mha_{c}"}
    assert {d.direction for d in res.decisions if "bpc" in d.name} == {"<"}
    assert res.verdict in ("held", "not held", "inconclusive")
    m = res.all_metrics()
    for name in ("bits_per_char_mha", "bits_per_char_gqa", "bits_per_char_mqa",
                 "mqa_bpc_ratio", "bits_per_char_mqa_int8", f"roofline_ratio_mqa_{c}",
                 f"tokens_per_s_cached_mqa_{c}", f"tokens_per_s_uncached_mha_{c}",
                 f"ms_per_token_mqa_{cfg.int8_context}_int8",
                 f"ms_per_token_mqa_{cfg.int8_context}_fp32",
                 *(f"bits_per_char_mqa_uptrained_{p}" for p in ("0", "50"))):
        assert name in m and f"{name}_ci_low" in m and f"{name}_ci_high" in m, name
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"], name
    for name in ("kv_bytes_per_token_mha", "kv_bytes_per_token_mqa",
                 "kv_bytes_per_token_mqa_int8", f"bytes_read_per_token_mha_{c}"):
        assert m[name] > 0, name
    # MQA keeps one of num_heads K/V heads; the 8-bit cache about a quarter of its bytes
    assert m["kv_bytes_per_token_mha"] == cfg.speed_heads * m["kv_bytes_per_token_mqa"]
    assert m["kv_bytes_per_token_mqa_int8"] < 0.5 * m["kv_bytes_per_token_mqa"]
    assert m["seeds"] == 3
    if res.figures:  # matplotlib installed
        assert all(tmp_path.joinpath(f).exists() for f in res.figures)


def test_train_lm_callback_stops_early():
    model = _model()
    seen = []

    def stop_at_3(step, loss):
        seen.append((step, loss))
        return step == 3

    data = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(0))
    losses = train_lm(model, data, 10, batch_size=2, seq_len=8, callback=stop_at_3)
    assert len(losses) == 3 and [s for s, _ in seen] == [1, 2, 3]
    assert [x for _, x in seen] == losses


def test_model_head_mask():
    model = _model(2)
    ids = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(model(ids, head_mask=torch.ones(2, 4)), model(ids))
    gate = torch.ones(2, 4, requires_grad=True)
    model(ids, head_mask=gate).sum().backward()
    assert gate.grad is not None and bool(gate.grad.ne(0).any())
    off = torch.ones(2, 4)
    off[0, 1] = 0.0
    assert (model(ids, head_mask=off) - model(ids)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="head_mask"):
        model(ids, head_mask=torch.ones(3, 4))


# ------------------------------------------------------------------ fast decoding paths


@pytest.fixture
def threads(monkeypatch):
    """Set torch's thread count inside a test (restored afterwards); split even tiny weights."""
    import attnkit.nn.attention as mha

    monkeypatch.setattr(mha, "SPLIT_MIN_NUMEL", 0)
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_threads, out_features, shape, parts", [
    (2, 12, (9,), 2), (2, 12, (1, 9), 2), (2, 12, (2, 1, 9), 2), (2, 12, (4, 9), 2),
    (3, 12, (1, 1, 9), 3), (4, 6, (1, 9), 3),  # largest divisor of out <= threads
    (2, 7, (1, 9), 1), (2, 12, (5, 9), 1), (1, 12, (1, 9), 1),  # plain F.linear
    (2, 12, (0, 9), 1),
])
@pytest.mark.parametrize("bias", [True, False])
def test_split_linear_matches_plain_product(threads, monkeypatch, n_threads, out_features,
                                             shape, parts, bias):
    import attnkit.nn.attention as mha
    from attnkit.nn.attention import _split_parts, split_linear

    threads(n_threads)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, 9, generator=gen, dtype=torch.float64)
    b = torch.randn(out_features, generator=gen, dtype=torch.float64) if bias else None
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    assert _split_parts(x, w) == parts
    if n_threads == 2 and parts == 2:  # weights below SPLIT_MIN_NUMEL stay plain
        monkeypatch.setattr(mha, "SPLIT_MIN_NUMEL", w.numel() + 1)
        assert _split_parts(x, w) == 1
        monkeypatch.setattr(mha, "SPLIT_MIN_NUMEL", 0)
    expected = (x.unsqueeze(-2) * w).sum(-1) + (0 if b is None else b)
    got = split_linear(x, w, b)
    assert got.shape == (*shape[:-1], out_features)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    got32 = split_linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(got32, expected.float(), atol=1e-5, rtol=0)


def test_split_linear_gradients_and_module(threads):
    from attnkit.nn.attention import SplitLinear, _split_parts, split_linear

    threads(2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert _split_parts(x, w) == 2
    assert torch.autograd.gradcheck(split_linear, (x, w, b))
    # The module: nn.Linear's parameters and state dict, and forward hooks still fire.
    plain = torch.nn.Linear(6, 8).double()
    fast = SplitLinear(6, 8).double()
    fast.load_state_dict(plain.state_dict())
    seen = []
    fast.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    torch.testing.assert_close(fast(x), plain(x), atol=1e-12, rtol=0)
    assert seen == [(1, 1, 8)] and list(fast.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("kv", [1, 2, 6])
def test_folded_decoding_step_equals_per_head_attention(threads, monkeypatch, n_threads, kv):
    from attnkit import patterns as P
    from attnkit.cache import DynamicCache
    from attnkit.nn.attention import SelfAttention

    threads(n_threads)
    torch.manual_seed(0)
    m = SelfAttention(48, 6, kv, pattern=P.causal()).double().eval()
    x = torch.randn(2, 10, 48, dtype=torch.float64)
    gate = torch.rand(6, dtype=torch.float64)
    assert (m._fold_parts(None, 1, False, 0.0) > 0) == (kv < 6)

    def run() -> torch.Tensor:
        cache = DynamicCache()
        m(x[:, :7], cache=cache)
        return torch.cat([m(x[:, i:i + 1], cache=cache, head_mask=gate) for i in range(7, 10)], 1)

    folded = run()
    monkeypatch.setattr(SelfAttention, "_fold_parts", lambda self, *a: 0)
    per_head = run()
    torch.testing.assert_close(folded, per_head, atol=1e-12, rtol=0)
    full = m(x, head_mask=gate)[:, 7:]
    torch.testing.assert_close(folded, full, atol=1e-10, rtol=0)


def test_convert_keeps_the_fast_projection_class():
    from attnkit.nn.attention import SplitLinear

    new = convert_kv_heads(_model(), 1)
    assert all(type(getattr(b.attn, n)) is SplitLinear
               for b in new.blocks for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
