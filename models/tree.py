"""The flat, memory-mappable layout of a tree ensemble, shared by builder and predictor.

Nodes of all trees are numbered in one sequence, tree after tree; each tree is stored
breadth-first (root, then its top clusters, ..., then its labels), so the children of a node
are a contiguous range ``child_ptr[n] .. child_ptr[n + 1]``.

Weights are stored per parent **chunk**, as PECOS does: the classifiers of all children of
one node share one small sparse matrix whose rows are the features any of them uses
(``chunk_feat``, sorted), each row listing ``(entry_child, entry_val)`` pairs. Scoring one
node's children for a document is then one sparse intersection, and its weights are read
from one contiguous block of memory.

Bytes: in XMC most chunk rows hold one or two entries, so a row's own cost decides the
bundle's size as much as an entry's. A row stores its feature (4 bytes) and its entry count
(``row_len``, 1 byte while a chunk has at most 255 children); where a row's entries start is
kept only for every ``ROW_BLOCK``-th row (``row_mark``) and found from there by adding at most
``ROW_BLOCK - 1`` counts. ``entry_child`` is 1 byte while a chunk has at most 256 children.
``entry_val`` is float32, or int16 / int8 with one float32 scale per classifier
(``weight_scale``: a node's weights are its entries times its scale).

Features from ``dense_start`` on are a dense encoder's block (every document has all of
them): their weights are stored apart, unpruned, as one dense ``(children, dim)`` matrix per
chunk (``dense_ptr`` / ``dense_val``), scored by a plain dot product. Without a dense encoder
``dense_start`` is the feature count and no chunk has a dense block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import numba
import numpy as np

from models.errors import InvalidInputError

#: rows per ``row_mark`` entry: the scan for a row's first entry adds at most ROW_BLOCK - 1
#: counts, and the marks cost 8 / ROW_BLOCK bytes a row
ROW_BLOCK = 16

#: array name -> the dtypes it may be stored in, narrowest first. The writer takes the
#: narrowest that holds the values (``entry_val``: the one ``weight_dtype`` asks for); the
#: loader accepts any of them. The bundle stores exactly these arrays.
ENSEMBLE_ARRAYS: dict[str, tuple[type, ...]] = {
    "tree_root": (np.int64,),  # [n_trees] root node of each tree
    "tree_depth": (np.int32,),  # [n_trees] layers below the root (labels are the last)
    "child_ptr": (np.int64,),  # [n_nodes + 1] children range of each node
    "parent": (np.int64,),  # [n_nodes] parent node, -1 for roots
    "chunk_ptr": (np.int64,),  # [n_nodes + 1] rows of the chunk of each node's children
    "chunk_feat": (np.int32,),  # [n_rows] feature id of each chunk row (sorted within a chunk)
    "row_len": (np.uint8, np.uint16, np.int32),  # [n_rows] entries of each row
    "row_mark": (np.int64,),  # [n_rows // ROW_BLOCK + 1] first entry of rows 0, 16, 32, ...
    "entry_child": (np.uint8, np.uint16, np.int32),  # [n_entries] child within its parent
    "entry_val": (np.float32, np.int16, np.int8),  # [n_entries] weight / weight_scale
    "weight_scale": (np.float32,),  # [n_nodes] scale of each node's sparse weights
    "bias": (np.float32,),  # [n_nodes] bias term of each node's classifier
    "node_label": (np.int32,),  # [n_nodes] label id of a leaf, -1 for clusters
    "label_node": (np.int64,),  # [n_trees, n_labels] leaf node of each label in each tree
    "dense_start": (np.int64,),  # [1] first feature of the dense block (n_features: none)
    "dense_ptr": (np.int64,),  # [n_nodes + 1] dense weights of each node's children
    "dense_val": (np.float32,),  # [sum of children x dim] row-major per chunk, child by child
}

#: ``weight_dtype`` build parameter -> the dtype of ``entry_val``
WEIGHT_DTYPES: dict[str, type] = {"float32": np.float32, "int16": np.int16, "int8": np.int8}


def narrowest(name: str, arrays: list[np.ndarray]) -> np.dtype:
    """The narrowest dtype of ``ENSEMBLE_ARRAYS[name]`` that holds every value of
    ``arrays`` (integers by range; ``entry_val`` keeps the widest dtype it is given)."""
    allowed = [np.dtype(d) for d in ENSEMBLE_ARRAYS[name]]
    if name == "entry_val":
        given = {a.dtype for a in arrays}
        return next(d for d in allowed if d in given) if given & set(allowed) else allowed[0]
    if allowed[0].kind == "f" or len(allowed) == 1:
        return allowed[0]
    lo = min((int(a.min()) for a in arrays if a.size), default=0)
    hi = max((int(a.max()) for a in arrays if a.size), default=0)
    for d in allowed:
        info = np.iinfo(d.str)
        if info.min <= lo and hi <= info.max:
            return d
    raise InvalidInputError(f"{name}: values {lo}..{hi} fit none of {allowed}")


def row_marks(row_len: np.ndarray) -> np.ndarray:
    """``row_mark`` of ``row_len``: the first entry of every ROW_BLOCK-th row (and of row
    n_rows when it is one), summed in slices so no n_rows-long int64 temporary is made."""
    n = row_len.shape[0]
    full = n // ROW_BLOCK
    marks = np.zeros(full + 1, dtype=np.int64)
    step = ROW_BLOCK << 20
    acc = 0
    for s in range(0, full * ROW_BLOCK, step):
        e = min(s + step, full * ROW_BLOCK)
        sums = np.cumsum(np.asarray(row_len[s:e]).reshape(-1, ROW_BLOCK).sum(
            axis=1, dtype=np.int64)) + acc
        marks[1 + s // ROW_BLOCK : 1 + e // ROW_BLOCK] = sums
        acc = int(sums[-1])
    return marks


def row_start(row_len: np.ndarray, row_mark: np.ndarray, r: int) -> int:
    """The first entry of row r (r may be n_rows: then the entry count)."""
    b = r // ROW_BLOCK
    return int(row_mark[b]) + int(np.asarray(row_len[b * ROW_BLOCK : r]).sum(dtype=np.int64))


def row_starts(row_len: np.ndarray, row_mark: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """int64 first entry of each row lo..hi (inclusive of hi, which may be n_rows)."""
    b0 = lo // ROW_BLOCK
    first = b0 * ROW_BLOCK
    starts = np.empty(hi - first + 1, dtype=np.int64)
    starts[0] = row_mark[b0]
    np.cumsum(row_len[first:hi], dtype=np.int64, out=starts[1:])
    starts[1:] += starts[0]
    return starts[lo - first :]


@dataclass
class Ensemble:
    tree_root: np.ndarray
    tree_depth: np.ndarray
    child_ptr: np.ndarray
    parent: np.ndarray
    chunk_ptr: np.ndarray
    chunk_feat: np.ndarray
    row_len: np.ndarray
    row_mark: np.ndarray
    entry_child: np.ndarray
    entry_val: np.ndarray
    weight_scale: np.ndarray
    bias: np.ndarray
    node_label: np.ndarray
    label_node: np.ndarray
    dense_start: np.ndarray
    dense_ptr: np.ndarray
    dense_val: np.ndarray

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Ensemble:
        """An ensemble of ``arrays`` (all of ENSEMBLE_ARRAYS but ``row_mark``, which is
        derived), each stored in its narrowest allowed dtype."""
        arrays = dict(arrays)
        arrays["row_mark"] = row_marks(arrays["row_len"])
        return cls(**{k: np.ascontiguousarray(v, dtype=narrowest(k, [np.asarray(v)]))
                      for k, v in arrays.items()})

    @property
    def n_trees(self) -> int:
        return int(self.tree_root.shape[0])

    @property
    def n_nodes(self) -> int:
        return int(self.bias.shape[0])

    @property
    def n_labels(self) -> int:
        return int(self.label_node.shape[1])

    @property
    def n_entries(self) -> int:
        return int(self.entry_val.shape[0])

    def max_children(self) -> int:
        return int(np.diff(self.child_ptr).max()) if self.n_nodes else 0

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def weights(self, lo: int, hi: int) -> np.ndarray:
        """float32 weights of entries lo..hi (entry_val times its node's scale)."""
        vals = np.asarray(self.entry_val[lo:hi], dtype=np.float32)
        if self.entry_val.dtype == np.float32:
            return vals
        return vals * np.asarray(self.weight_scale)[self.entry_node(lo, hi)]

    def entry_node(self, lo: int, hi: int) -> np.ndarray:
        """Node id (the child whose classifier it belongs to) of each entry lo..hi."""
        owner = np.repeat(np.arange(self.n_nodes), np.diff(self.chunk_ptr))
        row_owner = np.repeat(owner, np.asarray(self.row_len, dtype=np.int64))
        return np.asarray(self.child_ptr)[row_owner[lo:hi]] + np.asarray(
            self.entry_child[lo:hi], dtype=np.int64)

    def tree_summary(self) -> list[dict]:
        """Per tree: depth and node count per layer, for the manifest."""
        out = []
        for t in range(self.n_trees):
            layer = [int(self.tree_root[t])]
            widths = []
            for _ in range(int(self.tree_depth[t])):
                lo, hi = self.child_ptr[layer[0]], self.child_ptr[layer[-1] + 1]
                layer = [int(lo), int(hi) - 1]
                widths.append(int(hi - lo))
            out.append({"depth": int(self.tree_depth[t]), "layer_widths": widths})
        return out

    @classmethod
    def concatenate(cls, trees: list[Ensemble]) -> Ensemble:
        """Join one-tree ensembles into one forest in memory (see :func:`join_trees`)."""
        pieces: dict[str, list[np.ndarray]] = {}
        for name, piece in join_trees([t.arrays for t in trees]):
            pieces.setdefault(name, []).append(piece)
        return cls.from_arrays({k: np.concatenate(v) for k, v in pieces.items()})


#: a one-tree ensemble's arrays, by name, as a function (trees may live on disk)
TreeArrays = Callable[[], dict[str, np.ndarray]]


def join_sizes(sizes: list[dict[str, int]]) -> dict[str, tuple[int, ...]]:
    """Shapes of the joined forest's arrays from each tree's n_nodes, n_rows, n_entries,
    n_dense, n_labels (what :func:`join_trees` will emit, row_mark aside)."""
    total = {k: sum(s[k] for s in sizes) for k in ("n_nodes", "n_rows", "n_entries", "n_dense")}
    n_trees = len(sizes)
    node, rows = (total["n_nodes"],), (total["n_rows"],)
    return {
        "tree_root": (n_trees,), "tree_depth": (n_trees,),
        "child_ptr": (node[0] + 1,), "parent": node, "chunk_ptr": (node[0] + 1,),
        "chunk_feat": rows, "row_len": rows, "entry_child": (total["n_entries"],),
        "entry_val": (total["n_entries"],), "weight_scale": node, "bias": node,
        "node_label": node, "label_node": (n_trees, sizes[0]["n_labels"]),
        "dense_start": (1,), "dense_ptr": (node[0] + 1,), "dense_val": (total["n_dense"],),
    }


def join_trees(trees: Sequence[TreeArrays]) -> Iterator[tuple[str, np.ndarray]]:
    """The arrays of the forest joining one-tree ensembles, as (name, piece) in file order:
    concatenating each name's pieces gives the array (all but ``row_mark``, derived from
    ``row_len``). Nodes are numbered breadth-first across trees (all roots, then every tree's
    first layer, ...), so that one ``child_ptr`` holds every node's children range. Each
    tree's arrays are asked for once per name group, so trees may be read from disk one at a
    time and the whole forest is never in memory."""
    bounds = [_layer_bounds(get()) for get in trees]
    n_trees = len(trees)
    # segment (layer, tree) -> its first node in the forest
    seg_start: dict[tuple[int, int], int] = {}
    pos = 0
    for layer in range(max(len(b) - 1 for b in bounds)):
        for t in range(n_trees):
            if layer < len(bounds[t]) - 1:
                seg_start[layer, t] = pos
                pos += int(bounds[t][layer + 1] - bounds[t][layer])
    order = sorted(seg_start, key=seg_start.__getitem__)

    def new_id(t: int, ids: np.ndarray) -> np.ndarray:
        layer = np.searchsorted(bounds[t], ids, side="right") - 1
        shift = np.array([seg_start[lay, t] for lay in range(len(bounds[t]) - 1)]) - bounds[t][:-1]
        return ids + shift[layer]

    yield "tree_root", np.array([seg_start[0, t] for t in range(n_trees)], np.int64)
    arrays = [get() for get in trees]
    yield "tree_depth", np.concatenate([a["tree_depth"] for a in arrays])
    starts = {int(a["dense_start"][0]) for a in arrays}
    if len(starts) != 1:
        raise InvalidInputError(f"trees disagree on dense_start: {sorted(starts)}")
    yield "dense_start", arrays[0]["dense_start"]
    yield "label_node", np.vstack([new_id(t, np.asarray(a["label_node"][0]))
                                   for t, a in enumerate(arrays)])
    del arrays
    carry = {"child_ptr": n_trees, "chunk_ptr": 0, "dense_ptr": 0}
    for name in carry:
        yield name, np.array([carry[name]], np.int64)
    for name in ("parent", "bias", "node_label", "weight_scale", "child_ptr", "chunk_ptr",
                 "dense_ptr", "chunk_feat", "row_len", "entry_child", "entry_val", "dense_val"):
        for layer, t in order:
            a = trees[t]()
            lo, hi = int(bounds[t][layer]), int(bounds[t][layer + 1])
            yield name, _segment(a, name, lo, hi, t, new_id, carry)


def _segment(a: dict[str, np.ndarray], name: str, lo: int, hi: int, t: int,
             new_id: Callable[[int, np.ndarray], np.ndarray],
             carry: dict[str, int]) -> np.ndarray:
    """The piece of array ``name`` that nodes lo..hi of tree ``a`` (one layer) hold."""
    if name == "parent":
        p = np.asarray(a["parent"][lo:hi])
        return np.where(p >= 0, new_id(t, np.maximum(p, 0)), -1)
    if name in carry:  # pointers: counts of this segment, summed on from the last one
        counts = np.diff(np.asarray(a[name][lo : hi + 1]))
        ptr = carry[name] + np.cumsum(counts)
        if ptr.size:
            carry[name] = int(ptr[-1])
        return ptr
    if name in ("chunk_feat", "row_len"):
        return np.asarray(a[name][a["chunk_ptr"][lo] : a["chunk_ptr"][hi]])
    if name in ("entry_child", "entry_val"):
        r0, r1 = int(a["chunk_ptr"][lo]), int(a["chunk_ptr"][hi])
        e0 = row_start(a["row_len"], a["row_mark"], r0)
        e1 = row_start(a["row_len"], a["row_mark"], r1)
        return np.asarray(a[name][e0:e1])
    if name == "dense_val":
        return np.asarray(a[name][a["dense_ptr"][lo] : a["dense_ptr"][hi]])
    return np.asarray(a[name][lo:hi])


def _layer_bounds(a: dict[str, np.ndarray]) -> np.ndarray:
    """Of a one-tree ensemble's arrays: the first node of each layer (root first), n_nodes."""
    bounds = [0, 1]
    for _ in range(int(a["tree_depth"][0])):
        # breadth-first: the next layer ends where the last node's children end
        bounds.append(int(a["child_ptr"][bounds[-1]]))
    return np.asarray(bounds, dtype=np.int64)


@numba.njit(cache=True)
def _scales(chunk_ptr: np.ndarray, row_len: np.ndarray, entry_child: np.ndarray,
            entry_val: np.ndarray, child_ptr: np.ndarray, qmax: float, scale: np.ndarray) -> None:
    """scale[node] = max |weight| of the node / qmax (1 where a node has no weight)."""
    e = 0
    for p in range(chunk_ptr.shape[0] - 1):
        c0 = child_ptr[p]
        for r in range(chunk_ptr[p], chunk_ptr[p + 1]):
            for _ in range(row_len[r]):
                node = c0 + entry_child[e]
                scale[node] = max(scale[node], abs(entry_val[e]))
                e += 1
    for n in range(scale.shape[0]):
        scale[n] = scale[n] / qmax if scale[n] > 0 else 1.0


@numba.njit(cache=True)
def _quantize(chunk_ptr: np.ndarray, row_len: np.ndarray, entry_child: np.ndarray,
              entry_val: np.ndarray, child_ptr: np.ndarray, scale: np.ndarray,
              out: np.ndarray) -> None:
    e = 0
    for p in range(chunk_ptr.shape[0] - 1):
        c0 = child_ptr[p]
        for r in range(chunk_ptr[p], chunk_ptr[p + 1]):
            for _ in range(row_len[r]):
                out[e] = np.rint(entry_val[e] / scale[c0 + entry_child[e]])
                e += 1


def quantize(ens: Ensemble, weight_dtype: str) -> Ensemble:
    """The ensemble with its sparse weights stored as ``weight_dtype``: float32 as they are,
    or int16 / int8 scaled per classifier so its largest weight maps to the type's largest
    value (round to nearest). The dense block stays float32."""
    dtype = np.dtype(WEIGHT_DTYPES[weight_dtype])
    if ens.entry_val.dtype != np.float32:
        raise InvalidInputError("only float32 weights can be quantized")
    if dtype == np.float32:
        return ens
    qmax = float(np.iinfo(dtype.str).max)
    scale = np.zeros(ens.n_nodes, dtype=np.float32)
    args = (np.asarray(ens.chunk_ptr), np.asarray(ens.row_len), np.asarray(ens.entry_child),
            np.asarray(ens.entry_val), np.asarray(ens.child_ptr))
    _scales(*args, qmax, scale)
    out = np.empty(ens.n_entries, dtype=dtype)
    _quantize(*args, scale, out)
    return dataclasses.replace(ens, entry_val=out, weight_scale=scale)
