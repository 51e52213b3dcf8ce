"""Label filters in the beam search, against brute force: the exhaustive reference scores of
tests/models/reference.py (no code shared with the kernel), then a plain-Python filter of the
label names, then top-k."""

from __future__ import annotations

import numpy as np
import pytest

from models.errors import InvalidInputError, UnknownLabelError
from models.filters import FilterCompiler, LabelFilter, normalize
from tests.models.reference import leaf_scores, tree_leaf_scores


def matches(name: str, entries) -> bool:
    return any(name.startswith(e[:-1]) if e.endswith("*") else name == e for e in entries)


def brute_allowed(names: list[str], filters: list[dict]) -> np.ndarray:
    """The labels every filter allows, by testing each name against each entry."""
    ok = np.ones(len(names), dtype=bool)
    for f in filters:
        for i, name in enumerate(names):
            if "include" in f and not matches(name, f["include"]):
                ok[i] = False
            if matches(name, f.get("exclude", [])):
                ok[i] = False
    return ok


@pytest.fixture(scope="module")
def docs(tiny_predictor, tiny_corpus):
    _, test = tiny_corpus
    texts = [*test.texts[:30], "", "qqqq zzzz unknownword"]
    X = tiny_predictor.encode(texts)
    ref = leaf_scores(tiny_predictor.ensemble, X, tiny_predictor.manifest["params"][
        "post_processor"])
    return texts, X, ref


