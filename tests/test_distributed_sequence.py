"""Sequence-parallel attention on 2 spawned gloo processes equals the single-process engine.

One spawn (module fixture) runs every distributed case on two ranks and writes its findings to
JSON; the tests below assert on them. Workers use one thread, gloo over loopback, and a
process-group timeout, and the parent kills them if they outlive ``_SPAWN_TIMEOUT``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit
from attnkit import patterns as P
from attnkit.distributed import (
    communication_volume,
    gather_sequence,
    sequence_parallel_attention,
    shard_bounds,
    shard_sequence,
)

_WORLD = 2
_SPAWN_TIMEOUT = 90.0

# name -> (L, pattern factory, q heads, kv heads)
CASES = {
    "sliding_window": (24, lambda L: P.sliding_window(3), 2, 2),
    "sliding_window|global_tokens": (24, lambda L: P.sliding_window(3)
                                     | P.global_tokens([2, 15, 23]), 2, 2),
    # both global tokens live on rank 0: rank 1 must still join the backward collectives
    "sliding_window|global_tokens(rank0 only)": (24, lambda L: P.sliding_window(2)
                                                 | P.global_tokens([0, 5]), 2, 2),
    "exponential": (24, lambda L: P.exponential(), 2, 2),
    # 37 over 2 ranks: shards of 19 and 18; grouped-query heads (4 q heads share 2 k/v heads)
    "uneven window|exponential|global, GQA": (37, lambda L: P.sliding_window(4)
                                             | P.exponential() | P.global_tokens([3, 30]), 4, 2),
    "uneven (window|global)&causal": (37, lambda L: (P.sliding_window(5)
                                                     | P.global_tokens([20])) & P.causal(), 2, 1),
    # window wider than a shard: keys come from beyond the neighbour's edge (sequence end)
    "window wider than a shard": (13, lambda L: P.sliding_window(9), 2, 2),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _errors(fn) -> dict:
    """Run ``fn`` expecting an exception; record its type and message."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded and asserted on by the tests
        return {"type": type(e).__name__, "msg": str(e)}
    return {"type": None, "msg": ""}


