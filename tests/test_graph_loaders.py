"""Loaders: PPI round trips, Planetoid (restricted unpickling), edge lists, bad files."""

from __future__ import annotations

import json
import os
import pickle
from collections import defaultdict

import numpy as np
import pytest
import torch

from attnkit.graphs.loaders import (
    GraphData,
    load_edge_list,
    load_planetoid,
    load_ppi,
    restricted_unpickle,
    save_ppi,
)
from attnkit.graphs.synthetic import generate_ppi_like, make_ppi_dataset


def _small(seed=0) -> GraphData:
    return generate_ppi_like(num_nodes=60, num_modules=4, num_labels=6, num_features=5,
                             avg_degree=4, seed=seed)


def _same_edges(a: torch.Tensor, b: torch.Tensor, n: int) -> bool:
    return torch.equal(torch.unique(a[1] * n + a[0]), torch.unique(b[1] * n + b[0]))


def test_ppi_round_trip(tmp_path):
    data = _small()
    save_ppi(data, tmp_path, "toy")
    back = load_ppi(tmp_path, "toy")
    assert torch.equal(back.x, data.x)
    assert torch.equal(back.y, data.y) and back.multilabel
    for m in ("train_mask", "val_mask", "test_mask"):
        assert torch.equal(getattr(back, m), getattr(data, m))
    assert _same_edges(back.edge_index, data.edge_index, data.num_nodes)


