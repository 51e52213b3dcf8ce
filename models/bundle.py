"""The bundle: a folder holding everything a predictor needs, and nothing executable.

::

    manifest.json            format_version, name, version, created_at, params, n_labels,
                             n_features, trees, encoders, metrics, n_train_docs
    labels.json              label names, in label-id order
    label_meta.json          optional: uri, label and notation per label (models.vocab)
    label_counts.npy         training documents per label (for PSP@k)
    ensemble.<name>.npy      the tree arrays of models.tree.ENSEMBLE_ARRAYS (format 3; bundles
                             of formats 1 and 2 are still read)
    search.bitmap_{off,words}.npy, search.dir_{off,rows}.npy
                             the search's feature lookup, bitmaps and row directories
                             (models.feature_lookup), mapped by every serving process; a
                             bundle without bitmaps (built before they were stored) gets
                             them built at load, per process; one without directories
                             (built before them) searches without
    <encoder files>          e.g. tfidf_vocab.json, tfidf_idf.npy, dense model + tokenizer
    calibration_{x,y}.npy    built with --calibrate: the knots of the score calibration
                             (models.calibration); the manifest then has "calibration", and
                             "threshold" when built with --tune-threshold
    knn.usearch              built with --knn (format 4): the usearch index of the training
    knn.label_{ptr,ids}.npy  documents' embeddings and their labels, CSR (models.knn); the
                             manifest then has "knn" (k, power, weight, centroid_weight,
                             bytes, sha256)
    knn.label_centroids.npy  (format 5) the labels' centroids, when centroid_weight is above 0
    knn.postings_{ptr,docs,values}.npy
                             (format 7) instead of knn.usearch, a kNN part over the feature
                             rows chosen by a default build: the training documents' unit
                             rows by feature (models.knn.PostingsIndex)

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
from functools import partial
from pathlib import Path
from typing import Any

import numba
import numpy as np

from models.errors import BundleError, InvalidInputError
from models.feature_lookup import LOOKUP_ARRAYS, FeatureLookup
from models.tree import (
    ENSEMBLE_ARRAYS,
    Ensemble,
    join_sizes,
    join_trees,
    row_marks,
    row_start,
)

FORMAT_VERSION = 3
#: the format of a bundle with a kNN part (models.knn): the trees' arrays are format 3's, but
#: a reader that knows no kNN must refuse it rather than serve the trees alone
KNN_FORMAT_VERSION = 4
#: the format of a bundle whose kNN part scores with label centroids: a reader of format 4
#: would load it and serve other scores without them
KNN_CENTROID_FORMAT_VERSION = 5
#: the format of a bundle with label profiles (models.profiles): a reader of an older format
#: would serve the trees' scores without them
PROFILE_FORMAT_VERSION = 6
#: the format of a bundle whose kNN part searches the feature rows in postings
#: (models.knn.PostingsIndex): a reader of format 6 knows only a usearch index
POSTINGS_FORMAT_VERSION = 7
#: a kNN part that lets only the labels of most votes into the pool (``max_voted_labels``):
#: an older reader would let them all in, and rank otherwise
CAPPED_POOL_FORMAT_VERSION = 8
#: versions this build reads: 1 lacks the dense-block arrays (its bundles have none); 1 and 2
#: store an int64 row pointer and float32 weights (see _load_old_ensemble)
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)
MANIFEST = "manifest.json"
#: files a bundle may have (label_meta.json: see models.vocab)
OPTIONAL_FILES = ("label_meta.json", *(f"search.{n}.npy" for n in LOOKUP_ARRAYS))


def format_version(*, knn: bool, centroids: bool, profiles: bool = False,
                   postings: bool = False, capped_pool: bool = False) -> int:
    """The format a new bundle is written in: the oldest that holds what it has."""
    if capped_pool:
        return CAPPED_POOL_FORMAT_VERSION
    if postings:
        return POSTINGS_FORMAT_VERSION
    if profiles:
        return PROFILE_FORMAT_VERSION
    if centroids:
        return KNN_CENTROID_FORMAT_VERSION
    return KNN_FORMAT_VERSION if knn else FORMAT_VERSION


def tmp_dir_for(out_dir: Path) -> Path:
    """A fresh sibling folder to write a bundle into before it is renamed into place."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