def _equality(name: str, rank: int) -> dict:
    L, make, hq, hkv = CASES[name]
    pattern = make(L)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, hq, L, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, L, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, L, 5, generator=g, dtype=torch.float64)
    w = torch.randn(2, hq, L, 5, generator=g, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = attnkit.attention(*ref, pattern=pattern)
    (out_ref * w).sum().backward()
    mask = pattern.to_dense(L, L)
    dense, _ = attnkit.dense_reference(q, k, v, mask)
    loc = [shard_sequence(t, _WORLD, rank).clone().requires_grad_() for t in (q, k, v)]
    out = sequence_parallel_attention(*loc, pattern)
    (out * shard_sequence(w, _WORLD, rank)).sum().backward()
    got = [gather_sequence(t) for t in (out, loc[0].grad, loc[1].grad, loc[2].grad)]
    want = [out_ref.detach()] + [t.grad for t in ref]
    return {
        "local_len": out.shape[2],
        "sparse": bool(not mask.all()),
        "err": [float((a - b).abs().max()) for a, b in zip(got, want)],
        "err_dense": float((got[0] - dense).abs().max()),
        "grad_norms": [float(t.norm()) for t in want[1:]],
    }


def _genome(rank: int) -> dict:
    from attnkit.genome import GenomeEncoder, GenomePattern

    L = 41
    torch.manual_seed(0)
    model = GenomeEncoder(16, 2, 2, GenomePattern(window=3, exponential=True, hubs=3),
                          stem_kernel=5).double()
    tokens = torch.randint(0, 6, (2, L), generator=torch.Generator().manual_seed(2))
    w = torch.randn(2, L, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model.zero_grad()
    h_ref = model(tokens)
    (h_ref * w).sum().backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    s, e = shard_bounds(L, _WORLD, rank)
    h = model(tokens[:, s:e], sequence_parallel=True)
    (h * w[:, s:e]).sum().backward()
    err_grad = 0.0
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    assert names == list(g_ref)
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad)  # what DistributedDataParallel would sum
        err_grad = max(err_grad, float((grad - g_ref[n]).abs().max()))
    full = gather_sequence(h, dim=1)
    return {"err_out": float((full - h_ref.detach()).abs().max()), "err_grad": err_grad,
            "shape": list(h.shape), "hub_embed_grad": float(g_ref["hub_embed"].norm())}


def _bad_inputs(rank: int) -> dict:
    q = torch.randn(1, 2, 8, 4)
    out = {}
    # one rank's head dim differs
    kd = torch.randn(1, 2, 8, 4 if rank == 0 else 6)
    out["shape_mismatch"] = _errors(
        lambda: sequence_parallel_attention(kd, kd, kd, P.sliding_window(2)))
    # shards that do not follow shard_bounds (5 + 3 instead of 4 + 4)
    n = 5 if rank == 0 else 3
    x = torch.randn(1, 2, n, 4)
    out["bad_sharding"] = _errors(lambda: sequence_parallel_attention(x, x, x,
                                                                      P.sliding_window(2)))
    one = torch.randn(1, 2, 1 if rank == 0 else 0, 4)  # L = 1 over 2 ranks
    out["empty_shard"] = _errors(lambda: sequence_parallel_attention(one, one, one,
                                                                     P.sliding_window(1)))
    # bad input on rank 1 only: rank 0 must not hang, both raise the same message
    q3 = q if rank == 0 else q[0]
    out["local_error_one_rank"] = _errors(
        lambda: sequence_parallel_attention(q3, q, q, P.sliding_window(2)))
    out["unsupported_pattern"] = _errors(
        lambda: sequence_parallel_attention(q, q, q, P.random_keys(2)))
    out["dense_pattern"] = _errors(lambda: sequence_parallel_attention(q, q, q, None))
    out["pattern_mismatch"] = _errors(
        lambda: sequence_parallel_attention(q, q, q, P.sliding_window(1 + rank)))
    # reach 9 > shard 8 with neighbours_only: refused
    out["reach_beyond_neighbour"] = _errors(lambda: sequence_parallel_attention(
        q, q, q, P.sliding_window(9), neighbours_only=True))
    out["global_token_out_of_range"] = _errors(lambda: sequence_parallel_attention(
        q, q, q, P.sliding_window(1) | P.global_tokens([16])))
    from attnkit.genome import GenomeEncoder, GenomePattern

    model = GenomeEncoder(8, 1, 2, GenomePattern(window=1, exponential=False, hubs=0))
    tokens = torch.full((1, 8), 9 if rank == 1 else 0, dtype=torch.long)
    out["genome_bad_tokens_one_rank"] = _errors(lambda: model(tokens, sequence_parallel=True))
    # still usable after all the refusals (no collective left half-done)
    ok = sequence_parallel_attention(q, q, q, P.sliding_window(1), neighbours_only=True)
    out["usable_after_errors"] = bool(torch.isfinite(ok).all())
    return out


def _timeout(rank: int) -> dict:
    """Rank 1 never calls: rank 0 must raise after its timeout instead of hanging."""
    if rank == 1:
        time.sleep(3.0)
        return {}
    q = torch.randn(1, 2, 8, 4)
    t0 = time.perf_counter()
    err = _errors(lambda: sequence_parallel_attention(q, q, q, P.sliding_window(1),
                                                      timeout=1.0))
    return {**err, "seconds": time.perf_counter() - t0}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=_WORLD,
                            timeout=datetime.timedelta(seconds=30))
    res: dict = {}
    try:
        res["equality"] = {name: _equality(name, rank) for name in CASES}
        # again with local chunks of 5 query rows: keys/gradients across chunk boundaries
        import attnkit.distributed.sequence as seq

        seq._CHUNK_ROWS = 5
        res["many_chunks"] = {name: _equality(name, rank) for name in CASES}
        seq._CHUNK_ROWS = None
        res["genome"] = _genome(rank)
        res["bad"] = _bad_inputs(rank)
        res["timeout"] = _timeout(rank)  # last: it leaves rank 0's group unusable
    except Exception:  # noqa: BLE001 - reported to the parent
        res["crash"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    os._exit(0)  # skip destroy_process_group: the timed-out collective may block it


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("seqpar")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=_WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + _SPAWN_TIMEOUT
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"spawned workers did not finish within {_SPAWN_TIMEOUT} s")
    results = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(_WORLD)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward_equal_single_process(spawned, name):
    res = spawned[0]["equality"][name]
    assert res["sparse"]  # the pattern really restricts keys
    assert min(res["grad_norms"]) > 0  # gradients are non-trivial
    assert len(res["err"]) == 4
    for what, err in zip(("out", "q.grad", "k.grad", "v.grad"), res["err"]):
        assert err < 1e-10, (what, err)
    assert res["err_dense"] < 1e-10
    L = CASES[name][0]
    assert [spawned[r]["equality"][name]["local_len"] for r in range(_WORLD)] == [
        b - a for a, b in (shard_bounds(L, _WORLD, r) for r in range(_WORLD))]


@pytest.mark.parametrize("name", list(CASES))
def test_many_local_chunks_equal_single_process(spawned, name):
    for r in range(_WORLD):
        errs = spawned[r]["many_chunks"][name]["err"]
        assert len(errs) == 4 and max(errs) < 1e-10, (r, errs)


def test_genome_encoder_sequence_parallel_equals_single_process(spawned):
    res = spawned[0]["genome"]
    assert res["shape"] == [2, 21, 16] and spawned[1]["genome"]["shape"] == [2, 20, 16]
    assert res["hub_embed_grad"] > 0
    assert res["err_out"] < 1e-10
    assert res["err_grad"] < 1e-9


