"""The flat, memory-mappable layout of a tree ensemble, shared by builder and predictor.

Nodes of all trees are numbered in one sequence; each tree is stored breadth-first (root,
then its top clusters, ..., then its labels), so the children of a node are a contiguous
range ``child_ptr[n] .. child_ptr[n + 1]``.

Weights are stored per parent **chunk**, as PECOS does: the classifiers of all children of
one node share one small sparse matrix whose rows are the features any of them uses
(``chunk_feat``, sorted), each row listing ``(entry_child, entry_val)`` pairs. Scoring one
node's children for a document is then one sparse intersection, and its weights are read
from one contiguous block of memory.

Features from ``dense_start`` on are a dense encoder's block (every document has all of
them): their weights are stored apart, unpruned, as one dense ``(children, dim)`` matrix per
chunk (``dense_ptr`` / ``dense_val``), scored by a plain dot product. Without a dense encoder
``dense_start`` is the feature count and no chunk has a dense block.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

#: array name -> dtype; the bundle stores exactly these arrays (``ensemble.<name>.npy``)
ENSEMBLE_ARRAYS: dict[str, type] = {
    "tree_root": np.int64,  # [n_trees] root node of each tree
    "tree_depth": np.int32,  # [n_trees] layers below the root (labels are the last)
    "child_ptr": np.int64,  # [n_nodes + 1] children range of each node
    "parent": np.int64,  # [n_nodes] parent node, -1 for roots
    "chunk_ptr": np.int64,  # [n_nodes + 1] rows of the chunk of each node's children
    "chunk_feat": np.int32,  # [n_rows] feature id of each chunk row (sorted within a chunk)
    "row_ptr": np.int64,  # [n_rows + 1] entries of each row
    "entry_child": np.int32,  # [n_entries] child offset within its parent's children
    "entry_val": np.float32,  # [n_entries] weight
    "bias": np.float32,  # [n_nodes] bias term of each node's classifier
    "node_label": np.int32,  # [n_nodes] label id of a leaf, -1 for clusters
    "label_node": np.int64,  # [n_trees, n_labels] leaf node of each label in each tree
    "dense_start": np.int64,  # [1] first feature of the dense block (n_features: none)
    "dense_ptr": np.int64,  # [n_nodes + 1] dense weights of each node's children
    "dense_val": np.float32,  # [sum of children x dim] row-major per chunk, child by child
}


@dataclass
class Ensemble:
    tree_root: np.ndarray
    tree_depth: np.ndarray
    child_ptr: np.ndarray
    parent: np.ndarray
    chunk_ptr: np.ndarray
    chunk_feat: np.ndarray
    row_ptr: np.ndarray
    entry_child: np.ndarray
    entry_val: np.ndarray
    bias: np.ndarray
    node_label: np.ndarray
    label_node: np.ndarray
    dense_start: np.ndarray
    dense_ptr: np.ndarray
    dense_val: np.ndarray

    @property
    def n_trees(self) -> int:
        return int(self.tree_root.shape[0])

    @property
    def n_nodes(self) -> int:
        return int(self.bias.shape[0])

    @property
    def n_labels(self) -> int:
        return int(self.label_node.shape[1])

    def max_children(self) -> int:
        return int(np.diff(self.child_ptr).max()) if self.n_nodes else 0

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

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
        """Join single-tree ensembles into one forest, numbered breadth-first across trees
        (all roots, then every tree's first layer, ...) so that one ``child_ptr`` holds the
        children ranges of every node."""
        n_trees = len(trees)
        sizes = [t.n_nodes for t in trees]
        node_off = np.concatenate(([0], np.cumsum(sizes)))
        depth = np.concatenate([_node_depth(t) for t in trees])
        tree_of = np.repeat(np.arange(n_trees), sizes)
        local = np.concatenate([np.arange(n) for n in sizes])
        order = np.lexsort((local, tree_of, depth))  # new id -> old global id
        new_id = np.empty_like(order)
        new_id[order] = np.arange(order.size)

        parent_old = np.concatenate(
            [np.where(t.parent >= 0, t.parent + node_off[k], -1) for k, t in enumerate(trees)]
        )
        parent = np.where(parent_old[order] >= 0, new_id[np.maximum(parent_old[order], 0)], -1)
        n_children = np.concatenate([np.diff(t.child_ptr) for t in trees])[order]
        child_ptr = np.concatenate(([n_trees], n_trees + np.cumsum(n_children)))

        # chunks follow their node into the new order: gather row ranges, then entry ranges
        row_off = np.concatenate(([0], np.cumsum([t.chunk_feat.shape[0] for t in trees])))
        entry_off = np.concatenate(([0], np.cumsum([t.entry_val.shape[0] for t in trees])))
        chunk_start = np.concatenate(
            [t.chunk_ptr[:-1] + row_off[k] for k, t in enumerate(trees)])[order]
        chunk_len = np.concatenate([np.diff(t.chunk_ptr) for t in trees])[order]
        rows = _gather_ranges(chunk_start, chunk_len)
        row_start_all = np.concatenate([t.row_ptr[:-1] + entry_off[k] for k, t in enumerate(trees)])
        row_len_all = np.concatenate([np.diff(t.row_ptr) for t in trees])
        entries = _gather_ranges(row_start_all[rows], row_len_all[rows])
        dense_off = np.concatenate(([0], np.cumsum([t.dense_val.shape[0] for t in trees])))
        dense_from = np.concatenate(
            [t.dense_ptr[:-1] + dense_off[k] for k, t in enumerate(trees)])[order]
        dense_len = np.concatenate([np.diff(t.dense_ptr) for t in trees])[order]
        starts = {int(t.dense_start[0]) for t in trees}
        if len(starts) != 1:
            raise ValueError(f"trees disagree on dense_start: {sorted(starts)}")

        label_node = np.vstack([new_id[t.label_node[0] + node_off[k]] for k, t in enumerate(trees)])
        arrays = dict(
            tree_root=new_id[node_off[:-1] + np.array([int(t.tree_root[0]) for t in trees])],
            tree_depth=np.concatenate([t.tree_depth for t in trees]),
            child_ptr=child_ptr,
            parent=parent,
            chunk_ptr=np.concatenate(([0], np.cumsum(chunk_len))),
            chunk_feat=np.concatenate([t.chunk_feat for t in trees])[rows],
            row_ptr=np.concatenate(([0], np.cumsum(row_len_all[rows]))),
            entry_child=np.concatenate([t.entry_child for t in trees])[entries],
            entry_val=np.concatenate([t.entry_val for t in trees])[entries],
            bias=np.concatenate([t.bias for t in trees])[order],
            node_label=np.concatenate([t.node_label for t in trees])[order],
            label_node=label_node,
            dense_start=trees[0].dense_start,
            dense_ptr=np.concatenate(([0], np.cumsum(dense_len))),
            dense_val=np.concatenate([t.dense_val for t in trees])[
                _gather_ranges(dense_from, dense_len)],
        )
        return cls(**{k: np.ascontiguousarray(v, dtype=ENSEMBLE_ARRAYS[k])
                      for k, v in arrays.items()})


def _node_depth(tree: Ensemble) -> np.ndarray:
    """Depth of every node of a one-tree ensemble (parents precede their children)."""
    depth = np.zeros(tree.n_nodes, dtype=np.int64)
    has_parent = tree.parent >= 0
    for _ in range(int(tree.tree_depth[0])):
        depth[has_parent] = depth[tree.parent[has_parent]] + 1
    return depth


def _gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n)."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    shift = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return shift + np.arange(total)