class ForestWriter:
    """Writes the ensemble tree by tree: each trained one-tree ensemble goes to scratch files
    (:meth:`add`), and :meth:`finish` joins them into the bundle's ``ensemble.*.npy`` files
    piece by piece (:func:`models.tree.join_trees`), so the forest is never in memory
    whole, nor copied."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.scratch = folder / "_trees"
        self.scratch.mkdir()
        self.sizes: list[dict[str, int]] = []
        self.dtypes: list[dict[str, np.dtype]] = []

    def add(self, tree: Ensemble) -> None:
        t = len(self.sizes)
        for name, arr in tree.arrays().items():
            np.save(self.scratch / f"{t}.{name}.npy", arr, allow_pickle=False)
        self.sizes.append({"n_nodes": tree.n_nodes, "n_rows": int(tree.chunk_feat.shape[0]),
                           "n_entries": tree.n_entries, "n_dense": int(tree.dense_val.shape[0]),
                           "n_labels": tree.n_labels})
        self.dtypes.append({k: v.dtype for k, v in tree.arrays().items()})

    def finish(self) -> Ensemble:
        """Writes the joined arrays, drops the scratch files; returns the forest, mapped."""
        if not self.sizes:
            raise InvalidInputError("no tree was added")
        shapes = join_sizes(self.sizes)
        files = {}
        for name, shape in shapes.items():
            dtype = np.result_type(*(d[name] for d in self.dtypes))
            fh = (self.folder / f"ensemble.{name}.npy").open("wb")
            np.lib.format.write_array_header_1_0(fh, {
                "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                "shape": shape})
            files[name] = (fh, dtype)
        try:
            trees = [partial(_scratch_arrays, self.scratch, t) for t in range(len(self.sizes))]
            for name, piece in join_trees(trees):
                fh, dtype = files[name]
                np.ascontiguousarray(piece, dtype=dtype).tofile(fh)
        finally:
            for fh, _ in files.values():
                fh.close()
        row_len = np.load(self.folder / "ensemble.row_len.npy", mmap_mode="r")
        np.save(self.folder / "ensemble.row_mark.npy", row_marks(row_len), allow_pickle=False)
        del row_len
        shutil.rmtree(self.scratch)
        return Ensemble(**{name: load_npy(self.folder / f"ensemble.{name}.npy", mmap=True)
                           for name in ENSEMBLE_ARRAYS})


class _ScratchTree(dict):
    """One scratch tree's arrays, each memory-mapped when first asked for."""

    def __init__(self, scratch: Path, t: int) -> None:
        super().__init__()
        self.scratch, self.t = scratch, t

    def __missing__(self, name: str) -> np.ndarray:
        arr = np.load(self.scratch / f"{self.t}.{name}.npy", mmap_mode="r")
        self[name] = arr
        return arr


def _scratch_arrays(scratch: Path, t: int) -> dict[str, np.ndarray]:
    return _ScratchTree(scratch, t)


def write_feature_lookup(folder: Path, lookup: FeatureLookup) -> None:
    for name in LOOKUP_ARRAYS:
        np.save(folder / f"search.{name}.npy", getattr(lookup, name), allow_pickle=False)


def load_feature_lookup(folder: Path, ensemble: Ensemble, n_features: int, *, mmap: bool,
                        bitmap_mb_if_absent: int) -> FeatureLookup:
    """The bundle's stored feature lookup, checked (see FeatureLookup.problem). A bundle
    written before the lookup was stored gets it built here, bitmaps within
    ``bitmap_mb_if_absent``; one written before the row directories searches without."""
    paths = {name: folder / f"search.{name}.npy" for name in LOOKUP_ARRAYS}
    if not any(p.is_file() for p in paths.values()):
        return FeatureLookup.build(ensemble, n_features, bitmap_mb_if_absent)
    has_dirs = paths["dir_off"].is_file() or paths["dir_rows"].is_file()
    arrays = {name: load_npy(path, mmap=mmap, dtype=LOOKUP_ARRAYS[name])
              for name, path in paths.items() if has_dirs or name.startswith("bitmap_")}
    lookup = (FeatureLookup(**arrays) if has_dirs
              else FeatureLookup.bitmaps_only(arrays["bitmap_off"], arrays["bitmap_words"]))
    found = lookup.problem(np.asarray(ensemble.chunk_ptr), n_features)
    if found is not None:
        raise BundleError(found[1], paths[found[0]])
    return lookup


def write_labels(folder: Path, label_names: list[str], label_counts: np.ndarray) -> None:
    np.save(folder / "label_counts.npy", label_counts.astype(np.int64), allow_pickle=False)
    (folder / "labels.json").write_text(json.dumps(label_names, ensure_ascii=False))


