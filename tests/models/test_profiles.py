"""Label profiles against a plain numpy oracle that shares no code with them (each label's
documents' feature rows summed, the cosine of a query with that sum, the trees' exhaustive
scores from tests.models.reference), and bundles built with them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

import models
from models.builder import build, profile_preference, standard_error_of_mean
from models.errors import BundleError, InvalidInputError
from models.explain import PROFILE_TERM
from models.params import BuildParams
from tests.conftest import tiny_params
from tests.models.reference import (
    assert_last_explanation_entry,
    assert_ranks_all_labels_as,
    assert_text_paths_agree,
    leaf_scores,
)

#: the profiles' weight in the bundle under test, high enough to move some first labels,
#: and their threshold, high enough to drop entries
W, T = 4.0, 0.05


def oracle_profiles(predictor, train, threshold: float = T) -> np.ndarray:
    """(n_labels, n_features): each label's training documents' feature rows summed, scaled
    to norm 1, the entries below ``threshold`` set to 0, scaled to norm 1 again."""
    X_train = predictor.encode(train.texts).toarray().astype(np.float64)
    index = {name: j for j, name in enumerate(predictor.label_names)}
    sums = np.zeros((predictor.n_labels, X_train.shape[1]))
    for row, labels in zip(X_train, train.labels):
        for lab in labels:
            sums[index[lab]] += row
    for j, row in enumerate(sums):
        if np.linalg.norm(row):
            row = row / np.linalg.norm(row)
            row[row < threshold] = 0
            sums[j] = row / np.linalg.norm(row)
    return sums


def oracle_cosines(predictor, train, X: sp.csr_matrix, threshold: float = T) -> np.ndarray:
    """(n_docs, n_labels): max(0, cos) of each row of X with each label's profile (0 for a
    zero row)."""
    profiles = oracle_profiles(predictor, train, threshold)
    queries = X.toarray().astype(np.float64)
    out = np.zeros((queries.shape[0], predictor.n_labels))
    for d, q in enumerate(queries):
        for j, p in enumerate(profiles):
            if np.linalg.norm(q) and np.linalg.norm(p):
                out[d, j] = max(0.0, q @ p / np.linalg.norm(q))
    return out


@pytest.fixture(scope="module")
def profile_bundle(tmp_path_factory, tiny_corpus):
    train, _ = tiny_corpus
    # one weight in the grid: the choice keeps it; the held-out threshold applies it too
    return build(train, tmp_path_factory.mktemp("prof") / "b",
                 tiny_params(profile_weight_grid=[W], profile_threshold_grid=[T],
                             profile_pool_size=4, tune_threshold=True))


def test_manifest_records_the_profiles(profile_bundle):
    m = json.loads((profile_bundle / "manifest.json").read_text())
    assert m["format_version"] == 6
    entry = m["profiles"]
    assert (entry["weight"], entry["pool_size"], entry["threshold"]) == (W, 4, T)
    assert entry["bytes"] == sum((profile_bundle / f).stat().st_size for f in entry["files"])
    sel = m["build"]["profile_selection"]
    assert sel["chosen"] == {"weight": W, "threshold": T}
    assert [(c["weight"], c["threshold"]) for c in sel["candidates"]] == [(W, T)]
    assert "rerank_choice" in m["build"]["stages"]
    assert "threshold" in m


def test_scores_match_the_oracle(profile_bundle, tiny_corpus):
    train, test = tiny_corpus
    predictor = models.load_bundle(profile_bundle)
    X = predictor.encode(test.texts[:30])
    trees = leaf_scores(predictor.ensemble, X, predictor.manifest["params"]["post_processor"])
    cos = oracle_cosines(predictor, train, X)
    assert cos.any()
    # the threshold dropped entries, and changed scores
    kept = np.count_nonzero(oracle_profiles(predictor, train))
    assert predictor.profiles.data.shape[0] == kept
    assert kept < np.count_nonzero(oracle_profiles(predictor, train, 0.0))
    assert not np.allclose(cos, oracle_cosines(predictor, train, X, threshold=0.0))
    want = (trees + W * cos) / (1 + W)
    n = predictor.n_labels
    assert_ranks_all_labels_as(predictor, X, want)  # every label in the pool
    # top 2 of a pool of 4: the best 2 of the trees' exact top 4 by the fused score, the
    # same first labels as a request for 4
    ids, scores, _ = predictor.predict_ids(X, top_k=2, beam_size=n)
    ids4, _, _ = predictor.predict_ids(X, top_k=4, beam_size=n)
    changed = 0
    for d in range(X.shape[0]):
        pool = sorted(range(n), key=lambda j: (-trees[d, j], j))[:4]
        best = sorted(pool, key=lambda j: (-want[d, j], j))[:2]
        assert ids[d].tolist() == best == ids4[d, :2].tolist()
        np.testing.assert_allclose(scores[d], want[d, best], atol=1e-5)
        changed += best[0] != pool[0]
    assert changed > 0  # the profiles re-ranked some first label


def test_text_single_batch_and_features_agree(profile_bundle, tiny_corpus):
    _, test = tiny_corpus
    assert_text_paths_agree(models.load_bundle(profile_bundle), test.texts[:12], top_k=3)


def test_explanations_name_the_profiles_share(profile_bundle, tiny_corpus):
    train, test = tiny_corpus
    predictor = models.load_bundle(profile_bundle)
    X = predictor.encode(test.texts[:8])
    assert_last_explanation_entry(predictor, X, PROFILE_TERM,
                                  W * oracle_cosines(predictor, train, X) / (1 + W))


def test_a_label_filter_still_holds(profile_bundle, tiny_corpus):
    _, test = tiny_corpus
    predictor = models.load_bundle(profile_bundle)
    allowed = predictor.label_names[::3]
    got = predictor.predict(test.texts[:20], top_k=3, label_filter={"include": allowed})
    assert all(lab in set(allowed) for row in got for lab, _ in row)


@pytest.mark.parametrize(("name", "change"), [
    ("profiles.indptr.npy", lambda a: a[:-1]),
    ("profiles.indices.npy", lambda a: a + 10**6),
    ("profiles.indices.npy", lambda a: a[::-1].copy()),
    ("profiles.data.npy", lambda a: a.astype(np.float64)),
])
def test_damaged_profiles_are_refused_naming_the_file(profile_bundle, tmp_path, name, change):
    copy = tmp_path / "copy"
    shutil.copytree(profile_bundle, copy)
    np.save(copy / name, change(np.load(copy / name)), allow_pickle=False)
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        models.load_bundle(copy)


def test_a_profiles_entry_without_its_weight_is_refused(profile_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(profile_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    del m["profiles"]["weight"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="weight"):
        models.load_bundle(copy)


def test_weight_zero_stores_no_profiles(tmp_path, tiny_corpus):
    train, _ = tiny_corpus
    # a weight too small to move a label ties with 0, and the tie goes to 0
    out = build(train, tmp_path / "b", tiny_params(profile_weight_grid=[1e-9, 0.0]))
    m = json.loads((out / "manifest.json").read_text())
    sel = m["build"]["profile_selection"]
    assert [(c["weight"], c["threshold"]) for c in sel["candidates"]] == [
        (0.0, 0.0), (1e-9, 0.01), (1e-9, 0.02), (1e-9, 0.05)]
    assert len({(c["P@1"], c["P@5"]) for c in sel["candidates"]}) == 1
    assert sel["chosen"] == {"weight": 0.0, "threshold": 0.0}
    assert "profiles" not in m and m["format_version"] == 3
    assert not list(out.glob("profiles.*"))
    # only 0 in the grid: no choice at all
    out = build(train, tmp_path / "c", tiny_params(profile_weight_grid=[0.0]))
    m = json.loads((out / "manifest.json").read_text())
    assert "profiles" not in m and "rerank_choice" not in m["build"]["stages"]


def test_a_gain_within_one_standard_error_keeps_the_trees_alone(tmp_path, tiny_corpus):
    train, _ = tiny_corpus
    out = build(train, tmp_path / "b", tiny_params(profile_weight_grid=[0.0, 1e6]))
    sel = json.loads((out / "manifest.json").read_text())["build"]["profile_selection"]
    alone, best = sel["candidates"][0], max(sel["candidates"], key=profile_preference)
    assert alone["weight"] == 0 and best["weight"] == 1e6
    gain = (best["P@1"] + best["P@5"] - alone["P@1"] - alone["P@5"]) / 2
    assert sel["gain"] == pytest.approx(gain, abs=1e-5)
    assert sel["chosen"]["weight"] == (best["weight"] if gain > sel["standard_error"] else 0)
    # the rule's figure: sd / sqrt(n), by hand
    values = np.array([0.0, 1.0, 0.5, 0.5])
    assert standard_error_of_mean(values) == pytest.approx(
        np.sqrt(((values - 0.5) ** 2).sum() / 3) / 2)
    assert standard_error_of_mean(np.array([0.3])) == 0.0


def test_the_choice_prefers_the_score_then_the_smaller_weight_and_profiles():
    cands = [{"weight": 2.0, "threshold": 0.01, "P@1": 0.5, "P@5": 0.3},
             {"weight": 1.0, "threshold": 0.01, "P@1": 0.5, "P@5": 0.3},
             {"weight": 1.0, "threshold": 0.05, "P@1": 0.5, "P@5": 0.3},
             {"weight": 8.0, "threshold": 0.01, "P@1": 0.4, "P@5": 0.3}]
    assert max(cands, key=profile_preference) == cands[2]
    cands.append({"weight": 8.0, "threshold": 0.01, "P@1": 0.51, "P@5": 0.3})
    assert max(cands, key=profile_preference) == cands[-1]


@pytest.mark.parametrize("bad", [{"profile_weight_grid": []},
                                 {"profile_weight_grid": [0.0, -1.0]},
                                 {"profile_threshold_grid": []},
                                 {"profile_threshold_grid": [1.0]},
                                 {"profile_fit_share": 0.0},
                                 {"profile_fit_share": 0.9},  # more than outside the split
                                 {"profile_pool_size": 0}])
def test_bad_profile_parameters_are_refused(bad):
    with pytest.raises(InvalidInputError, match="profile"):
        BuildParams(**bad).validate()
