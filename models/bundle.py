"""The bundle: a folder holding everything a predictor needs, and nothing executable.

::

    manifest.json            format_version, name, version, created_at, params, n_labels,
                             n_features, trees, encoders, metrics, n_train_docs
    labels.json              label names, in label-id order
    label_counts.npy         training documents per label (for PSP@k)
    ensemble.<name>.npy      the tree arrays of models.tree.ENSEMBLE_ARRAYS (format 2; format 1
                             bundles lack the dense-block arrays and are still read)
    <encoder files>          e.g. tfidf_vocab.json, tfidf_idf.npy, dense model + tokenizer

Arrays load with ``allow_pickle=False`` and, by default, ``mmap_mode="r"`` so that several
server processes share one copy. ``version`` is a content hash over arrays, label names,
parameters and encoder files, not over ``created_at`` or metrics: the same data, parameters
and seed give the same version. A bundle is written into a temporary folder and renamed into
place, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import BundleError
from models.tree import ENSEMBLE_ARRAYS, Ensemble

FORMAT_VERSION = 2
#: versions this build reads: 1 lacks the dense-block arrays (its bundles have none)
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"


def tmp_dir_for(out_dir: Path) -> Path:
    """A fresh sibling folder to write a bundle into before it is renamed into place."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def write_arrays(folder: Path, ensemble: Ensemble, label_names: list[str],
                 label_counts: np.ndarray) -> None:
    for name, arr in ensemble.arrays().items():
        np.save(folder / f"ensemble.{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
    np.save(folder / "label_counts.npy", label_counts.astype(np.int64), allow_pickle=False)
    (folder / "labels.json").write_text(json.dumps(label_names, ensure_ascii=False))


def content_hash(folder: Path, params: dict[str, Any], encoder_files: list[str]) -> str:
    """sha256 over every array, the label names, the parameters and the encoder files."""
    h = hashlib.sha256()
    names = sorted(f"ensemble.{n}.npy" for n in ENSEMBLE_ARRAYS)
    names += ["label_counts.npy", "labels.json", *sorted(encoder_files)]
    for name in names:
        h.update(name.encode())
        with (folder / name).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))


