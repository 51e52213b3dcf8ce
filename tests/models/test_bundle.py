"""Bundle round trips, content hashing and refusal of bad bundles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import models
from models.builder import build
from models.errors import BundleError
from tests.conftest import tiny_params


def copy_bundle(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_load_with_and_without_mmap_gives_identical_scores(tiny_bundle, tiny_corpus):
    _, test = tiny_corpus
    a = models.load_bundle(tiny_bundle, mmap=True)
    b = models.load_bundle(tiny_bundle, mmap=False)
    assert isinstance(a.ensemble.entry_val, np.memmap)
    assert not isinstance(b.ensemble.entry_val, np.memmap)
    assert a.predict(test.texts[:50], top_k=5) == b.predict(test.texts[:50], top_k=5)


def test_manifest_holds_what_the_service_reports(tiny_predictor):
    m = tiny_predictor.manifest
    assert m["format_version"] == 3 and m["name"] == "tiny"
    assert len(m["version"]) == 16 and m["created_at"]
    assert m["n_labels"] == tiny_predictor.n_labels == len(tiny_predictor.label_names)
    assert [e["kind"] for e in m["encoders"]] == ["tfidf"]
    assert m["params"]["n_trees"] == 3 and len(m["trees"]) == 3
    assert m["metrics"] == {}


def test_same_seed_same_version_other_seed_other_version(tmp_path, tiny_corpus, tiny_bundle,
                                                         tiny_predictor):
    train, test = tiny_corpus
    again = models.load_bundle(build(train, tmp_path / "again", tiny_params(), name="other"))
    assert again.version == tiny_predictor.version  # name and created_at are not hashed
    assert again.predict(test.texts[:20]) == tiny_predictor.predict(test.texts[:20])
    other = models.load_bundle(build(train, tmp_path / "seed1", tiny_params(seed=1)))
    assert other.version != tiny_predictor.version


def test_existing_folder_is_refused_unless_forced(tmp_path, tiny_corpus):
    train, _ = tiny_corpus
    out = tmp_path / "b"
    build(train, out, tiny_params(n_trees=1))
    with pytest.raises(BundleError, match="--force"):
        build(train, out, tiny_params(n_trees=1))
    build(train, out, tiny_params(n_trees=1, seed=3), force=True)
    assert json.loads((out / "manifest.json").read_text())["params"]["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_wrong_format_version_is_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["format_version"] = 999
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version") as err:
        models.load_bundle(b)
    assert "manifest.json" in str(err.value)


def test_object_array_is_refused_without_unpickling(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    target = b / "ensemble.entry_val.npy"
    np.save(target, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BundleError) as err:
        models.load_bundle(b)
    assert "ensemble.entry_val.npy" in str(err.value)


@pytest.mark.parametrize("mmap", [True, False])
def test_truncated_array_is_refused(tiny_bundle, tmp_path, mmap):
    b = copy_bundle(tiny_bundle, tmp_path)
    target = b / "ensemble.row_len.npy"
    target.write_bytes(target.read_bytes()[:-40])
    with pytest.raises(BundleError) as err:
        models.load_bundle(b, mmap=mmap)
    assert "ensemble.row_len.npy" in str(err.value)


def test_out_of_range_index_is_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    target = b / "ensemble.chunk_feat.npy"
    arr = np.load(target)
    arr[0] = 10**8
    np.save(target, arr)
    with pytest.raises(BundleError, match="feature id out of range"):
        models.load_bundle(b)


@pytest.mark.parametrize("victim", ["manifest.json", "labels.json", "tfidf_vocab.json",
                                    "ensemble.bias.npy", "label_counts.npy"])
def test_missing_file_is_refused_naming_it(tiny_bundle, tmp_path, victim):
    b = copy_bundle(tiny_bundle, tmp_path)
    (b / victim).unlink()
    with pytest.raises(BundleError) as err:
        models.load_bundle(b)
    assert victim in str(err.value)


def test_missing_folder_and_garbled_manifest(tmp_path, tiny_bundle):
    with pytest.raises(BundleError, match="no such bundle"):
        models.load_bundle(tmp_path / "nope")
    b = copy_bundle(tiny_bundle, tmp_path)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest"):
        models.load_bundle(b)


def test_no_pickle_in_a_bundle(tiny_bundle):
    for f in tiny_bundle.iterdir():
        if f.suffix == ".npy":
            assert np.load(f, allow_pickle=False).dtype != object
        else:
            assert f.suffix == ".json", f


def as_old_format(b, version: int) -> None:
    """Rewrite a float32 bundle in place into the layout of format 1 or 2: an int64 row
    pointer, int32 child offsets, no scales (and, in format 1, no dense block)."""
    row_len = np.load(b / "ensemble.row_len.npy").astype(np.int64)
    np.save(b / "ensemble.row_ptr.npy", np.concatenate(([0], np.cumsum(row_len))))
    child = np.load(b / "ensemble.entry_child.npy")
    np.save(b / "ensemble.entry_child.npy", child.astype(np.int32))
    assert np.load(b / "ensemble.entry_val.npy").dtype == np.float32
    gone = ["row_len", "row_mark", "weight_scale"]
    if version == 1:
        gone += ["dense_start", "dense_ptr", "dense_val"]
    for name in gone:
        (b / f"ensemble.{name}.npy").unlink()
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["format_version"] = version
    (b / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_still_load(tiny_float32_bundle, tmp_path, version):
    b = copy_bundle(tiny_float32_bundle, tmp_path)
    as_old_format(b, version)
    old = models.load_bundle(b)
    texts = ["a first document", "another one about something"]
    want = models.load_bundle(tiny_float32_bundle).predict(texts, top_k=5)
    assert old.predict(texts, top_k=5) == want


def test_older_format_with_a_broken_row_pointer_is_refused(tiny_float32_bundle, tmp_path):
    b = copy_bundle(tiny_float32_bundle, tmp_path)
    as_old_format(b, 2)
    ptr = np.load(b / "ensemble.row_ptr.npy")
    ptr[len(ptr) // 2] = ptr[-1] + 5
    np.save(b / "ensemble.row_ptr.npy", ptr)
    with pytest.raises(BundleError) as err:
        models.load_bundle(b)
    assert "ensemble.row_ptr.npy" in str(err.value)


def test_dense_block_of_the_wrong_size_is_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    n_nodes = np.load(b / "ensemble.bias.npy").shape[0]
    ptr = np.zeros(n_nodes + 1, np.int64)
    ptr[1:] = 3  # node 0 claims a 3-float block where the bundle has no dense features
    np.save(b / "ensemble.dense_ptr.npy", ptr)
    np.save(b / "ensemble.dense_val.npy", np.zeros(3, np.float32))
    with pytest.raises(BundleError, match="dense block") as err:
        models.load_bundle(b)
    assert "ensemble.dense_ptr.npy" in str(err.value)


def test_stored_feature_bitmaps_are_mapped_and_equal_those_built_from_the_trees(tiny_bundle):
    from models.feature_lookup import FeatureLookup

    p = models.load_bundle(tiny_bundle, mmap=True)
    assert isinstance(p.lookup.bitmap_words, np.memmap)  # one copy shared by serving processes
    built = FeatureLookup.build(p.ensemble, p.n_features, p.manifest["params"]["bitmap_mb"])
    assert (p.lookup.bitmap_off >= 0).any()
    assert np.array_equal(p.lookup.bitmap_off, built.bitmap_off)
    assert np.array_equal(p.lookup.bitmap_words, built.bitmap_words)
    assert p.manifest["build"]["lookup_bytes"] == built.nbytes


def test_a_bundle_without_stored_bitmaps_builds_them_at_load(tiny_bundle, tmp_path):
    """Bundles written before the bitmaps were stored still load and answer the same."""
    b = copy_bundle(tiny_bundle, tmp_path)
    for f in b.glob("search.*.npy"):
        f.unlink()
    old, new = models.load_bundle(b), models.load_bundle(tiny_bundle)
    assert not isinstance(old.lookup.bitmap_words, np.memmap)
    assert np.array_equal(old.lookup.bitmap_off, new.lookup.bitmap_off)
    texts = ["a first document", "another one about something"]
    assert old.predict(texts, top_k=5) == new.predict(texts, top_k=5)


def test_bitmap_mb_zero_stores_none_and_answers_the_same(tmp_path, tiny_corpus):
    train, test = tiny_corpus
    lean = models.load_bundle(build(train, tmp_path / "lean", tiny_params(n_trees=1,
                                                                          bitmap_mb=0)))
    full = models.load_bundle(build(train, tmp_path / "full", tiny_params(n_trees=1)))
    assert lean.lookup.bitmap_words.size == 0 and (lean.lookup.bitmap_off == -1).all()
    assert (full.lookup.bitmap_off >= 0).any()
    assert lean.predict(test.texts[:30], top_k=5) == full.predict(test.texts[:30], top_k=5)