@pytest.mark.parametrize("case,needle", [
    ("shape_mismatch", "ranks disagree on head dim D: [4, 6]"),
    ("bad_sharding", "ranks hold [5, 3] positions"),
    ("local_error_one_rank", "bad input on rank 1: q must have shape (B, H, L_local, D)"),
    ("unsupported_pattern", "random_keys(2"),
    ("dense_pattern", "pattern=None (dense attention) needs every key on every rank"),
    ("pattern_mismatch", "ranks disagree on pattern"),
    ("reach_beyond_neighbour", "reaches 9 positions, more than the smallest shard (8"),
    ("global_token_out_of_range", "global_tokens indices must be < sequence length 16"),
    ("empty_shard", "a sequence of 1 positions over 2 ranks leaves ranks without positions"),
    ("genome_bad_tokens_one_rank", "bad input on rank 1: tokens must be in [0, 6)"),
])
def test_bad_input_raises_the_same_clear_error_on_every_rank(spawned, case, needle):
    errs = [spawned[r]["bad"][case] for r in range(_WORLD)]
    assert errs[0]["type"] == "ValueError", errs[0]
    assert needle in errs[0]["msg"], errs[0]["msg"]
    assert errs[1] == errs[0]


def test_usable_after_refusals(spawned):
    assert spawned[0]["bad"]["usable_after_errors"] and spawned[1]["bad"]["usable_after_errors"]


def test_missing_rank_times_out_instead_of_hanging(spawned):
    res = spawned[0]["timeout"]
    assert res["type"] == "RuntimeError" and "timed out" in res["msg"], res
    assert res["seconds"] < 10


# ------------------------------------------------------------------------------ no spawn


def test_shard_bounds_cover_the_sequence_with_shards_differing_by_one():
    for L in (0, 1, 7, 37, 100):
        for world in (1, 2, 3, 4, 7):
            b = [shard_bounds(L, world, r) for r in range(world)]
            assert b[0][0] == 0 and b[-1][1] == L
            assert all(b[i][1] == b[i + 1][0] for i in range(world - 1))
            sizes = [e - s for s, e in b]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="rank must be < world"):
        shard_bounds(10, 2, 2)
    with pytest.raises(ValueError, match="world must be an int >= 1"):
        shard_bounds(10, 0, 0)


# (pattern, its band part without global tokens, global tokens)
VOLUME_CASES = [
    (P.sliding_window(5), P.sliding_window(5), []),
    (P.exponential(), P.exponential(), []),
    (P.dilated(3, 4) & P.causal(), P.dilated(3, 4) & P.causal(), []),
    (P.sliding_window(2) | P.exponential() | P.global_tokens([0, 40]),
     P.sliding_window(2) | P.exponential(), [0, 40]),
    (P.sliding_window(1) | P.global_tokens([30]), P.sliding_window(1), [30]),
    (P.causal(), P.causal(), []),
]


@pytest.mark.parametrize("pattern,band,hubs", VOLUME_CASES, ids=[repr(c[0]) for c in VOLUME_CASES])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_communication_volume_equals_brute_force_halo(pattern, band, hubs, world):
    """Rank r fetches, point-to-point, exactly the keys outside its shard that the pattern's
    band reaches from some position of the shard; global tokens' rows travel by all_reduce."""
    L = 61
    reach = band.to_dense(L, L)
    bounds = [shard_bounds(L, world, r) for r in range(world)]
    rows = communication_volume(pattern, L, world, batch=2, q_heads=4, kv_heads=2, head_dim=8,
                                v_head_dim=6, dtype=torch.float64)
    sent = [0] * world
    for r, (s, e) in enumerate(bounds):
        need = reach[s:e].any(0)
        need[s:e] = False
        assert rows[r]["fetched_positions"] == int(need.sum()), (r, rows[r])
        for o, (a, b) in enumerate(bounds):
            sent[o] += int(need[a:b].sum())
    for r in range(world):
        assert rows[r]["halo_positions"] == sent[r]
        assert rows[r]["halo_bytes"] == sent[r] * 2 * 2 * (8 + 6) * 8
        assert rows[r]["global_bytes"] == 2 * len(hubs) * (2 * 14 + 4 * 8 + 4 * 8) * 8


def test_communication_volume_of_a_window_is_w_positions_per_neighbour():
    rows = communication_volume(P.sliding_window(16), 1024, 4, head_dim=32)
    assert [r["halo_positions"] for r in rows] == [16, 32, 32, 16]
    assert rows[1]["halo_bytes"] == 32 * 1 * 1 * 64 * 4
    back = communication_volume(P.sliding_window(16), 1024, 4, head_dim=32, backward=True)
    assert back[1]["halo_bytes"] == 2 * rows[1]["halo_bytes"]


def test_without_process_group_the_error_says_how_to_start_one():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sequence_parallel_attention(q, q, q, P.sliding_window(1))


def test_genome_sequence_parallel_refuses_dense_reference_options():
    from attnkit.genome import GenomeEncoder

    model = GenomeEncoder(8, 1, 2)
    tokens = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="does not take attn_mask or dense_reference"):
        model(tokens, sequence_parallel=True, dense_reference=True)
