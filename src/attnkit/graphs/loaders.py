"""Graph data loaders: the PPI (GraphSAGE) format, the Planetoid format, edge-list CSV/TSV.

Every loader returns a :class:`GraphData` of plain tensors; ``GraphData.to_pyg()`` gives a
``torch_geometric.data.Data`` when PyG is installed. No loader executes code from a file: JSON
and NPY (``allow_pickle=False``) are data only, and the Planetoid pickles go through a restricted
unpickler that admits only the handful of numpy types (and a stand-in for scipy's CSR matrix)
those files need.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checks import check_positive_int

__all__ = [
    "GraphData",
    "load_ppi",
    "save_ppi",
    "load_planetoid",
    "load_edge_list",
    "restricted_unpickle",
    "PLANETOID_NAMES",
    "DEFAULT_MAX_BYTES",
]

PLANETOID_NAMES = ("cora", "citeseer", "pubmed")
#: Default limit of :func:`load_planetoid` / :func:`restricted_unpickle`: 1 GiB for any one file
#: and for any array a file declares (PubMed's dense features take 39 MB).
DEFAULT_MAX_BYTES = 1 << 30


@dataclass
class GraphData:
    """A node-classification graph as plain tensors.

    Attributes:
        x: ``(N, F)`` float node features (``None`` for a bare edge list).
        edge_index: ``(2, E)`` long, PyG convention (row 0 sources, row 1 targets).
        y: ``(N,)`` long class ids, or ``(N, L)`` float 0/1 multi-label targets, or None.
        train_mask, val_mask, test_mask: ``(N,)`` bool, or None.
        node_ids: the file's node identifiers, in row order.
        edge_weight: ``(E,)`` float or None.
    """

    x: Tensor | None
    edge_index: Tensor
    y: Tensor | None = None
    train_mask: Tensor | None = None
    val_mask: Tensor | None = None
    test_mask: Tensor | None = None
    node_ids: list[Any] = field(default_factory=list)
    edge_weight: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        if self.x is not None:
            return int(self.x.shape[0])
        return len(self.node_ids)

    @property
    def multilabel(self) -> bool:
        return self.y is not None and self.y.dim() == 2

    def degree(self) -> Tensor:
        """``(N,)`` number of edges touching each node as a target (long)."""
        return torch.bincount(self.edge_index[1], minlength=self.num_nodes)

    @classmethod
    def from_pyg(cls, data: Any) -> GraphData:
        """A :class:`GraphData` from a ``torch_geometric.data.Data`` (or any object with its
        attributes: ``edge_index`` and optionally ``x``, ``y``, ``train_mask``, ``val_mask``,
        ``test_mask``, ``edge_weight``, ``num_nodes``). torch_geometric is not imported. The
        edges are checked (integer ``(2, E)``, indices in ``[0, num_nodes)``); ``node_ids`` are
        ``0 .. N-1``."""
        from ..nn.graph import check_edge_index
        from ..patterns import edge_index_of

        if not hasattr(data, "edge_index"):
            raise TypeError(f"data must be a PyG Data (with edge_index), got "
                            f"{type(data).__name__}")
        x = getattr(data, "x", None)
        n = int(x.shape[0]) if isinstance(x, Tensor) else getattr(data, "num_nodes", None)
        edge_index, n = edge_index_of(data.edge_index, n)
        if isinstance(n, tuple):
            raise ValueError(f"num_nodes: a node-classification graph has one node set, got {n}")
        edge_index = check_edge_index(edge_index, n)
        fields = {}
        for k in ("y", "train_mask", "val_mask", "test_mask", "edge_weight"):
            v = getattr(data, k, None)
            if v is not None and not isinstance(v, Tensor):
                raise TypeError(f"data.{k} must be a tensor, got {type(v).__name__}")
            fields[k] = v
        for k in ("train_mask", "val_mask", "test_mask"):
            if fields[k] is not None and tuple(fields[k].shape) != (n,):
                raise ValueError(f"data.{k} must have shape ({n},), got "
                                 f"{tuple(fields[k].shape)}")
        return cls(x=x, edge_index=edge_index, node_ids=list(range(n)), **fields)

    def to_pyg(self):
        """A ``torch_geometric.data.Data`` with the same tensors (needs torch_geometric)."""
        try:
            from torch_geometric.data import Data
        except ImportError as e:  # optional dependency
            raise ImportError("GraphData.to_pyg() needs torch_geometric installed") from e
        kw = {k: getattr(self, k) for k in ("y", "train_mask", "val_mask", "test_mask",
                                            "edge_weight") if getattr(self, k) is not None}
        return Data(x=self.x, edge_index=self.edge_index, num_nodes=self.num_nodes, **kw)


# --------------------------------------------------------------------------------- PPI


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e


def _check_npy_size(path: Path) -> None:
    """``ValueError`` when the ``.npy`` header declares more data than the file holds (numpy
    would allocate the declared array before reading); a missing file stays an OSError."""
    from numpy.lib import format as npy_format

    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
            header = (npy_format.read_array_header_1_0 if version == (1, 0)
                      else npy_format.read_array_header_2_0)
            shape, _, dtype = header(f) if version in ((1, 0), (2, 0)) else (None, None, None)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a valid .npy array file ({e})") from e
        if shape is None:  # a newer format version: np.load decides
            return
        declared = math.prod(shape) * dtype.itemsize
        available = path.stat().st_size - f.tell()
    if declared > available:
        raise ValueError(f"{path}: header declares shape {shape} ({declared} bytes) but the "
                         f"file holds {available} bytes of data")


def _read_npy(path: Path) -> np.ndarray:
    try:
        if path.is_file():
            _check_npy_size(path)
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:  # bad header, object array, truncated
        raise ValueError(f"{path}: not a valid .npy array file ({e})") from e
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{path}: expected one .npy array, got {type(arr).__name__}")
    return arr


def load_ppi(directory: str | Path, prefix: str = "ppi") -> GraphData:
    """Load the GraphSAGE PPI format: ``{prefix}-G.json`` (networkx node-link data whose nodes
    carry ``val`` / ``test`` flags), ``{prefix}-feats.npy`` (``(N, F)``, rows by id map),
    ``{prefix}-id_map.json`` (node id -> row) and ``{prefix}-class_map.json`` (node id -> label
    list for multi-label, or an int). Links are made symmetric (both directions).

    Raises ``ValueError`` for malformed or inconsistent files.
    """
    d = Path(directory)
    graph = _read_json(d / f"{prefix}-G.json")
    feats = _read_npy(d / f"{prefix}-feats.npy")
    id_map = _read_json(d / f"{prefix}-id_map.json")
    class_map = _read_json(d / f"{prefix}-class_map.json")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise ValueError(f"{prefix}-G.json must be node-link data with a 'nodes' list")
    links = graph.get("links", graph.get("edges"))
    if not isinstance(links, list):
        raise ValueError(f"{prefix}-G.json must have a 'links' list")
    if not isinstance(id_map, dict) or not isinstance(class_map, dict):
        raise ValueError("id_map and class_map must be JSON objects (node id -> value)")
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.number):
        raise ValueError(f"{prefix}-feats.npy must be a numeric (N, F) array, got "
                         f"{feats.dtype} {feats.shape}")
    n = feats.shape[0]
    rows: dict[str, int] = {}
    for k, v in id_map.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
            raise ValueError(f"id_map[{k!r}] = {v!r} is not a row of the {n}-row feature array")
        rows[str(k)] = v
    if len(set(rows.values())) != len(rows):
        raise ValueError("id_map maps two node ids to the same feature row")

    val = np.zeros(n, dtype=bool)
    test = np.zeros(n, dtype=bool)
    present = np.zeros(n, dtype=bool)
    node_ids: list[Any] = [None] * n
    for node in graph["nodes"]:
        if not isinstance(node, dict) or "id" not in node:
            raise ValueError(f"{prefix}-G.json: every node needs an 'id', got {node!r}")
        key = str(node["id"])
        if key not in rows:
            raise ValueError(f"node {node['id']!r} is missing from id_map")
        r = rows[key]
        present[r] = True
        node_ids[r] = node["id"]
        val[r] = bool(node.get("val", False))
        test[r] = bool(node.get("test", False))
    if not present.all():
        raise ValueError(f"{int((~present).sum())} feature rows have no node in G.json")

    src, dst = [], []
    for link in links:
        try:
            a, b = rows[str(link["source"])], rows[str(link["target"])]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{prefix}-G.json: bad link {link!r} (unknown node or field)") from e
        src += [a, b]
        dst += [b, a]
    edge_index = torch.tensor([src, dst], dtype=torch.long).reshape(2, -1)

    y = _class_map_to_tensor(class_map, rows, n)
    train = ~(val | test)
    return GraphData(
        x=torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
        edge_index=edge_index, y=y, train_mask=torch.from_numpy(train),
        val_mask=torch.from_numpy(val), test_mask=torch.from_numpy(test), node_ids=node_ids,
    )


def _class_map_to_tensor(class_map: dict, rows: dict[str, int], n: int) -> Tensor:
    values = list(class_map.values())
    if len(class_map) != n or set(map(str, class_map)) != set(rows):
        raise ValueError(f"class_map must have a label for each of the {n} nodes")
    if all(isinstance(v, list) for v in values):
        width = len(values[0]) if values else 0
        y = np.zeros((n, width), dtype=np.float32)
        for k, v in class_map.items():
            if len(v) != width or not all(x in (0, 1) for x in v):
                raise ValueError(f"class_map[{k!r}]: multi-label rows must be {width} 0/1 values")
            y[rows[str(k)]] = v
        return torch.from_numpy(y)
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        y = np.zeros(n, dtype=np.int64)
        for k, v in class_map.items():
            y[rows[str(k)]] = v
        return torch.from_numpy(y)
    raise ValueError("class_map values must all be 0/1 lists (multi-label) or all ints >= 0")


def save_ppi(data: GraphData, directory: str | Path, prefix: str = "ppi") -> None:
    """Write ``data`` in the GraphSAGE PPI format read by :func:`load_ppi` (node ids = rows;
    each undirected link written once)."""
    if data.x is None or data.y is None:
        raise ValueError("save_ppi needs node features x and labels y")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    n = data.num_nodes
    masks = {k: (getattr(data, f"{k}_mask") if getattr(data, f"{k}_mask") is not None
                 else torch.zeros(n, dtype=torch.bool)) for k in ("val", "test")}
    nodes = [{"id": i, "val": bool(masks["val"][i]), "test": bool(masks["test"][i])}
             for i in range(n)]
    ei = data.edge_index
    lo, hi = torch.minimum(ei[0], ei[1]), torch.maximum(ei[0], ei[1])
    pairs = torch.unique(torch.stack([lo, hi]), dim=1)
    links = [{"source": int(a), "target": int(b)} for a, b in pairs.t().tolist()]
    graph = {"directed": False, "multigraph": False, "graph": {}, "nodes": nodes, "links": links}
    (d / f"{prefix}-G.json").write_text(json.dumps(graph))
    np.save(d / f"{prefix}-feats.npy", data.x.numpy())
    (d / f"{prefix}-id_map.json").write_text(json.dumps({str(i): i for i in range(n)}))
    ys = data.y.tolist()
    (d / f"{prefix}-class_map.json").write_text(json.dumps({str(i): ys[i] for i in range(n)}))


# --------------------------------------------------------------------------------- Planetoid


class _CSRStandIn:
    """Receives the pickled state of a scipy ``csr_matrix`` without importing or running scipy."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("csr_matrix state must be a dict")
        self.state = state

    def to_dense(self, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
        """The ``(rows, cols)`` float32 matrix; ``ValueError`` when it would take more than
        ``max_bytes`` (checked before allocating: a few bytes may claim any shape)."""
        s = self.state
        try:
            data, indices, indptr = (np.asarray(s[k]) for k in ("data", "indices", "indptr"))
            shape = s.get("_shape", s.get("shape"))
            n_rows, n_cols = (int(v) for v in shape)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"pickled csr_matrix lacks data/indices/indptr/shape ({e})") from e
        if n_rows < 0 or n_cols < 0:
            raise ValueError(f"pickled csr_matrix has a negative shape {(n_rows, n_cols)}")
        if n_rows * n_cols * 4 > max_bytes:
            raise ValueError(f"pickled csr_matrix of shape {(n_rows, n_cols)} needs "
                             f"{n_rows * n_cols * 4} bytes dense, over max_bytes={max_bytes}")
        if indptr.shape != (n_rows + 1,) or indices.shape != data.shape:
            raise ValueError("pickled csr_matrix has inconsistent indptr/indices/data sizes")
        if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
            raise ValueError("pickled csr_matrix has column indices out of range")
        if indptr[0] != 0 or indptr[-1] != data.size or np.any(np.diff(indptr) < 0):
            raise ValueError("pickled csr_matrix has an invalid indptr")
        out = np.zeros((n_rows, n_cols), dtype=np.float32)
        rows = np.repeat(np.arange(n_rows), np.diff(indptr))
        out[rows, indices] = data
        return out


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for raw bytes, limited to str -> bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 text may be encoded to bytes")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as protocol-2 pickles write an empty ``bytes`` (e.g. the data of an empty
    array); any argument (``bytes(10**12)`` would allocate) is refused."""
    if args:
        raise pickle.UnpicklingError("only bytes() without arguments may be called")
    return b""


class _NDArrayRef:
    """Stands for ``numpy.ndarray`` in a pickle: accepted as the type argument of
    ``_reconstruct`` (which then builds a real ndarray), refused as a callable, since
    ``ndarray(shape)`` would allocate whatever shape a few bytes claim."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("numpy.ndarray may only be rebuilt through _reconstruct")


