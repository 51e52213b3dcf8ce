"""Build parameters: nested dataclasses that print their defaults as JSON and read them back.

``xmc build --print-default-params > params.json`` gives a file to edit; ``--params`` reads it
back, and CLI flags override what it says. Unknown keys are refused, so a typo never passes
silently.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from models.errors import InvalidInputError
from models.search import BITMAP_MB
from models.tree import WEIGHT_DTYPES


@dataclass
class ClusterParams:
    """How labels are organised into trees."""

    branching_factor: int = 16
    """Children per internal node (a power of two: the tree is cut from balanced binary
    splits, log2(branching_factor) binary levels per tree layer)."""
    max_leaf_size: int = 100
    """Most labels under one bottom cluster. A value >= the number of labels gives the
    one-level (one-vs-all) model the literature compares against."""
    round_depth: bool = False
    """True: split on to whole layers of ``branching_factor`` (bottom clusters of
    max_leaf_size / branching_factor .. max_leaf_size labels, as PECOS). False: only as far
    as max_leaf_size needs (bottom clusters of max_leaf_size / 2 .. max_leaf_size labels),
    the splits left over widening the root's layer: a shallower tree."""
    max_root_children: int = 0
    """With ``round_depth`` False: the splits left over widen the root only while it keeps at
    most this many children, else the tree keeps one layer more under a narrow root (0: no
    cap). Every document trains every root classifier, so at scale a wide root dominates the
    training time (see the scale section of benchmarks/RESULTS.md)."""
    kmeans_max_iter: int = 20
    """Iterations of spherical 2-means per split (it stops earlier when assignments settle)."""


@dataclass
class RankerParams:
    """The linear one-vs-rest classifier trained at every node."""

    loss: str = "squared_hinge"
    """``squared_hinge`` (L2-regularized L2-loss SVM, dual coordinate descent)."""
    C: float = 1.0
    """Inverse regularization strength."""
    max_iter: int = 100
    """Passes of dual coordinate descent per node classifier."""
    eps: float = 0.3
    """Stopping tolerance on the projected-gradient gap (liblinear's rule; liblinear and PECOS
    use 0.1). Chosen on validation: 0.3 scores the same on every set, TF-IDF and fused,
    and stops the solver passes earlier (benchmarks/RESULTS.md, "Default tree shape")."""
    bias: float = 1.0
    """Value of the constant feature appended to every document (0 disables the bias)."""
    weight_threshold: float = 0.1
    """Weights with |w| below this are pruned after training; it trades model size and
    speed against accuracy."""
    negatives: str = "auto"
    """Negative documents of a node's classifier: ``tfn`` (teacher-forced: the documents of
    its parent), ``tfn+man`` (plus the documents the layers above, as trained so far, bring
    to its parent in their beam: matcher-aware hard negatives; 2-3x the training time) or
    ``auto``: ``tfn+man`` when a dense encoder is fused in (validated: +1.5 P@1 on cooking),
    ``tfn`` for TF-IDF alone (mixed there: +0.8, +0.8, -0.6 P@1 on three data sets)."""
    negative_beam_size: int = 16
    """Beam width of the matcher that mines the hard negatives (``tfn+man`` only)."""