def test_ppi_string_ids_and_int_classes(tmp_path):
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "p-feats.npy", feats)
    graph = {"nodes": [{"id": "b", "val": True}, {"id": "a"}, {"id": "c", "test": True}],
             "links": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"}]}
    (tmp_path / "p-G.json").write_text(json.dumps(graph))
    (tmp_path / "p-id_map.json").write_text(json.dumps({"a": 2, "b": 0, "c": 1}))
    (tmp_path / "p-class_map.json").write_text(json.dumps({"a": 1, "b": 0, "c": 2}))
    d = load_ppi(tmp_path, "p")
    assert d.node_ids == ["b", "c", "a"]
    assert d.y.tolist() == [0, 2, 1] and not d.multilabel
    assert d.val_mask.tolist() == [True, False, False]
    assert d.test_mask.tolist() == [False, True, False]
    assert d.train_mask.tolist() == [False, False, True]
    assert sorted(map(tuple, d.edge_index.t().tolist())) == [(0, 1), (0, 2), (1, 0), (2, 0)]


def test_ppi_malformed_files(tmp_path):
    save_ppi(_small(), tmp_path, "t")
    good_g = (tmp_path / "t-G.json").read_text()
    (tmp_path / "t-G.json").write_text(good_g[:-10])  # truncated JSON
    with pytest.raises(ValueError, match="malformed JSON"):
        load_ppi(tmp_path, "t")
    (tmp_path / "t-G.json").write_text(good_g)

    (tmp_path / "t-feats.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(ValueError, match="npy"):
        load_ppi(tmp_path, "t")
    np.save(tmp_path / "t-feats.npy", np.array([{"a": 1}] * 60, dtype=object))
    with pytest.raises(ValueError, match="npy"):  # object arrays would need pickle: refused
        load_ppi(tmp_path, "t")
    np.save(tmp_path / "t-feats.npy", np.zeros(60, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        load_ppi(tmp_path, "t")
    np.save(tmp_path / "t-feats.npy", np.zeros((59, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="not a row"):  # feature count mismatch
        load_ppi(tmp_path, "t")
    np.save(tmp_path / "t-feats.npy", np.zeros((60, 5), dtype=np.float32))

    g = json.loads(good_g)
    g["links"].append({"source": 0, "target": 999})
    (tmp_path / "t-G.json").write_text(json.dumps(g))
    with pytest.raises(ValueError, match="bad link"):
        load_ppi(tmp_path, "t")
    (tmp_path / "t-G.json").write_text(good_g)
    cm = json.loads((tmp_path / "t-class_map.json").read_text())
    cm["0"] = [2] * len(cm["0"])
    (tmp_path / "t-class_map.json").write_text(json.dumps(cm))
    with pytest.raises(ValueError, match="0/1"):
        load_ppi(tmp_path, "t")


def test_synthetic_is_ppi_like(tmp_path):
    data = make_ppi_dataset(tmp_path, num_nodes=800, seed=3)
    again = generate_ppi_like(num_nodes=800, seed=3)
    assert torch.equal(data.x, again.x) and torch.equal(data.y, again.y)
    deg = data.degree().float()
    assert deg.max() > 6 * deg.median()  # real hubs
    top = torch.topk(deg, 8).indices
    assert deg[top].sum() > 0.05 * deg.sum()  # the top 1% hold a large share of the edges
    labels_per_node = data.y.sum(1)
    assert labels_per_node.mean() > 1.5 and (labels_per_node > 1).float().mean() > 0.5
    assert data.train_mask.sum() + data.val_mask.sum() + data.test_mask.sum() == 800
    assert not (data.train_mask & data.test_mask).any()


# --------------------------------------------------------------------------------- Planetoid


def _write_planetoid(d, name, n_train=4, n_extra=6, n_test=5, feats=6, classes=3, gap=False):
    """A tiny set in the Planetoid layout (protocol-2 pickles, CSR features)."""
    sp = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(0)
    n_all = n_train + n_extra

    def onehot(k):
        y = np.zeros((k, classes))
        y[np.arange(k), rng.integers(0, classes, k)] = 1
        return y

    allx = (rng.random((n_all, feats)) > 0.5).astype(np.float32)
    ally = onehot(n_all)
    tx = (rng.random((n_test, feats)) > 0.5).astype(np.float32)
    ty = onehot(n_test)
    test_index = list(range(n_all, n_all + n_test))[::-1]
    if gap:  # citeseer: one test index missing (isolated node without features)
        test_index = [i + (1 if i >= n_all + 2 else 0) for i in test_index]
    graph = defaultdict(list)
    for i in range(max(test_index) + 1):
        graph[i].append((i + 1) % (max(test_index) + 1))
    objs = {"x": sp.csr_matrix(allx[:n_train]), "y": ally[:n_train], "allx": sp.csr_matrix(allx),
            "ally": ally, "tx": sp.csr_matrix(tx), "ty": ty, "graph": graph}
    for k, v in objs.items():
        (d / f"ind.{name}.{k}").write_bytes(pickle.dumps(v, protocol=2))
    (d / f"ind.{name}.test.index").write_text("\n".join(map(str, test_index)))
    return allx, ally, tx, ty, test_index


def test_planetoid_round_trip(tmp_path):
    allx, ally, tx, ty, test_index = _write_planetoid(tmp_path, "cora")
    d = load_planetoid(tmp_path, "cora")
    assert d.num_nodes == 15
    assert torch.equal(d.x[:10], torch.from_numpy(allx))
    # test.index lists the rows of tx in file order
    for row, node in enumerate(test_index):
        assert torch.equal(d.x[node], torch.from_numpy(tx[row]))
        assert int(d.y[node]) == int(ty[row].argmax())
    assert d.train_mask[:4].all() and not d.train_mask[4:].any()
    assert d.val_mask.sum() == 11  # rows 4.. (fewer than 500 remain in this tiny set)
    assert d.test_mask.sum() == 5
    assert (d.edge_index[0] != d.edge_index[1]).all()


def test_planetoid_citeseer_gap(tmp_path):
    _write_planetoid(tmp_path, "citeseer", gap=True)
    d = load_planetoid(tmp_path, "citeseer")
    assert d.num_nodes == 16
    missing = 12  # the skipped test index: zero features, no label, in no mask
    assert d.x[missing].sum() == 0 and not d.test_mask[missing]
    assert d.test_mask.sum() == 5


def test_planetoid_real_cora(shared_data):
    d = load_planetoid(shared_data / "planetoid", "cora")
    assert tuple(d.x.shape) == (2708, 1433)
    assert int(d.y.max()) == 6
    assert (int(d.train_mask.sum()), int(d.val_mask.sum()), int(d.test_mask.sum())) == \
        (140, 500, 1000)
    assert d.edge_index.shape[1] == 10556
    assert not (d.train_mask & d.test_mask).any()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/attnkit_pwned",))


def test_malicious_pickle_refused(tmp_path):
    payload = pickle.dumps(_Evil(), protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        restricted_unpickle(payload)
    assert not os.path.exists("/tmp/attnkit_pwned")
    _write_planetoid(tmp_path, "cora")
    (tmp_path / "ind.cora.graph").write_bytes(payload)
    with pytest.raises(ValueError, match="refusing"):
        load_planetoid(tmp_path, "cora")
    # builtins other than list are refused too
    with pytest.raises(ValueError, match="refusing"):
        restricted_unpickle(pickle.dumps(eval, protocol=2))
    with pytest.raises(ValueError):
        restricted_unpickle(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="dataset"):
        load_planetoid(tmp_path, "../cora")


# --------------------------------------------------------------------------------- edge list


def test_edge_list_csv_tsv(tmp_path):
    (tmp_path / "e.csv").write_text("source,target,weight\nP1,P2,0.5\n# note\nP2,P3,2\n")
    d = load_edge_list(tmp_path / "e.csv")
    assert d.node_ids == ["P1", "P2", "P3"]
    assert d.edge_index.tolist() == [[0, 1, 1, 2], [1, 2, 0, 1]]
    assert d.edge_weight.tolist() == [0.5, 2.0, 0.5, 2.0]
    (tmp_path / "e.tsv").write_text("1\t2\n2\t3\n3\t1\n")
    d = load_edge_list(tmp_path / "e.tsv", directed=True)
    assert d.node_ids == ["1", "2", "3"] and d.edge_weight is None
    assert d.edge_index.tolist() == [[0, 1, 2], [1, 2, 0]]
    (tmp_path / "h.tsv").write_text("a\tb\n1\t2\n")
    assert load_edge_list(tmp_path / "h.tsv", directed=True).node_ids == ["1", "2"]


def test_edge_list_bad(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\nc\n")
    with pytest.raises(ValueError, match="line"):
        load_edge_list(tmp_path / "bad.csv", header=False)
    (tmp_path / "w.csv").write_text("a,b,x1\nc,d,2\n")
    with pytest.raises(ValueError, match="weight"):
        load_edge_list(tmp_path / "w.csv", header=False)
    (tmp_path / "empty.csv").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no edges"):
        load_edge_list(tmp_path / "empty.csv")


def test_to_pyg():
    pytest.importorskip("torch_geometric")
    data = _small()
    pyg = data.to_pyg()
    assert torch.equal(pyg.x, data.x) and torch.equal(pyg.edge_index, data.edge_index)
    assert torch.equal(pyg.train_mask, data.train_mask) and pyg.num_nodes == 60


# ------------------------------------------------------- issue 17: sizes checked first


@pytest.mark.parametrize("arr", [np.zeros((0, 5), np.float32), np.zeros(0, np.int64),
                                 np.zeros((0, 0)), np.arange(6.0).reshape(2, 3)])
def test_protocol2_pickle_of_empty_array_loads(arr):
    """The empty array's data is pickled as ``bytes()`` in protocol 2 (it was refused)."""
    back = restricted_unpickle(pickle.dumps(arr, protocol=2))
    assert isinstance(back, np.ndarray) and back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


def test_pickle_claiming_huge_shape_refused_before_allocating():
    # 72 bytes: _reconstruct(ndarray, (10**6, 10**6), 'f8') asked numpy for 7.3 TiB
    claim = (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
             b"J\x40\x42\x0f\x00J\x40\x42\x0f\x00\x86U\x02f8\x87R.")
    with pytest.raises(ValueError, match=r"\(1000000, 1000000\).*larger than the pickle"):
        restricted_unpickle(claim)
    # calling ndarray itself, or bytes(n), would allocate too: refused
    with pytest.raises(ValueError, match="ndarray may only be rebuilt"):
        restricted_unpickle(b"\x80\x02cnumpy\nndarray\nJ\x40\x42\x0f\x00J\x40\x42\x0f\x00"
                            b"\x86\x85R.")
    with pytest.raises(ValueError, match="bytes"):
        restricted_unpickle(b"\x80\x02c__builtin__\nbytes\nJ\x00\xca\x9a\x3b\x85R.")


def test_csr_claiming_huge_shape_refused(tmp_path):
    _write_planetoid(tmp_path, "cora")
    sp = pytest.importorskip("scipy.sparse")
    huge = sp.csr_matrix((10**6, 10**6), dtype=np.float32)  # a few hundred bytes, 4 TB dense
    (tmp_path / "ind.cora.tx").write_bytes(pickle.dumps(huge, protocol=2))
    with pytest.raises(ValueError, match=r"ind\.cora\.tx.*max_bytes=1073741824"):
        load_planetoid(tmp_path, "cora")


def test_test_index_far_away_refused(tmp_path):
    _, _, _, _, test_index = _write_planetoid(tmp_path, "cora")
    far = test_index[:-1] + [10**9]  # implied 10**9 nodes: was a 5 TiB allocation
    (tmp_path / "ind.cora.test.index").write_text("\n".join(map(str, far)))
    with pytest.raises(ValueError, match=r"test\.index reaches row 1000000000.*max_bytes="):
        load_planetoid(tmp_path, "cora")
    (tmp_path / "ind.cora.test.index").write_text("\n".join(map(str, test_index[:-1] + [10**30])))
    with pytest.raises(ValueError, match="max_bytes="):
        load_planetoid(tmp_path, "cora")
    dup = test_index[:-1] + test_index[:1]
    (tmp_path / "ind.cora.test.index").write_text("\n".join(map(str, dup)))
    with pytest.raises(ValueError, match="twice"):
        load_planetoid(tmp_path, "cora")


def test_planetoid_file_size_and_paths(tmp_path):
    _write_planetoid(tmp_path, "cora")
    with pytest.raises(ValueError, match=r"ind\.cora\.\w+: \d+ bytes, over max_bytes=100"):
        load_planetoid(tmp_path, "cora", max_bytes=100)
    with pytest.raises(ValueError, match="max_bytes"):
        load_planetoid(tmp_path, "cora", max_bytes=0)
    with pytest.raises(ValueError, match="not a directory"):
        load_planetoid(tmp_path / "ind.cora.x", "cora")
    assert load_planetoid(tmp_path, "cora").num_nodes == 15  # the default limit is ample


def test_ppi_npy_header_claiming_more_than_the_file(tmp_path):
    save_ppi(_small(), tmp_path, "toy")
    from numpy.lib import format as npy_format

    path = tmp_path / "toy-feats.npy"
    with open(path, "wb") as f:  # 7 TiB declared, 64 bytes present: was a MemoryError
        npy_format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False,
                                              "shape": (10**6, 10**6)})
        f.write(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"toy-feats\.npy: header declares shape "
                                         r"\(1000000, 1000000\)"):
        load_ppi(tmp_path, "toy")


def test_test_index_not_integers(tmp_path):
    _write_planetoid(tmp_path, "cora")
    (tmp_path / "ind.cora.test.index").write_bytes(b"12\nx\n")
    with pytest.raises(ValueError, match="one integer per line"):
        load_planetoid(tmp_path, "cora")
    (tmp_path / "ind.cora.test.index").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_planetoid(tmp_path, "cora")