def content_hash(folder: Path, params: dict[str, Any], encoder_files: list[str]) -> str:
    """sha256 over every array, the label names, the parameters and ``encoder_files`` (the
    encoders' files and any other file a predictor reads, such as the calibration's)."""
    h = hashlib.sha256()
    names = sorted(f"ensemble.{n}.npy" for n in ENSEMBLE_ARRAYS)
    names += ["label_counts.npy", "labels.json", *sorted(encoder_files)]
    # optional files count only when present, so bundles without them keep their version
    names += [name for name in OPTIONAL_FILES if (folder / name).is_file()]
    for name in names:
        h.update(name.encode())
        _feed_file(h, folder / name)
    h.update(json.dumps(params, sort_keys=True).encode())
    return h.hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of one file (an encoder's model is ~90 MB: read in blocks, never whole)."""
    h = hashlib.sha256()
    _feed_file(h, Path(path))
    return h.hexdigest()


def verify_files(folder: Path, names: list[str], entry: dict, what: str) -> None:
    """Each of ``names`` exists in ``folder`` and matches the sha256 that the manifest
    ``entry`` (an encoder's, the kNN part's) records for it; else a BundleError naming the
    file. ``what`` names the part in the message."""
    hashes = entry.get("sha256") or {}
    for name in dict.fromkeys(names):
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{what} file is missing", path=path)
        expected = hashes.get(name)
        if expected is None:
            raise BundleError(f"{what} file has no sha256 in the manifest", path=path)
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"sha256 mismatch: manifest says {expected}, file is {actual}", path=path)