@dataclass
class BuildParams:
    """Everything ``xmc build`` needs besides the data."""

    tfidf: Any = None
    """TF-IDF encoder settings (models.tfidf.TfidfParams); ignored for feature input."""
    cluster: ClusterParams = field(default_factory=ClusterParams)
    ranker: RankerParams = field(default_factory=RankerParams)
    n_trees: int = 3
    """Trees in the ensemble, each clustered with its own seed; their scores are averaged."""
    seed: int = 0
    """Seed of the first tree (tree t uses seed + t); same seed, same data: same bundle."""
    post_processor: str = "l3-hinge-ordered"
    """Turns a node's margin z into a score in (0, 1]: ``l3-hinge`` exp(-max(0, 1 - z)^3)
    (PECOS's), ``l3-hinge-ordered`` the same times exp(-s) below the hinge and rising from
    there towards 1 past it, exp(-s exp(1 - z)) with s = :data:`models.search.TIE_SPAN`, so
    that margins past the hinge still rank by margin instead of tying at 1 (chosen on
    validation: never worse, see benchmarks/RESULTS.md), or ``sigmoid`` 1 / (1 + exp(-z));
    a label's path score is the product along its path."""
    beam_size: int = 10
    """Default beam width at prediction time (a per-call argument overrides it)."""
    top_k: int = 5
    """Default number of labels returned (a per-call argument overrides it)."""
    threads: int = 0
    """Training threads; 0 means all cores."""
    dense_encoder: str | None = None
    """``minilm`` (the packaged all-MiniLM-L6-v2, exported to ONNX at build time),
    ``minilm-static`` (the same distilled into static token embeddings by model2vec at build
    time: served by a tokenizer and a lookup, see models.dense.StaticTextEncoder) or a path
    to an ONNX sentence encoder with ``tokenizer.json`` beside it; None for TF-IDF only."""
    static_max_length: int = 64
    """Tokens of a document, from its start, whose rows the static encoder
    (``minilm-static``) averages. Chosen on validation splits of reuters' articles, whose
    first lines carry the topic: 64 scored about 0.4 P@1 above 512 there, fused (titles are
    shorter anyway; benchmarks/RESULTS.md)."""
    dense_weight: float | str = "auto"
    """alpha in features = [tfidf ; alpha * dense], rows l2-normalized; ``auto`` picks it
    from ``dense_weight_grid`` by P@1 on a validation split carved from the training set
    (the test set is never read). A choice of 0 builds a TF-IDF-only bundle."""
    dense_weight_grid: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 3.0])
    """Candidate alphas for ``dense_weight = "auto"`` (0 is TF-IDF alone); each is trained
    with one tree on the rest of the training set."""
    validation_share: float = 0.15
    """Share of the training documents held out to choose ``dense_weight``, and to tune the
    threshold and fit the calibration."""
    tune_threshold: bool = False
    """Tune a global score threshold: a model trained (with these parameters) on train less
    the validation share predicts the held-out documents (``top_k``, ``beam_size``), the
    threshold maximizing micro-F1 there goes into the manifest (with its F1, precision and
    recall), then the bundle is trained on all of train. Requests use it with
    ``threshold="auto"``. Off by default: the held-out model about doubles the build time."""
    calibrate: bool = False
    """Fit an isotonic map from the ensemble score to the probability that the label is
    right, on the same held-out predictions, and apply it to every returned score."""
    fine_tune_epochs: float = 0.0
    """Fine-tune the packaged MiniLM (``dense_encoder = "minilm"``) on the training labels
    for this many passes before it embeds anything (:mod:`models.finetune`); 0 keeps it as
    packaged. It learns from the documents outside the validation split only, so that the
    dense weight, the kNN rule and the tuned threshold are chosen on documents it never
    saw."""
    int8: bool = False
    """Quantize the dense encoder to int8 (dynamic, per-channel)."""
    weight_dtype: str = "int8"
    """How the trees' sparse weights are stored: ``int8`` or ``int16`` with one float32 scale
    per classifier (its largest weight maps to the type's largest value), or ``float32``. The
    dense encoder's block of weights stays float32. int8, the smallest, scored within 0.1
    validation P@1 of float32 wherever it was measured (benchmarks/RESULTS.md)."""
    bitmap_mb: int = BITMAP_MB
    """Memory for the search's feature bitmaps, stored in the bundle so that every serving
    process maps one copy (models.feature_lookup): the chunks of the top layers get
    them first, as every document searches those. 0 stores none."""

    knn: bool = False
    """Add the kNN matcher (:mod:`models.knn`): the training documents nearest a query, by
    cosine similarity of the dense block (the dense encoder's embedding) in a usearch index,
    or of the sparse block (TF-IDF) in an inverted index (``knn_indexes``), vote for their
    labels, and the votes join the trees' scores as ``(1 - w) * tree + w * knn``. Needs a
    dense block: ``dense_encoder`` (then alpha 0 is no candidate of ``dense_weight_grid``)
    or feature input that declares one. The index, ``w``, the neighbours and the vote
    exponent are chosen on the validation split (``validation_share``) by (P@1 + P@5) / 2
    (:func:`models.builder.knn_preference`); a choice of ``w = 0`` builds no kNN part."""
    knn_indexes: list[str] = field(default_factory=lambda: ["usearch", "postings"])
    """The indexes ``knn`` chooses from: ``usearch`` over the dense block (with the label
    centroids), ``postings`` over the sparse block (at each threshold of
    ``feature_knn_threshold_grid`` whose queries read at most ``feature_knn_max_postings``
    postings)."""
    knn_k_grid: list[int] = field(default_factory=lambda: [10, 30, 50])
    """Candidate numbers of neighbours that vote."""
    knn_power_grid: list[float] = field(default_factory=lambda: [1.0, 4.0])
    """Candidate vote exponents: a neighbour at similarity s votes with s ** power (0: one
    vote each)."""
    knn_weight_grid: list[float] = field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    """Candidate weights w of the kNN votes (0: the trees alone)."""
    knn_centroid_weight_grid: list[float] = field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3])
    """Candidate weights of the label centroids (:mod:`models.knn`), chosen with the kNN
    rule; 0: none."""
    knn_max_voted_labels: int = 10
    """Of the labels a kNN part's neighbours vote for that the trees did not return, at most
    this many join the candidate pool, those of most votes (0: all). Each costs the trees'
    exact score of it, most of a request's kNN time; a label of few votes rarely gains a
    place in the top k."""
    feature_knn_max_postings: int = 100_000
    """In a bundle without a dense block, a kNN part over the feature rows (the training
    documents' TF-IDF or given rows, by cosine, in an exact inverted index:
    :class:`models.knn.PostingsIndex`) is a candidate of the build's choice, with the
    ``knn_k_grid``, ``knn_power_grid`` and ``knn_weight_grid`` rules, when a query reads on
    average at most this many postings (each feature's documents: a request's added work,
    which grows with the training documents); its rule is picked on the validation split
    and kept only when, each half of the split picking a rule for the other, the gain over
    the trees alone exceeds one standard error (:class:`models.builder.Halves`). 0: never."""
    feature_knn_threshold_grid: list[float] = field(
        default_factory=lambda: [0.0, 0.05, 0.1])
    """Candidate thresholds of that kNN part's index, chosen with its rule: each document
    keeps only its unit row's entries of at least this much (:class:`models.knn.
    PostingsIndex`), so a query skips the long postings of the words every document
    holds; a threshold whose index a query reads more than ``feature_knn_max_postings``
    postings of is not a candidate."""
    profile_weight_grid: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0])
    """Candidate weights of the label profiles (:mod:`models.profiles`) in a bundle without a
    dense block: each label's documents' feature rows summed, whose cosine with the query
    re-ranks the trees' top ``profile_pool_size`` labels. The weight and the threshold are
    chosen by (P@1 + P@5) / 2 on the validation split (``validation_share``; one tree
    trained on the rest, :func:`models.builder.choose_reranking`) and kept only when the gain
    over the trees alone exceeds one standard error; a choice of 0, or a grid of only 0,
    stores no profiles (and a grid of only 0 trains no validation tree)."""
    profile_threshold_grid: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05])
    """Candidate thresholds below which a profile's entries (of a unit vector) are dropped:
    at most 1 / threshold ** 2 entries a label."""
    profile_fit_share: float = 0.5
    """Share of the training documents (from outside the validation split) that the
    choice of the kNN part over the features and of the profiles trains its tree, indexes
    and builds its profiles on: its copy of those documents' features and its tree's
    working set grow with it, and 0.5 keeps them under the memory the bundle's own training
    takes (benchmarks/RESULTS.md, "Round four")."""
    profile_pool_size: int = 5
    """How many of the trees' top labels the profiles re-rank (at least ``top_k`` of a
    request)."""

    def __post_init__(self) -> None:
        if self.tfidf is None:
            from models.tfidf import TfidfParams

            self.tfidf = TfidfParams()

    def validate(self) -> None:
        c = self.cluster
        if c.branching_factor < 2 or c.branching_factor & (c.branching_factor - 1):
            raise InvalidInputError("cluster.branching_factor must be a power of two >= 2")
        if c.max_leaf_size < 1:
            raise InvalidInputError("cluster.max_leaf_size must be >= 1")
        if c.max_root_children < 0:
            raise InvalidInputError("cluster.max_root_children must be >= 0 (0: no cap)")
        if self.n_trees < 1:
            raise InvalidInputError("n_trees must be >= 1")
        if self.threads < 0:
            raise InvalidInputError("threads must be >= 0 (0: all cores)")
        if self.ranker.loss != "squared_hinge":
            raise InvalidInputError("ranker.loss must be 'squared_hinge'")
        if self.ranker.negatives not in ("auto", "tfn", "tfn+man"):
            raise InvalidInputError("ranker.negatives must be 'auto', 'tfn' or 'tfn+man'")
        if self.ranker.negative_beam_size < 1:
            raise InvalidInputError("ranker.negative_beam_size must be >= 1")
        if self.ranker.C <= 0:
            raise InvalidInputError("ranker.C must be > 0")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise InvalidInputError(f"weight_dtype must be one of {sorted(WEIGHT_DTYPES)}")
        if self.post_processor not in POST_PROCESSORS:
            raise InvalidInputError(f"post_processor must be one of {sorted(POST_PROCESSORS)}")
        w = self.dense_weight
        if not (w == "auto" or (isinstance(w, (int, float)) and not isinstance(w, bool)
                                and w > 0)):
            raise InvalidInputError("dense_weight must be a number > 0 or 'auto'")
        if self.dense_weight == "auto" and (
                not self.dense_weight_grid or min(self.dense_weight_grid) < 0):
            raise InvalidInputError("dense_weight_grid must list alphas >= 0")
        if self.knn and self.dense_weight == "auto" and not any(
                a > 0 for a in self.dense_weight_grid):
            raise InvalidInputError("knn needs a dense block: dense_weight_grid must list an "
                                    "alpha > 0")
        if self.static_max_length < 1:
            raise InvalidInputError("static_max_length must be >= 1")
        if self.fine_tune_epochs < 0:
            raise InvalidInputError("fine_tune_epochs must be >= 0 (0: no fine-tuning)")
        if self.fine_tune_epochs > 0 and self.dense_encoder != "minilm":
            raise InvalidInputError("fine_tune_epochs needs dense_encoder 'minilm'")
        if not self.knn_k_grid or min(self.knn_k_grid) < 1:
            raise InvalidInputError("knn_k_grid must list neighbour counts >= 1")
        if not self.knn_power_grid or min(self.knn_power_grid) < 0:
            raise InvalidInputError("knn_power_grid must list exponents >= 0")
        if not self.knn_weight_grid or not all(0 <= w <= 1 for w in self.knn_weight_grid):
            raise InvalidInputError("knn_weight_grid must list weights in 0..1")
        if not self.knn_centroid_weight_grid or not all(
                0 <= w <= 1 for w in self.knn_centroid_weight_grid):
            raise InvalidInputError("knn_centroid_weight_grid must list weights in 0..1")
        if not self.profile_weight_grid or min(self.profile_weight_grid) < 0:
            raise InvalidInputError("profile_weight_grid must list weights >= 0")
        if not self.profile_threshold_grid or not all(
                0 <= t < 1 for t in self.profile_threshold_grid):
            raise InvalidInputError("profile_threshold_grid must list thresholds in 0..1")
        if not self.knn_indexes or not set(self.knn_indexes) <= {"usearch", "postings"}:
            raise InvalidInputError("knn_indexes must list 'usearch' and / or 'postings'")
        if self.knn_max_voted_labels < 0:
            raise InvalidInputError("knn_max_voted_labels must be >= 0 (0: all)")
        if not self.feature_knn_threshold_grid or not all(
                0 <= t < 1 for t in self.feature_knn_threshold_grid):
            raise InvalidInputError("feature_knn_threshold_grid must list thresholds in 0..1")
        if self.feature_knn_max_postings < 0:
            raise InvalidInputError("feature_knn_max_postings must be >= 0 (0: no kNN part "
                                    "over the features)")
        if not 0 < self.profile_fit_share <= 1 - self.validation_share:
            raise InvalidInputError("profile_fit_share must lie in (0, 1 - validation_share]")
        if self.profile_pool_size < 1:
            raise InvalidInputError("profile_pool_size must be >= 1")
        if not 0 < self.validation_share < 1:
            raise InvalidInputError("validation_share must lie in (0, 1)")
        if self.bitmap_mb < 0:
            raise InvalidInputError("bitmap_mb must be >= 0")
        if self.beam_size < 1 or self.top_k < 1:
            raise InvalidInputError("beam_size and top_k must be >= 1")

    def resolved(self, *, fused: bool) -> BuildParams:
        """A copy with every ``auto`` that training reads made concrete: ``fused`` says
        whether the features carry a dense encoder's block."""
        if self.ranker.negatives != "auto":
            return self
        ranker = dataclasses.replace(self.ranker, negatives="tfn+man" if fused else "tfn")
        return dataclasses.replace(self, ranker=ranker)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildParams:
        from models.tfidf import TfidfParams

        return _from_dict(cls, data, {"tfidf": TfidfParams})

    @classmethod
    def from_file(cls, path: str | Path) -> BuildParams:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{path}: cannot read parameters: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInputError(f"{path}: parameters must be a JSON object")
        return cls.from_dict(data)


POST_PROCESSORS = {"l3-hinge": 0, "sigmoid": 1, "l3-hinge-ordered": 2}


def _from_dict(cls: type, data: dict[str, Any], overrides: dict[str, type] | None = None
               ) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise InvalidInputError(f"unknown parameter(s) for {cls.__name__}: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub = (overrides or {}).get(name) or hints.get(name)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub) and isinstance(value, dict):
            kwargs[name] = _from_dict(sub, value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