def _allowed_globals(size: int, max_bytes: int) -> dict[tuple[str, str], Any]:
    """The globals a Planetoid pickle of ``size`` bytes may name; an array it declares
    (``_reconstruct``'s shape) may take at most ``min(size, max_bytes)`` bytes, checked before
    numpy allocates it (the pickle must carry the array's data anyway)."""
    budget = min(size, max_bytes)
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, wherever it lives
    scalar = np.float64(0).__reduce__()[0]

    def safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NDArrayRef:
            raise pickle.UnpicklingError("_reconstruct may only rebuild numpy.ndarray")
        try:
            dims = (int(shape),) if np.ndim(shape) == 0 else tuple(int(x) for x in shape)
            itemsize = np.dtype(dtype).itemsize
        except (TypeError, ValueError) as e:
            raise pickle.UnpicklingError(f"bad array shape or dtype ({e})") from e
        nbytes = math.prod(dims) * itemsize
        if any(x < 0 for x in dims) or nbytes > budget:
            raise pickle.UnpicklingError(
                f"an array of shape {dims} ({nbytes} bytes) is declared larger than the pickle "
                f"({size} bytes) or max_bytes={max_bytes}"
            )
        return reconstruct(np.ndarray, dims, dtype)

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NDArrayRef,
        ("numpy", "dtype"): np.dtype,
        ("collections", "defaultdict"): __import__("collections").defaultdict,
        ("__builtin__", "list"): list,
        ("builtins", "list"): list,
        ("__builtin__", "bytes"): _empty_bytes,  # empty bytes in a protocol-2 pickle
        ("builtins", "bytes"): _empty_bytes,
        ("_codecs", "encode"): _latin1_encode,  # Python 3 protocol-2 pickles of bytes
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = safe_reconstruct
        allowed[(mod, "scalar")] = scalar
    for mod in ("scipy.sparse.csr", "scipy.sparse._csr"):
        allowed[(mod, "csr_matrix")] = _CSRStandIn
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, max_bytes: int) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")
        self._allowed = _allowed_globals(len(data), max_bytes)

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays, dtypes, scipy CSR "
                "matrices and dict-of-list graphs are allowed in Planetoid files"
            )
        return obj