def some_labels(predictor, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [predictor.label_names[i] for i in rng.choice(predictor.n_labels, n, replace=False)]


def filter_cases(predictor) -> dict[str, list[dict]]:
    return {
        "include_10": [{"include": some_labels(predictor, 10, 1)}],
        "include_3": [{"include": some_labels(predictor, 3, 2)}],
        "prefix": [{"include": ["t0/*", "t2/s0*"]}],
        "exclude_prefix": [{"exclude": ["t4/*"]}],
        "exclude_wins": [{"include": ["t0/*", "t1/*"], "exclude": ["t0/s00/*",
                                                                  "t1/s00/l030"]}],
        "config_and_request": [{"include": ["t4/*"], "exclude": ["t4/s00/*"]},
                               {"include": ["t4/s08/*", "t0/*"], "exclude": ["t4/s08/l115"]}],
    }


def test_label_mask_matches_brute_force(tiny_predictor):
    names = tiny_predictor.label_names
    for case, filters in filter_cases(tiny_predictor).items():
        got = tiny_predictor.allowed_labels(filters)
        want = brute_allowed(names, filters)
        assert np.array_equal(got, want), case
        assert 0 < want.sum() < len(names), case  # each case really filters


def test_node_mask_is_nodes_with_an_allowed_label_below(tiny_predictor):
    ens = tiny_predictor.ensemble
    allowed = brute_allowed(tiny_predictor.label_names, [{"include": ["t1/*", "t3/*"]}])
    mask = FilterCompiler(tiny_predictor.label_names, ens).node_mask(
        {"include": ["t1/*", "t3/*"]})

    def below(node: int) -> set[int]:  # walks down, where the compiler walks up
        lo, hi = int(ens.child_ptr[node]), int(ens.child_ptr[node + 1])
        if lo == hi:
            return {int(ens.node_label[node])}
        return set().union(*(below(c) for c in range(lo, hi)))

    for node in range(ens.n_nodes):
        assert mask[node] == any(allowed[lab] for lab in below(node)), node


def test_tree_wide_beam_all_labels_equals_brute_force(tiny_predictor, docs):
    texts, _, ref = docs
    n = tiny_predictor.n_labels
    index = {name: i for i, name in enumerate(tiny_predictor.label_names)}
    for case, filters in filter_cases(tiny_predictor).items():
        allowed = brute_allowed(tiny_predictor.label_names, filters)
        got = tiny_predictor.predict(texts, top_k=n, beam_size=n, label_filter=filters)
        for d, row in enumerate(got):
            assert {index[name] for name, _ in row} == set(np.flatnonzero(allowed)), case
            assert np.allclose([s for _, s in row], np.sort(ref[d, allowed])[::-1],
                               atol=1e-6), case
            assert np.allclose([ref[d, index[name]] for name, _ in row],
                               [s for _, s in row], atol=1e-6), case


@pytest.mark.parametrize("top_k", [1, 5, 12])
def test_tree_wide_beam_top_k_equals_brute_force(tiny_predictor, docs, top_k):
    """The documented merge, done by brute force: per tree the top_k allowed labels by
    their path score in that tree, their union ranked by the mean over trees."""
    texts, X, ref = docs
    per_tree = tree_leaf_scores(tiny_predictor.ensemble, X,
                                tiny_predictor.manifest["params"]["post_processor"])
    n = tiny_predictor.n_labels
    index = {name: i for i, name in enumerate(tiny_predictor.label_names)}
    for case, filters in filter_cases(tiny_predictor).items():
        allowed = np.flatnonzero(brute_allowed(tiny_predictor.label_names, filters))
        got = tiny_predictor.predict(texts, top_k=top_k, beam_size=n, label_filter=filters)
        for d, row in enumerate(got):
            union = set()
            for t in range(per_tree.shape[1]):
                best = sorted(allowed, key=lambda lab: -per_tree[d, t, lab])[:top_k]
                union.update(int(lab) for lab in best)
            want = sorted(union, key=lambda lab: -ref[d, lab])[:top_k]
            assert np.allclose([s for _, s in row], ref[d, want], atol=1e-6), case
            ids = [index[name] for name, _ in row]
            assert np.allclose(ref[d, ids], [s for _, s in row], atol=1e-6), case
            assert set(ids) <= set(allowed.tolist()), case


@pytest.mark.parametrize("beam_size", [5, 10])
def test_default_beam_fills_k_with_allowed_labels(tiny_predictor, docs, beam_size):
    texts, _, ref = docs
    index = {name: i for i, name in enumerate(tiny_predictor.label_names)}
    k = 5
    for case, filters in filter_cases(tiny_predictor).items():
        allowed = brute_allowed(tiny_predictor.label_names, filters)
        got = tiny_predictor.predict(texts, top_k=k, beam_size=beam_size,
                                     label_filter=filters)
        for d, row in enumerate(got):
            ids = [index[name] for name, _ in row]
            assert all(allowed[ids]), case
            # the scores stay the exact ensemble scores
            assert np.allclose(ref[d, ids], [s for _, s in row], atol=1e-6), case
            if (allowed & (ref[d] > 0)).sum() >= k:
                assert len(row) == k, (case, d)
            else:
                assert len(row) == allowed.sum(), (case, d)


def test_rare_filter_still_returns_k(tiny_predictor, docs):
    # 6 of 120 labels (5 %): an unfiltered beam of 10 then a post-filter would mostly miss
    texts = docs[0]
    include = some_labels(tiny_predictor, 6, 3)
    got = tiny_predictor.predict(texts, top_k=5, label_filter={"include": include})
    assert all(len(row) == 5 for row in got)
    post = [[lab for lab, _ in row if lab in include]
            for row in tiny_predictor.predict(texts, top_k=5)]
    assert sum(len(r) for r in post) < sum(len(r) for r in got)


def test_open_filters_change_nothing(tiny_predictor, docs):
    texts = docs[0]
    plain = tiny_predictor.predict(texts, top_k=5, beam_size=3)
    for spec in (None, {}, {"include": ["*"]}, {"exclude": []}, [{}, {"include": ["*"]}]):
        assert tiny_predictor.predict(texts, top_k=5, beam_size=3, label_filter=spec) == plain


def test_nothing_allowed_returns_no_labels(tiny_predictor, docs):
    texts, X, _ = docs
    for spec in ({"include": ["nosuchprefix/*"]}, {"include": []},
                 {"include": ["t0/*"], "exclude": ["t0*"]}, {"exclude": ["*"]}):
        assert tiny_predictor.predict(texts, top_k=5, label_filter=spec) == [[]] * len(texts)
        assert tiny_predictor.predict_features(X, top_k=5, label_filter=spec) == [[]] * len(
            texts)


def test_unknown_exact_name_is_an_error_naming_it(tiny_predictor):
    with pytest.raises(UnknownLabelError, match="t0/s00/l999") as err:
        tiny_predictor.predict(["text"], label_filter={"include": ["t0/s00/l000",
                                                                   "t0/s00/l999"]})
    assert err.value.labels == ["t0/s00/l999"]
    with pytest.raises(UnknownLabelError) as err:
        tiny_predictor.predict(["text"], label_filter={"exclude": ["nope", "t0/*", "nix"]})
    assert err.value.labels == ["nix", "nope"]
    assert isinstance(err.value, InvalidInputError)  # the service's 422


@pytest.mark.parametrize("spec", [
    {"include": "t0/*"}, {"include": [3]}, {"include": [""]}, {"exlude": ["a"]}, "t0/*",
    [["t0/*"]],
])
def test_malformed_filters_are_refused(tiny_predictor, spec):
    with pytest.raises(InvalidInputError):
        tiny_predictor.predict(["text"], label_filter=spec)


def test_prefix_ranges_at_the_edges():
    names = ["a", "ab", "ab\U0010ffff", "ab\U0010ffffz", "abc", "b", "ba", "\U0010ffff"]
    ens_free = FilterCompiler.__new__(FilterCompiler)  # the label side needs no ensemble
    FilterCompiler.__init__(ens_free, names, None)  # type: ignore[arg-type]
    for entry in ("a*", "ab*", "ab\U0010ffff*", "b*", "\U0010ffff*", "*", "c*", "abd*"):
        want = brute_allowed(names, [{"include": [entry]}])
        assert np.array_equal(ens_free.label_mask({"include": [entry]}), want), entry


def test_equivalent_filters_share_one_compiled_mask(tiny_predictor):
    comp = FilterCompiler(tiny_predictor.label_names, tiny_predictor.ensemble, cache_size=2)
    a = comp.node_mask({"include": ["t1/*", "t0/*", "t1/*"]})
    assert comp.node_mask(LabelFilter.of(["t0/*", "t1/*"])) is a
    assert not a.flags.writeable
    comp.node_mask({"include": ["t2/*"]})
    comp.node_mask({"include": ["t3/*"]})  # evicts the t0/t1 mask (least recently used)
    assert comp.node_mask({"include": ["t0/*", "t1/*"]}) is not a
    assert normalize([{"include": ["b", "a", "a"]}, {}]) == (LabelFilter(("a", "b"), ()),)


def test_a_filter_as_given_is_cached_apart_from_its_meaning(tiny_predictor):
    comp = FilterCompiler(tiny_predictor.label_names, tiny_predictor.ensemble)
    a = comp.node_mask({"include": ["t1/*", "t0/*"]})
    assert comp.node_mask({"include": ["t1/*", "t0/*"]}) is a  # as given
    assert comp.node_mask({"include": ("t0/*", "t1/*", "t0/*")}) is a  # same meaning
    assert comp.node_mask([{"include": ["t0/*", "t1/*"]}, {}]) is a
    # what only normalizing can refuse is refused on every call, never served from the cache
    for bad in ({"include": ["t0/*", 3]}, {"include": "t0/*"}, {"include": ["t0/*"], "x": 1}):
        for _ in range(2):
            with pytest.raises(InvalidInputError):
                comp.node_mask(bad)
    for _ in range(2):
        with pytest.raises(UnknownLabelError):
            comp.node_mask({"include": ["t0/*", "nope"]})