def _feed_file(h: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


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


def load_npy(path: Path, *, mmap: bool,
             dtype: type | tuple[type, ...] | None = None) -> np.ndarray:
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
    allowed = [np.dtype(d) for d in (dtype if isinstance(dtype, tuple) else (dtype,))]
    if dtype is not None and arr.dtype not in allowed:
        raise BundleError(
            f"dtype {arr.dtype} where {' or '.join(map(str, allowed))} is expected", path)
    return arr


def load_ensemble(folder: Path, manifest: dict[str, Any], *, mmap: bool) -> Ensemble:
    if manifest["format_version"] < 3:
        return _load_old_ensemble(folder, manifest, mmap=mmap)
    arrays = {name: load_npy(folder / f"ensemble.{name}.npy", mmap=mmap, dtype=dtypes)
              for name, dtypes in ENSEMBLE_ARRAYS.items()}
    ens = Ensemble(**arrays)
    _check_ensemble(folder, ens, int(manifest["n_labels"]), int(manifest["n_features"]))
    return ens


def _load_old_ensemble(folder: Path, manifest: dict[str, Any], *, mmap: bool) -> Ensemble:
    """Formats 1 and 2 stored an int64 ``row_ptr`` per row and float32 weights only (format
    1 also lacked the dense block): rebuilt in memory into today's layout."""
    arrays: dict[str, np.ndarray] = {}
    for name, dtypes in ENSEMBLE_ARRAYS.items():
        if name in ("row_len", "row_mark", "weight_scale"):
            continue
        if manifest["format_version"] == 1 and name.startswith("dense_"):
            continue
        arrays[name] = load_npy(folder / f"ensemble.{name}.npy", mmap=mmap, dtype=dtypes[-1]
                                if name == "entry_child" else dtypes[0])
    row_ptr = load_npy(folder / "ensemble.row_ptr.npy", mmap=mmap, dtype=np.int64)
    n_nodes = arrays["bias"].shape[0]
    if manifest["format_version"] == 1:
        arrays.update(dense_start=np.array([int(manifest["n_features"])], np.int64),
                      dense_ptr=np.zeros(n_nodes + 1, np.int64),
                      dense_val=np.empty(0, np.float32))
    if row_ptr.shape != (arrays["chunk_feat"].shape[0] + 1,) or (
            row_ptr.size and (row_ptr[0] != 0 or np.any(np.diff(row_ptr) < 0))):
        raise BundleError("pointers are not monotone within bounds",
                          folder / "ensemble.row_ptr.npy")
    arrays["row_len"] = np.diff(row_ptr)
    arrays["weight_scale"] = np.ones(n_nodes, np.float32)
    ens = Ensemble.from_arrays(arrays)
    _check_ensemble(folder, ens, int(manifest["n_labels"]), int(manifest["n_features"]))
    return ens


@numba.njit(cache=True)
def _first_bad_entry(chunk_ptr: np.ndarray, row_len: np.ndarray, entry_child: np.ndarray,
                     child_ptr: np.ndarray) -> int:
    """Index of the first entry whose child offset is outside its chunk's children, or -1;
    one pass, no temporaries."""
    e = 0
    for p in range(chunk_ptr.shape[0] - 1):
        n_children = child_ptr[p + 1] - child_ptr[p]
        for r in range(chunk_ptr[p], chunk_ptr[p + 1]):
            for _ in range(row_len[r]):
                if entry_child[e] < 0 or entry_child[e] >= n_children:
                    return e
                e += 1
    return -1


def _monotone(ptr: np.ndarray, end: int) -> bool:
    """ptr starts at >= 0, never decreases and ends at ``end``; checked in slices."""
    if not ptr.size:
        return True
    if ptr[0] < 0 or ptr[-1] != end:
        return False
    step = 1 << 22
    return all(not np.any(np.diff(np.asarray(ptr[s : s + step + 1])) < 0)
               for s in range(0, ptr.shape[0], step))


def _check_ensemble(folder: Path, ens: Ensemble, n_labels: int, n_features: int) -> None:
    """Bounds checks: the compiled search trusts these indices, so a bundle that breaks one
    must be refused here rather than read out of bounds later. Vectorized or compiled, and
    without an int64 copy of any per-row or per-entry array."""

    def fail(name: str, what: str) -> None:
        raise BundleError(what, folder / f"ensemble.{name}.npy")

    n_nodes, n_rows, n_entries = ens.n_nodes, ens.chunk_feat.shape[0], ens.n_entries
    for name in ("child_ptr", "chunk_ptr", "dense_ptr"):
        if getattr(ens, name).shape != (n_nodes + 1,):
            fail(name, "length does not match the node count")
    for name in ("parent", "node_label", "weight_scale"):
        if getattr(ens, name).shape != (n_nodes,):
            fail(name, "length does not match the node count")
    if ens.row_len.shape != (n_rows,):
        fail("row_len", "length does not match the chunk rows")
    if ens.entry_child.shape != (n_entries,):
        fail("entry_child", "length does not match entry_val")
    if ens.label_node.shape != (ens.n_trees, n_labels):
        fail("label_node", f"shape {ens.label_node.shape} is not (n_trees, {n_labels})")
    for name, end in (("child_ptr", n_nodes), ("chunk_ptr", n_rows)):
        if not _monotone(getattr(ens, name), end):
            fail(name, "pointers are not monotone within bounds")
    marks = row_marks(ens.row_len)
    if ens.row_mark.shape != marks.shape or not np.array_equal(ens.row_mark, marks) or (
            row_start(ens.row_len, ens.row_mark, n_rows) != n_entries):
        fail("row_mark", "does not match the row lengths and the entry count")
    if n_rows and (ens.chunk_feat.min() < 0 or ens.chunk_feat.max() >= n_features):
        fail("chunk_feat", "feature id out of range")
    if n_entries and _first_bad_entry(np.asarray(ens.chunk_ptr), np.asarray(ens.row_len),
                                      np.asarray(ens.entry_child),
                                      np.asarray(ens.child_ptr)) >= 0:
        fail("entry_child", "child offset out of range")
    if np.any((ens.parent < -1) | (ens.parent >= n_nodes)):
        fail("parent", "node id out of range")
    if ens.label_node.size and (ens.label_node.min() < 0 or ens.label_node.max() >= n_nodes):
        fail("label_node", "node id out of range")
    if np.any((ens.tree_root < 0) | (ens.tree_root >= n_nodes)):
        fail("tree_root", "node id out of range")
    leaves = np.asarray(ens.label_node).ravel()
    if np.any(ens.node_label[leaves] < 0) or np.any(ens.node_label >= n_labels):
        fail("node_label", "label ids do not match label_node")
    if ens.dense_start.shape != (1,) or not 0 <= int(ens.dense_start[0]) <= n_features:
        fail("dense_start", f"not one feature id within 0..{n_features}")
    dim = n_features - int(ens.dense_start[0])
    dense_len = np.diff(ens.dense_ptr)
    if (ens.dense_ptr[0] != 0 or ens.dense_ptr[-1] != ens.dense_val.shape[0]
            or np.any(dense_len < 0)):
        fail("dense_ptr", "pointers are not monotone within bounds")
    if np.any((dense_len != 0) & (dense_len != np.diff(ens.child_ptr) * dim)):
        fail("dense_ptr", "a dense block is not (children x dense features)")