def restricted_unpickle(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Unpickle Planetoid data admitting only numpy arrays/dtypes, CSR matrices (as a stand-in,
    never scipy code) and ``defaultdict(list)``. Anything else raises ``ValueError``, as does
    an array declared larger than the pickle itself could fill (a pickle carries its arrays'
    data) or than ``max_bytes``, before anything is allocated."""
    if len(data) > max_bytes:
        raise ValueError(f"pickle of {len(data)} bytes exceeds max_bytes={max_bytes}")
    try:
        return _RestrictedUnpickler(data, max_bytes).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError,
            ValueError, MemoryError) as e:
        raise ValueError(f"not an allowed Planetoid pickle: {e}") from e


def _as_dense(obj: Any, what: str, max_bytes: int) -> np.ndarray:
    if isinstance(obj, _CSRStandIn):
        try:
            return obj.to_dense(max_bytes)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    if isinstance(obj, np.ndarray) and obj.ndim == 2 and np.issubdtype(obj.dtype, np.number):
        return obj.astype(np.float32)
    raise ValueError(f"{what}: expected a 2-D numeric array or CSR matrix, got {type(obj)}")


def _read_limited(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path``; ``ValueError`` (before reading) for a directory or a file over
    ``max_bytes``. A missing file stays ``FileNotFoundError``."""
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a Planetoid file")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, over max_bytes={max_bytes}")
    return path.read_bytes()


