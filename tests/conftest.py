"""Session fixtures: one tiny synthetic corpus and one bundle built from it, for all tests."""

from __future__ import annotations

import os
from pathlib import Path

# The compiled kernels trust their indices; under test, numba checks every one of them (an
# out-of-bounds access raises IndexError instead of corrupting memory). Its own cache folder
# keeps these checked builds apart from the fast ones.
os.environ.setdefault("NUMBA_BOUNDSCHECK", "1")
os.environ.setdefault(
    "NUMBA_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".numba_cache" / "tests"))

import pytest

from models.data import Corpus
from models.params import BuildParams, ClusterParams

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

def tiny_params(**overrides) -> BuildParams:
    """Small enough to build in seconds, deep enough (3 layers, 3 trees) to exercise the
    beam; the trees alone (the label profiles and the kNN part over the features are tested
    in tests/models/test_profiles.py and tests/models/test_feature_knn.py);
    a fresh object each call, so a test may change it freely."""
    base = dict(n_trees=3, seed=0, cluster=ClusterParams(branching_factor=4, max_leaf_size=6),
                profile_weight_grid=[0.0], feature_knn_max_postings=0)
    return BuildParams(**{**base, **overrides})


def corpus_from_docs(docs: list[dict]) -> Corpus:
    return Corpus(labels=[d["labels"] for d in docs], texts=[d["text"] for d in docs],
                  ids=[d.get("id") for d in docs])


@pytest.fixture(scope="session")
def tiny_docs() -> tuple[list[dict], list[dict]]:
    from models.synth import SynthParams, generate

    return generate(SynthParams(n_labels=120, n_train=1500, n_test=200, seed=7,
                                mean_doc_words=40))


@pytest.fixture(scope="session")
def tiny_corpus(tiny_docs) -> tuple[Corpus, Corpus]:
    train, test = tiny_docs
    return corpus_from_docs(train), corpus_from_docs(test)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_corpus) -> Path:
    """Path of a 3-tree bundle built once per session from the tiny corpus."""
    from models.builder import build

    train, _ = tiny_corpus
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return build(train, out, tiny_params(), name="tiny")


@pytest.fixture(scope="session")
def tiny_float32_bundle(tmp_path_factory, tiny_corpus) -> Path:
    """The tiny bundle with its weights kept as float32 (the default quantizes them)."""
    from models.builder import build

    train, _ = tiny_corpus
    out = tmp_path_factory.mktemp("bundles") / "tiny-float32"
    return build(train, out, tiny_params(weight_dtype="float32"), name="tiny")


@pytest.fixture(scope="session")
def tiny_predictor(tiny_bundle):
    import models

    return models.load_bundle(tiny_bundle)


def redis_required() -> bool:
    """Under CI a missing Redis is a failure, elsewhere a skip."""
    return os.environ.get("CI", "").lower() == "true"
