"""The search's feature lookups: bitmaps and row directories hold what the chunks hold, a
bundle stores them, and a lookup that could lead the search out of a chunk is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.builder import build
from models.errors import BundleError
from models.feature_lookup import FeatureLookup, build_row_directories
from models.predictor import Predictor
from tests.conftest import tiny_params


@pytest.fixture(scope="module")
def dir_bundle(tmp_path_factory, tiny_corpus):
    """A one-tree bundle without bitmaps: its chunks of some size get row directories."""
    train, _ = tiny_corpus
    out = tmp_path_factory.mktemp("lookup") / "dirs"
    return build(train, out, tiny_params(n_trees=1, bitmap_mb=0))


def copy_of(bundle, tmp_path):
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def test_feature_bitmaps_mark_each_chunks_features_and_count_the_rows_before(tiny_predictor):
    from models.feature_lookup import build_feature_bitmaps

    ens = tiny_predictor.ensemble
    n_features = tiny_predictor.n_features
    n_words = (n_features + 63) // 64
    off, bitmap = build_feature_bitmaps(ens.chunk_ptr, ens.chunk_feat, n_features,
                                        budget_bytes=1 << 30, min_rows=1)
    mapped = np.flatnonzero(off >= 0)
    # an ample budget maps every chunk that has a row
    assert sorted(mapped.tolist()) == np.flatnonzero(np.diff(ens.chunk_ptr) > 0).tolist()
    for node in mapped[:: max(1, len(mapped) // 50)]:
        r0, r1 = int(ens.chunk_ptr[node]), int(ens.chunk_ptr[node + 1])
        feats = np.asarray(ens.chunk_feat[r0:r1])
        words = bitmap[off[node] : off[node] + 2 * n_words].reshape(n_words, 2)
        has = [bool((int(words[f // 64, 0]) >> (f % 64)) & 1) for f in range(n_features)]
        assert has == [f in set(feats.tolist()) for f in range(n_features)]
        assert words[:, 1].tolist() == [int((feats < 64 * w).sum()) for w in range(n_words)]


def test_a_small_bitmap_budget_covers_the_top_layers_first(tiny_predictor):
    from models.feature_lookup import build_feature_bitmaps

    ens = tiny_predictor.ensemble
    per_chunk = 16 * ((tiny_predictor.n_features + 63) // 64)
    n_roots = ens.n_trees
    off, _ = build_feature_bitmaps(ens.chunk_ptr, ens.chunk_feat, tiny_predictor.n_features,
                                   budget_bytes=n_roots * per_chunk, min_rows=1)
    # every tree's root, not the first tree's whole top
    assert sorted(np.flatnonzero(off >= 0).tolist()) == sorted(ens.tree_root.tolist())


def test_row_directories_count_each_chunks_rows_below_each_range(tiny_predictor):
    ens = tiny_predictor.ensemble
    n_features = tiny_predictor.n_features
    n_rows = np.diff(ens.chunk_ptr)
    skip = np.zeros(len(n_rows), dtype=bool)
    skip[ens.tree_root] = True  # as if the roots had bitmaps
    off, rows = build_row_directories(ens.chunk_ptr, ens.chunk_feat, n_features, skip)
    from models.feature_lookup import DIR_MIN_ROWS, DIR_ROWS_PER_RANGE

    assert np.array_equal(off >= 0, (n_rows >= DIR_MIN_ROWS) & ~skip)
    assert (off >= 0).any()
    for node in np.flatnonzero(off >= 0):
        feats = np.asarray(ens.chunk_feat[ens.chunk_ptr[node] : ens.chunk_ptr[node + 1]])
        width = 1 << int(rows[off[node]])
        n_ranges = -(-n_features // width)
        # as many ranges as leave the chunk's rows a few to each, and no fewer
        assert n_ranges <= max(1, n_rows[node] // DIR_ROWS_PER_RANGE)
        assert width == 1 or -(-n_features // (width // 2)) > n_rows[node] // DIR_ROWS_PER_RANGE
        counts = rows[off[node] + 1 : off[node] + 2 + n_ranges]
        assert counts.tolist() == [int((feats < g * width).sum()) for g in range(n_ranges + 1)]


def test_stored_lookup_is_mapped_and_equals_the_one_built_from_the_trees(dir_bundle):
    p = Predictor.load(dir_bundle)
    assert isinstance(p.lookup.dir_rows, np.memmap)  # one copy shared by serving processes
    built = FeatureLookup.build(p.ensemble, p.n_features, 0)
    assert (p.lookup.dir_off >= 0).any()
    for name in ("bitmap_off", "bitmap_words", "dir_off", "dir_rows"):
        assert np.array_equal(getattr(p.lookup, name), getattr(built, name)), name
    assert p.manifest["build"]["lookup_bytes"] == built.nbytes


def test_a_bundle_without_row_directories_loads_and_answers_the_same(dir_bundle, tmp_path,
                                                                     tiny_corpus):
    """Bundles written before the directories were stored search without them."""
    _, test = tiny_corpus
    b = copy_of(dir_bundle, tmp_path)
    for f in b.glob("search.dir_*.npy"):
        f.unlink()
    old, new = Predictor.load(b), Predictor.load(dir_bundle)
    assert (old.lookup.dir_off == -1).all() and (new.lookup.dir_off >= 0).any()
    assert old.predict(test.texts[:40], top_k=5) == new.predict(test.texts[:40], top_k=5)


def assert_refused_after(bundle, corrupt, names, victim):
    """Rewrites the bundle's ``search.<name>.npy`` arrays through ``corrupt`` and expects
    the load refused with an error naming ``search.<victim>.npy``."""
    arrays = corrupt(*(np.load(bundle / f"search.{name}.npy") for name in names))
    for name, array in zip(names, arrays):
        np.save(bundle / f"search.{name}.npy", array)
    with pytest.raises(BundleError) as err:
        Predictor.load(bundle)
    assert f"search.{victim}.npy" in str(err.value)


def _shift_a_row_count(off, words, block):
    words[off[off >= 0][0] + 3] += 1  # the rows before the chunk's second word


def _clear_a_bit(off, words, block):
    first = off[off >= 0][0]
    w = first + 2 * int(np.flatnonzero(words[first : first + block : 2])[0])
    words[w] &= words[w] - np.uint64(1)  # one feature fewer than the chunk has rows


def _misalign_an_offset(off, words, block):
    off[np.flatnonzero(off >= 0)[0]] += 2


def _point_past_the_end(off, words, block):
    off[np.flatnonzero(off >= 0)[0]] = words.shape[0]


@pytest.mark.parametrize(("corrupt", "victim"), [
    (_shift_a_row_count, "words"), (_clear_a_bit, "words"), (_misalign_an_offset, "off"),
    (_point_past_the_end, "off")])
def test_bitmaps_that_could_lead_the_search_out_of_a_chunk_are_refused(tiny_bundle, tmp_path,
                                                                      corrupt, victim):
    b = copy_of(tiny_bundle, tmp_path)
    n_features = json.loads((b / "manifest.json").read_text())["n_features"]

    def corrupted(off, words):
        corrupt(off, words, 2 * ((n_features + 63) // 64))
        return off, words

    assert_refused_after(b, corrupted, ("bitmap_off", "bitmap_words"), f"bitmap_{victim}")


def _raise_an_entry(off, rows):
    first = off[off >= 0][0]
    rows[first + 2] = rows[first + 3] + 1  # more rows below a range than below the next
    return off, rows


def _widen_a_range(off, rows):
    rows[off[off >= 0][0]] += 1  # the shift no longer matches the directory's length
    return off, rows


def _shift_an_offset(off, rows):
    off[np.flatnonzero(off >= 0)[1]] += 1
    return off, rows


def _drop_the_last_row(off, rows):
    rows[-1] -= 1  # the last directory ends short of its chunk's rows
    return off, rows


def _empty_the_directories(off, rows):
    return off, rows[:0]


@pytest.mark.parametrize(("corrupt", "victim"), [
    (_raise_an_entry, "rows"), (_widen_a_range, "off"), (_shift_an_offset, "off"),
    (_drop_the_last_row, "rows"), (_empty_the_directories, "off")])
def test_directories_that_could_lead_the_search_out_of_a_chunk_are_refused(
        dir_bundle, tmp_path, corrupt, victim):
    assert_refused_after(copy_of(dir_bundle, tmp_path), corrupt, ("dir_off", "dir_rows"),
                         f"dir_{victim}")


def test_a_lone_directory_file_is_refused(dir_bundle, tmp_path):
    b = copy_of(dir_bundle, tmp_path)
    (b / "search.dir_rows.npy").unlink()
    with pytest.raises(BundleError) as err:
        Predictor.load(b)
    assert "search.dir_rows.npy" in str(err.value)