def finalize(tmp: Path, out_dir: Path, manifest: dict[str, Any], *, force: bool) -> None:
    """Write the manifest last, then move the folder into place (replacing with ``force``)."""
    write_manifest(tmp, manifest)
    old = None
    if out_dir.exists():
        if not force:
            raise BundleError("exists; pass --force to replace it", out_dir)
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path, what: str) -> Any:
    """A bundle's JSON file, every failure a BundleError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"missing {what}", path) from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"unreadable {what} ({exc})", path) from None


def read_label_names(folder: Path, n_labels: int) -> list[str]:
    path = folder / "labels.json"
    names = read_json(path, "label names")
    if not isinstance(names, list) or len(names) != n_labels:
        raise BundleError(f"expected a list of {n_labels} label names", path)
    return [str(n) for n in names]


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError("no such bundle folder", folder)
    manifest = read_json(path, "manifest")
    if not isinstance(manifest, dict):
        raise BundleError("manifest is not a JSON object", path)
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"format_version {version!r} is not supported (this build reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})", path)
    for key in ("name", "version", "n_labels", "n_features", "encoders", "params"):
        if key not in manifest:
            raise BundleError(f"manifest lacks {key!r}", path)
    return manifest


def load_npy(path: Path, *, mmap: bool, dtype: type | None = None) -> np.ndarray:
    """np.load that never unpickles and turns every failure into a BundleError."""
    if not path.is_file():
        raise BundleError("missing array file", path)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:  # object arrays, truncated or garbled files
        raise BundleError(f"corrupt or unsafe array ({exc})", path) from None
    except OSError as exc:
        raise BundleError(f"unreadable array ({exc})", path) from None
    if not isinstance(arr, np.ndarray):
        raise BundleError("not a single .npy array", path)
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise BundleError(f"dtype {arr.dtype} where {np.dtype(dtype)} is expected", path)
    return arr


def load_ensemble(folder: Path, manifest: dict[str, Any], *, mmap: bool) -> Ensemble:
    n_features = int(manifest["n_features"])
    absent = {}
    if manifest["format_version"] == 1:
        n_nodes = load_npy(folder / "ensemble.bias.npy", mmap=True).shape[0]
        absent = {"dense_start": np.array([n_features], np.int64),
                  "dense_ptr": np.zeros(n_nodes + 1, np.int64),
                  "dense_val": np.empty(0, np.float32)}
    arrays = {
        name: absent[name] if name in absent else
        load_npy(folder / f"ensemble.{name}.npy", mmap=mmap, dtype=dtype)
        for name, dtype in ENSEMBLE_ARRAYS.items()
    }
    ens = Ensemble(**arrays)
    _check_ensemble(folder, ens, int(manifest["n_labels"]), int(manifest["n_features"]))
    return ens


def _check_ensemble(folder: Path, ens: Ensemble, n_labels: int, n_features: int) -> None:
    """Bounds checks: the compiled search trusts these indices, so a bundle that breaks one
    must be refused here rather than read out of bounds later."""

    def fail(name: str, what: str) -> None:
        raise BundleError(what, folder / f"ensemble.{name}.npy")

    n_nodes, n_rows, n_entries = ens.n_nodes, ens.chunk_feat.shape[0], ens.entry_val.shape[0]
    if ens.child_ptr.shape != (n_nodes + 1,) or ens.chunk_ptr.shape != (n_nodes + 1,):
        fail("child_ptr", "length does not match the node count")
    if ens.row_ptr.shape != (n_rows + 1,):
        fail("row_ptr", "length does not match the chunk rows")
    if ens.entry_child.shape != (n_entries,):
        fail("entry_child", "length does not match entry_val")
    for name, n in (("parent", n_nodes), ("node_label", n_nodes)):
        if getattr(ens, name).shape != (n,):
            fail(name, "length does not match the node count")
    if ens.label_node.shape != (ens.n_trees, n_labels):
        fail("label_node", f"shape {ens.label_node.shape} is not (n_trees, {n_labels})")
    for name, ptr, end in (("child_ptr", ens.child_ptr, n_nodes),
                           ("chunk_ptr", ens.chunk_ptr, n_rows),
                           ("row_ptr", ens.row_ptr, n_entries)):
        if ptr.size and (ptr[0] < 0 or ptr[-1] != end or np.any(np.diff(ptr) < 0)):
            fail(name, "pointers are not monotone within bounds")
    if n_rows and (ens.chunk_feat.min() < 0 or ens.chunk_feat.max() >= n_features):
        fail("chunk_feat", "feature id out of range")
    n_children = np.diff(ens.child_ptr)
    if n_entries:
        owner = np.repeat(np.arange(n_nodes), np.diff(ens.chunk_ptr))
        row_owner = np.repeat(owner, np.diff(ens.row_ptr))
        if ens.entry_child.min() < 0 or np.any(ens.entry_child >= n_children[row_owner]):
            fail("entry_child", "child offset out of range")
    if np.any((ens.parent < -1) | (ens.parent >= n_nodes)):
        fail("parent", "node id out of range")
    if ens.label_node.size and (ens.label_node.min() < 0 or ens.label_node.max() >= n_nodes):
        fail("label_node", "node id out of range")
    if np.any((ens.tree_root < 0) | (ens.tree_root >= n_nodes)):
        fail("tree_root", "node id out of range")
    leaves = ens.label_node.ravel()
    if np.any(ens.node_label[leaves] < 0) or np.any(ens.node_label >= n_labels):
        fail("node_label", "label ids do not match label_node")
    if ens.dense_start.shape != (1,) or not 0 <= int(ens.dense_start[0]) <= n_features:
        fail("dense_start", f"not one feature id within 0..{n_features}")
    dim = n_features - int(ens.dense_start[0])
    dense_len = np.diff(ens.dense_ptr)
    if (ens.dense_ptr.shape != (n_nodes + 1,) or ens.dense_ptr[0] != 0
            or ens.dense_ptr[-1] != ens.dense_val.shape[0] or np.any(dense_len < 0)):
        fail("dense_ptr", "pointers are not monotone within bounds")
    if np.any((dense_len != 0) & (dense_len != n_children * dim)):
        fail("dense_ptr", "a dense block is not (children x dense features)")
