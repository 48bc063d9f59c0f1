"""GraphAttention against PyG's GATConv / TransformerConv: forward+backward time, same run.

Usage: ``.venv/bin/python benchmarks/bench_graphs.py [--quick] [--repeats R]``. Prints one JSON
object per case: our time, the peer's time, their ratio (peer / ours, > 1 means we are faster)
and the largest output difference with weights copied across.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from attnkit.nn.graph import GraphAttention, build_graph_index


def random_graph(n: int, e: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (2, e), generator=gen)


def time_fwd_bwd(fn, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward (one warm-up)."""
    times = []
    for i in range(repeats + 1):
        x.grad = None
        t0 = time.perf_counter()
        out = fn(x)
        out.sum().backward()
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
    return statistics.median(times)


def copy_gat(ours: GraphAttention, peer) -> None:
    with torch.no_grad():
        ours.lin.weight.copy_(peer.lin.weight)
        ours.att_src.copy_(peer.att_src[0])
        ours.att_dst.copy_(peer.att_dst[0])
        ours.bias.copy_(peer.bias)


def copy_transformer(ours: GraphAttention, peer) -> None:
    with torch.no_grad():
        ours.lin_query.load_state_dict(peer.lin_query.state_dict())
        ours.lin_key.load_state_dict(peer.lin_key.state_dict())
        ours.lin_value.load_state_dict(peer.lin_value.state_dict())
        ours.lin_residual.weight.copy_(peer.lin_skip.weight)
        ours.bias.copy_(peer.lin_skip.bias)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="10k nodes, 100k edges")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 is steadier on a shared CPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from torch_geometric.nn import GATConv, TransformerConv
    except ImportError:
        print(json.dumps({"case": "all", "skipped": "torch_geometric is not installed"}))
        return
    n, e = (10_000, 100_000) if args.quick else (100_000, 1_000_000)
    torch.manual_seed(0)
    ei = random_graph(n, e)
    x = torch.randn(n, 64, requires_grad=True)
    threads = torch.get_num_threads()

    cases = [
        ("additive_vs_GATConv", GraphAttention(64, 16, heads=4, score="additive"),
         GATConv(64, 16, heads=4), copy_gat),
        ("dot_vs_TransformerConv",
         GraphAttention(64, 16, heads=4, score="dot", add_self_loops=False, residual=True),
         TransformerConv(64, 16, heads=4), copy_transformer),
    ]
    for name, ours, peer, copy in cases:
        copy(ours, peer)
        with torch.no_grad():
            diff = (ours(x, ei) - peer(x, ei)).abs().max().item()
        t_ours = time_fwd_bwd(lambda z, m=ours: m(z, ei), x, args.repeats)
        t_peer = time_fwd_bwd(lambda z, m=peer: m(z, ei), x, args.repeats)
        print(json.dumps({
            "case": name, "nodes": n, "edges": e, "threads": threads,
            "ours_s": round(t_ours, 4), "peer_s": round(t_peer, 4),
            "speedup": round(t_peer / t_ours, 3), "max_abs_diff": diff,
        }), flush=True)

    # The structure (dedup, self loops, CSR) can be built once and reused across layers/epochs.
    gat = cases[0][1]
    graph = build_graph_index(ei, n, add_self_loops=True)
    t_pre = time_fwd_bwd(lambda z: gat(z, graph), x, args.repeats)
    t_peer = time_fwd_bwd(lambda z: cases[0][2](z, ei), x, args.repeats)
    print(json.dumps({
        "case": "additive_prebuilt_index_vs_GATConv", "nodes": n, "edges": e,
        "threads": threads, "ours_s": round(t_pre, 4), "peer_s": round(t_peer, 4),
        "speedup": round(t_peer / t_pre, 3),
    }), flush=True)


if __name__ == "__main__":
    main()