def load_planetoid(directory: str | Path, name: str, *,
                   max_bytes: int = DEFAULT_MAX_BYTES) -> GraphData:
    """Load ``ind.{name}.{x,y,tx,ty,allx,ally,graph,test.index}`` with the standard split
    (Kipf & Welling / Yang et al.): the labelled ``x`` rows train, the next 500 validate, the
    ``test.index`` rows test. Citeseer's isolated test nodes get zero features and no label
    (label row all zero -> class 0 and excluded from every mask). Edges are made symmetric,
    duplicates and self loops dropped.

    ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`) bounds each file and every array the files
    declare (a CSR matrix's dense form, the node count ``test.index`` implies): sizes are
    checked against it before anything is allocated, and ``ValueError`` names it.
    """
    check_positive_int("max_bytes", max_bytes)
    name = name.lower()
    if name not in PLANETOID_NAMES:
        raise ValueError(f"dataset must be one of {PLANETOID_NAMES}, got {name!r}")
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{d}: not a directory (expected the folder with ind.{name}.* files)")
    objs = {}
    for part in ("x", "y", "tx", "ty", "allx", "ally", "graph"):
        path = d / f"ind.{name}.{part}"
        raw = _read_limited(path, max_bytes)
        try:
            objs[part] = restricted_unpickle(raw, max_bytes=max_bytes)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    raw = _read_limited(d / f"ind.{name}.test.index", max_bytes)
    try:
        test_index = [int(line) for line in raw.decode("ascii").split()]
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"ind.{name}.test.index must hold one integer per line ({e})") from e
    if not test_index:
        raise ValueError(f"ind.{name}.test.index is empty")
    x, tx, allx = (_as_dense(objs[k], f"ind.{name}.{k}", max_bytes) for k in ("x", "tx", "allx"))
    y, ty, ally = (np.asarray(objs[k]) for k in ("y", "ty", "ally"))
    for k, arr in (("y", y), ("ty", ty), ("ally", ally)):
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"ind.{name}.{k} must be a 2-D one-hot label array")
    if tx.shape[0] != ty.shape[0] or allx.shape[0] != ally.shape[0] or x.shape[0] != y.shape[0]:
        raise ValueError(f"ind.{name}: feature and label row counts differ")
    if len(test_index) != tx.shape[0]:
        raise ValueError(f"ind.{name}.test.index has {len(test_index)} rows, tx has {tx.shape[0]}")
    test_sorted = np.sort(np.asarray(test_index, dtype=object))  # ints of any size
    lo, hi = int(test_sorted[0]), int(test_sorted[-1])
    if lo < allx.shape[0]:
        raise ValueError(f"ind.{name}.test.index refers to training rows ({lo})")
    if len(set(test_index)) != len(test_index):
        raise ValueError(f"ind.{name}.test.index lists a row twice")
    # the nodes test.index implies: features, labels and masks are allocated for all of them
    n_nodes = allx.shape[0] + hi - lo + 1
    need = n_nodes * (4 * tx.shape[1] + ty.itemsize * ty.shape[1] + 16)
    if need > max_bytes:
        raise ValueError(f"ind.{name}.test.index reaches row {hi}: {n_nodes} nodes would need "
                         f"{need} bytes, over max_bytes={max_bytes}")
    test_sorted = test_sorted.astype(np.int64)
    if hi - lo + 1 != tx.shape[0]:  # citeseer: isolated test nodes missing from tx
        full_tx = np.zeros((hi - lo + 1, tx.shape[1]), dtype=np.float32)
        full_tx[test_sorted - lo] = tx
        full_ty = np.zeros((hi - lo + 1, ty.shape[1]), dtype=ty.dtype)
        full_ty[test_sorted - lo] = ty
        tx, ty = full_tx, full_ty
    feats = np.concatenate([allx, tx])
    labels = np.concatenate([ally, ty])
    feats[test_index] = feats[test_sorted]
    labels[test_index] = labels[test_sorted]
    n = feats.shape[0]

    graph = objs["graph"]
    if not isinstance(graph, dict):
        raise ValueError(f"ind.{name}.graph must be a dict of adjacency lists")
    src, dst = [], []
    for a, nbrs in graph.items():
        if not isinstance(nbrs, list):
            raise ValueError(f"ind.{name}.graph: adjacency of {a!r} is not a list")
        src += [int(a)] * len(nbrs)
        dst += [int(b) for b in nbrs]
    ei = torch.tensor([src + dst, dst + src], dtype=torch.long)
    if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= n):
        raise ValueError(f"ind.{name}.graph refers to nodes outside [0, {n})")
    ei = ei[:, ei[0] != ei[1]]
    ei = torch.unique(ei[1] * n + ei[0])
    edge_index = torch.stack([ei % n, ei // n])

    has_label = labels.sum(1) > 0
    train = np.zeros(n, dtype=bool)
    train[: y.shape[0]] = True
    val = np.zeros(n, dtype=bool)
    val[y.shape[0]: y.shape[0] + 500] = True
    test = np.zeros(n, dtype=bool)
    test[test_index] = True
    return GraphData(
        x=torch.from_numpy(feats.astype(np.float32)), edge_index=edge_index,
        y=torch.from_numpy(labels.argmax(1).astype(np.int64)),
        train_mask=torch.from_numpy(train & has_label), val_mask=torch.from_numpy(val & has_label),
        test_mask=torch.from_numpy(test & has_label), node_ids=list(range(n)),
    )


# --------------------------------------------------------------------------------- edge list


def load_edge_list(path: str | Path, delimiter: str | None = None, directed: bool = False,
                   header: bool | None = None) -> GraphData:
    """Read ``source<sep>target[<sep>weight]`` lines (CSV or TSV; ``#`` lines are comments).

    Node names may be any strings; they are numbered in order of first appearance
    (``node_ids``). ``delimiter`` defaults to tab for ``.tsv``/``.txt`` and comma otherwise;
    ``header=None`` skips a first line whose third field (or, without one, whose two names are
    both non-numeric and the rest of the file numeric) is not a number. Undirected files
    (default) give both directions.
    """
    p = Path(path)
    if delimiter is None:
        delimiter = "\t" if p.suffix.lower() in (".tsv", ".txt") else ","
    with open(p, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter)
                if r and any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise ValueError(f"{p}: no edges")
    if header is None:
        header = _looks_like_header(rows)
    if header:
        rows = rows[1:]
    ids: dict[str, int] = {}
    src, dst, weights = [], [], []
    for line_no, r in enumerate(rows, 1 + int(bool(header))):
        r = [c.strip() for c in r]
        if len(r) < 2 or len(r) > 3 or not r[0] or not r[1]:
            raise ValueError(f"{p}: line {line_no}: expected 'source{delimiter}target"
                             f"[{delimiter}weight]', got {r!r}")
        a, b = (ids.setdefault(name, len(ids)) for name in r[:2])
        src.append(a)
        dst.append(b)
        if len(r) == 3:
            try:
                weights.append(float(r[2]))
            except ValueError as e:
                raise ValueError(f"{p}: line {line_no}: weight {r[2]!r} is not a number") from e
    if weights and len(weights) != len(src):
        raise ValueError(f"{p}: some lines have a weight and others do not")
    ei = torch.tensor([src, dst], dtype=torch.long)
    w = torch.tensor(weights, dtype=torch.float32) if weights else None
    if not directed:
        ei = torch.cat([ei, ei.flip(0)], 1)
        w = torch.cat([w, w]) if w is not None else None
    return GraphData(x=None, edge_index=ei, node_ids=list(ids), edge_weight=w)


def _looks_like_header(rows: list[list[str]]) -> bool:
    first = [c.strip() for c in rows[0]]

    def numeric(s: str) -> bool:
        try:
            float(s)
        except ValueError:
            return False
        return True

    if len(first) >= 3:
        return not numeric(first[2])
    rest_numeric = all(numeric(c.strip()) for r in rows[1:50] for c in r[:2])
    return len(rows) > 1 and rest_numeric and not (numeric(first[0]) and numeric(first[1]))
