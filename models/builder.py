"""The offline builder: a corpus in, a bundle folder out.

Stages: features (TF-IDF fit, or XC features as given; optionally a dense ONNX encoder fused
in, its weight chosen on a validation split carved from train unless given), PIFA label
embeddings, then per tree of the ensemble a balanced hierarchical clustering and the node
rankers; finally the bundle is written atomically and, when a test set is given,
evaluated into the manifest. Each stage logs its time and the peak memory so far.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from models import bundle as bundle_io
from models.calibration import Calibration
from models.cluster import pifa_embeddings
from models.data import Corpus, distinct_labels, label_matrix, validation_rows
from models.engine import LocalEngine, StageTimer, TreeEngine
from models.errors import BundleError, InvalidInputError
from models.feature_lookup import FeatureLookup
from models.features import FeatureEncoder, fuse
from models.knn import (
    NO_KNN,
    KnnMatcher,
    KnnPart,
    PostingsIndex,
    UsearchIndex,
    VoteRule,
    candidate_pool,
    centroid_scores,
    dense_block,
    knn_search,
    vote,
)
from models.metrics import best_threshold, micro_prf
from models.params import POST_PROCESSORS, BuildParams
from models.profiles import (
    NO_PROFILES,
    LabelProfiles,
    ProfilePart,
    ProfileRule,
    rank_fused,
)
from models.search import Found, Rows, Searcher, search_matrix
from models.tree import Ensemble, quantize
from models.vocab import Vocabulary, write_label_meta

if TYPE_CHECKING:
    from models.dense import TextEncoder

log = logging.getLogger(__name__)


def build(
    train: Corpus,
    out_dir: str | Path,
    params: BuildParams | None = None,
    *,
    test: Corpus | None = None,
    name: str | None = None,
    force: bool = False,
    engine: TreeEngine | None = None,
    vocab: Vocabulary | None = None,
) -> Path:
    """Build a bundle from ``train`` into ``out_dir``; returns the bundle path. The trees are
    trained on ``engine`` (:mod:`models.engine`: local cores by default, or a Dask cluster);
    the bundle is the same either way. With ``vocab`` the labels of ``train`` and ``test``
    that are a subject's URI or label become its URI, and the bundle stores each label's
    uri, label and notation (:mod:`models.vocab`)."""
    params = params or BuildParams()
    params.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise BundleError("exists; pass --force to replace it", out_dir)
    if vocab is not None:
        train = _canonical(train, vocab)
        test = _canonical(test, vocab) if test is not None else None
    label_names = distinct_labels(train.labels)
    if not label_names:
        raise InvalidInputError(f"{train.source or 'training set'}: no document has a label")
    threads = params.threads or os.cpu_count() or 1
    stages = StageTimer()
    t_start = time.perf_counter()

    tmp = bundle_io.tmp_dir_for(out_dir)
    try:
        with stages("features"):
            encoder, X, emb = _fit_features(train, params, tmp, threads, stages)
        selection = None
        dense = None  # (embeddings, weight) of a fused dense block
        if emb is not None and encoder is not None:  # the encoder that made emb
            if params.dense_weight == "auto":
                with stages("dense_weight"):
                    weight, selection = choose_dense_weight(train, emb, params, threads)
            else:
                weight = float(params.dense_weight)
            if weight == 0:
                log.info("dense_weight 0 won on validation: a TF-IDF-only bundle")
                encoder = FeatureEncoder(encoder.tfidf)
            else:
                encoder = FeatureEncoder(encoder.tfidf, encoder.dense, weight)
                X = fuse(X, emb, weight)
                dense = (emb, float(weight))
            del emb
        engine = engine or LocalEngine()
        reranking = Reranking()
        if params.knn:
            with stages("knn_choice"):
                reranking = choose_knn(train, dense, params, threads)
            if reranking.knn is None:
                log.info("knn weights 0 won on validation: a bundle without the kNN part")
        elif dense is None and (
                max(params.profile_weight_grid) > 0 or (
                    params.feature_knn_max_postings > 0 and max(params.knn_weight_grid) > 0)):
            with stages("rerank_choice"):
                reranking = choose_reranking(train, params, threads)
        rule, knn_selection = reranking.knn, reranking.knn_selection
        profile_rule = reranking.profiles
        held_out = None
        if params.tune_threshold or params.calibrate:
            with stages("held_out"):
                held_out = held_out_controls(train, dense, params, threads, engine,
                                             reranking)
        del dense
        Y = label_matrix(train.labels, label_names)
        label_counts = np.asarray(Y.sum(axis=0)).ravel().astype(np.int64)
        if encoder is None:
            dense_start = train.dense_start
        else:
            dense_start = encoder.n_tfidf if encoder.dense is not None else None
        knn_entry = None
        if rule is not None:
            # before the PIFA and the trees: its copies of the feature rows are freed before
            # they hold their own working sets
            with stages("knn_index"):
                knn_entry = _knn_matcher(X, Y, reranking, dense_start, params).save(tmp)
        pifa, profiles = None, None
        if profile_rule is not None:
            # the clustering's PIFA, computed once: the profiles are its pruned rows
            with stages("pifa"):
                pifa = pifa_embeddings(X, Y)
            profiles = LabelProfiles.build(X, Y, profile_rule, pifa=pifa)
        cpu_train = time.process_time()
        params = params.resolved(fused=dense_start is not None)
        log.info("ranker negatives: %s", params.ranker.negatives)
        writer = bundle_io.ForestWriter(tmp)
        for tree in _train_trees(X, Y, params, threads, stages, dense_start, engine, pifa):
            # each tree goes to disk as soon as it is trained: the forest is never in memory
            writer.add(quantize(tree, params.weight_dtype))
            del tree
        cpu_train = time.process_time() - cpu_train
        with stages("write"):
            ensemble = writer.finish()
            lookup = FeatureLookup.build(ensemble, int(X.shape[1]), params.bitmap_mb)
            bundle_io.write_feature_lookup(tmp, lookup)
            bundle_io.write_labels(tmp, label_names, label_counts)
            if vocab is not None:
                n_known = write_label_meta(tmp, label_names, vocab)
            entries = encoder.save(tmp) if encoder is not None else []
            shutil.rmtree(tmp / "_export", ignore_errors=True)  # the dense export's scratch
            encoder_files = [f for e in entries for f in e.get("files", [])]
            controls = held_out.save(tmp) if held_out is not None else {}
            encoder_files += controls.get("calibration", {}).get("files", [])
            if knn_entry is not None:
                controls["knn"] = knn_entry
                encoder_files += knn_entry["files"]
            if profiles is not None:
                controls["profiles"] = profiles.save(tmp)
                encoder_files += controls["profiles"]["files"]
            param_dict = params.to_dict()
            manifest: dict[str, Any] = {
                "format_version": bundle_io.format_version(
                    knn=rule is not None,
                    centroids=rule is not None and rule.centroid_weight > 0,
                    profiles=profile_rule is not None,
                    postings=controls.get("knn", {}).get("kind") == PostingsIndex.kind,
                    capped_pool=rule is not None and rule.max_voted > 0),
                "name": name or out_dir.name,
                # threads changes how fast, never what is built: not part of the identity
                "version": bundle_io.content_hash(
                    tmp, {k: v for k, v in param_dict.items() if k != "threads"},
                    encoder_files),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "params": param_dict,
                "n_labels": len(label_names),
                "n_features": int(X.shape[1]),
                "n_train_docs": train.n_docs,
                "trees": ensemble.tree_summary(),
                "encoders": entries,
                **controls,
                "metrics": {},
            }
            if vocab is not None:
                manifest["vocab"] = {"source": Path(vocab.source).name,
                                     "language": vocab.language, "n_subjects": len(vocab),
                                     "n_labels_known": n_known}  # fmt: skip
        build_seconds = time.perf_counter() - t_start
        manifest["build"] = {
            "seconds": round(build_seconds, 3),
            "threads": threads,
            "engine": engine.describe(),  # like threads: where, never what, so not hashed
            "stages": stages.records,
            "cpu_seconds_train": round(cpu_train, 3),
            "n_weights": ensemble.n_entries,
            "ensemble_bytes": sum(int(a.nbytes) for a in ensemble.arrays().values()),
            "lookup_bytes": lookup.nbytes,
        }
        if selection is not None:
            manifest["build"]["dense_weight_selection"] = selection
        if knn_selection is not None:
            manifest["build"]["knn_selection"] = knn_selection
        if rule is not None:
            manifest["build"]["knn_bytes"] = manifest["knn"]["bytes"]
        if reranking.profile_selection is not None:
            manifest["build"]["profile_selection"] = reranking.profile_selection
        if test is not None:
            bundle_io.write_manifest(tmp, manifest)
            from models.evaluate import evaluate_predictor
            from models.predictor import Predictor

            predictor = Predictor.load(tmp)
            manifest["metrics"] = evaluate_predictor(predictor, test, measure_speed=False)
            predictor.close()
        bundle_io.finalize(tmp, out_dir, manifest, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle %s (version %s) built in %.1fs", out_dir, manifest["version"],
             build_seconds)
    return out_dir


def _canonical(corpus: Corpus, vocab: Vocabulary) -> Corpus:
    labels, n_unknown = vocab.canonicalize(corpus.labels)
    if n_unknown:
        log.warning("%s: %d label(s) are not in the vocabulary %s (kept, without uri)",
                    corpus.source, n_unknown, vocab.source)
    return dataclasses.replace(corpus, labels=labels)


def _train_trees(X: sp.csr_matrix, Y: sp.csr_matrix, params: BuildParams, threads: int,
                 stages: StageTimer, dense_start: int | None = None,
                 engine: TreeEngine | None = None, pifa: sp.csr_matrix | None = None,
                 ) -> Iterator[Ensemble]:
    """PIFA (``pifa`` when the caller has it), then per tree a clustering and its rankers
    (on ``engine``, local by default): the one-tree ensembles in tree order, each as soon as
    it is trained. Columns from ``dense_start`` on are a dense encoder's block (see
    :mod:`models.tree`)."""
    if pifa is None:
        with stages("pifa"):
            pifa = pifa_embeddings(X, Y)
    yield from (engine or LocalEngine()).trees(X, Y, pifa, params, threads=threads,
                                               stages=stages, dense_start=dense_start)


def _fit_features(train: Corpus, params: BuildParams, folder: Path, threads: int,
                  stages: StageTimer,
                  ) -> tuple[FeatureEncoder | None, sp.csr_matrix, np.ndarray | None]:
    """Returns (encoder or None, TF-IDF or given feature matrix, dense embeddings of the
    training texts or None). With a dense encoder the returned encoder holds it, unweighted:
    the caller fuses once the weight is known."""
    if not train.is_text:
        if params.dense_encoder:
            raise InvalidInputError("a dense encoder needs text input, not XC features")
        X = sp.csr_matrix(train.feature_matrix, dtype=np.float32)
        X.sort_indices()
        return None, X, None
    from models.tfidf import TfidfEncoder

    tfidf, X = TfidfEncoder.fit(train.text_list, params.tfidf, workers=threads)
    if not params.dense_encoder:
        return FeatureEncoder(tfidf), X, None
    dense = _dense_encoder(params, folder, train, stages)
    return FeatureEncoder(tfidf, dense), X, dense.encode(train.text_list)


def choose_dense_weight(train: Corpus, emb: np.ndarray, params: BuildParams,
                        threads: int) -> tuple[float, dict[str, Any]]:
    """The alpha of ``params.dense_weight_grid`` with the best P@1 (then P@5, then the
    smaller alpha) on a seeded ``validation_share`` of ``train``, each candidate trained with
    one tree on the rest; returns it and the table behind the choice for the manifest."""
    from models.tfidf import TfidfEncoder

    fit_rows, valid_rows = validation_rows(train.n_docs, params.validation_share, params.seed)
    if not len(valid_rows) or not len(fit_rows):
        raise InvalidInputError(
            f"{train.n_docs} training documents are too few to choose dense_weight on a "
            f"validation split; give --dense-weight")
    fit, valid = train.subset(fit_rows), train.subset(valid_rows)
    names = distinct_labels(fit.labels)
    if not names:
        raise InvalidInputError("no labelled document left to choose dense_weight on")
    Y_fit = label_matrix(fit.labels, names)
    tfidf, X_fit = TfidfEncoder.fit(fit.text_list, params.tfidf, workers=threads)
    X_valid = tfidf.transform(valid.text_list)
    one_tree = dataclasses.replace(params, n_trees=1)
    truth = HeldOutTruth(names, valid.labels)
    candidates = []
    # with a kNN part the features must keep a dense block for it to read
    for alpha in sorted(a for a in set(params.dense_weight_grid) if a > 0 or not params.knn):
        Xf = fuse(X_fit, emb[fit_rows], alpha) if alpha > 0 else X_fit
        Xv = fuse(X_valid, emb[valid_rows], alpha) if alpha > 0 else X_valid
        # scored as it would be stored: quantized as weight_dtype says
        ensemble = quantize(next(_train_trees(Xf, Y_fit, one_tree.resolved(fused=alpha > 0),
                                              threads, StageTimer(verbose=False),
                                              X_fit.shape[1] if alpha > 0 else None)),
                            params.weight_dtype)
        ids, _, counts = search_matrix(ensemble, Xv, POST_PROCESSORS[params.post_processor], 5,
                                       params.beam_size, threads)
        m = truth.p1_p5(ids, counts)
        candidates.append({"dense_weight": float(alpha), **m})
        log.info("dense_weight %g: validation P@1 %.4f, P@5 %.4f", alpha, m["P@1"], m["P@5"])
    best = max(candidates, key=lambda c: (c["P@1"], c["P@5"], -c["dense_weight"]))
    return best["dense_weight"], {
        "validation_share": params.validation_share,
        "n_validation_docs": len(valid_rows),
        "n_trees": 1,
        "candidates": candidates,
        "chosen": best["dense_weight"],
    }


def choose_knn(train: Corpus, dense: tuple[np.ndarray, float] | None, params: BuildParams,
               threads: int) -> Reranking:
    """The kNN index (``knn_indexes``: the dense block's usearch index, or the sparse
    block's postings at a threshold) and vote rule (k, power, the votes' weight and the
    label centroids') that :func:`knn_preference` ranks first on the seeded
    ``validation_share`` of ``train``, unless its gain over the trees alone is within one
    standard error when each half of it picks the rule for the other (:class:`Halves`):
    one tree trained as the bundle's trees are on the rest, each index over the rest,
    their fusion scored on the held-out documents for every candidate (the tree and each
    index's neighbours are computed once). ``dense``: the fused block's embeddings and
    weight, as for :func:`held_out_controls`. Returns the choice (its rule None when the
    trees alone won) with the table behind it for the manifest."""
    fit_rows, valid_rows = validation_rows(train.n_docs, params.validation_share, params.seed)
    if not len(valid_rows) or not len(fit_rows):
        raise InvalidInputError(
            f"{train.n_docs} training documents are too few to choose the kNN weight on a "
            "validation split")
    fit, valid = train.subset(fit_rows), train.subset(valid_rows)
    names = distinct_labels(fit.labels)
    X_fit, X_valid, dense_start = _held_out_features(train, fit_rows, valid_rows, dense,
                                                     params)
    if dense_start is None or dense_start >= X_fit.shape[1]:
        raise InvalidInputError("knn needs a dense block: give --dense-encoder (or feature "
                                "input that declares one)")
    Y_fit = label_matrix(fit.labels, names)
    one_tree = dataclasses.replace(params, n_trees=1).resolved(fused=True)
    ensemble = quantize(next(_train_trees(X_fit, Y_fit, one_tree, threads,
                                          StageTimer(verbose=False), dense_start)),
                        params.weight_dtype)
    dim = X_fit.shape[1] - dense_start
    post = POST_PROCESSORS[params.post_processor]
    lookup = FeatureLookup.build(ensemble, X_fit.shape[1], params.bitmap_mb)
    record: dict[str, Any] = {}
    halves = Halves(HeldOutTruth(names, valid.labels), params.seed)
    with Searcher(ensemble, X_fit.shape[1], post, threads=threads,
                  lookup=lookup) as searcher:
        rows = (X_valid.indptr, X_valid.indices, X_valid.data)
        trees = searcher.search(*rows, 5, params.beam_size)
        candidates: list[dict[str, Any]] = []
        usearch: KnnMatcher | None = None
        if UsearchIndex.kind in params.knn_indexes:
            usearch = KnnMatcher.build(_block_of(X_fit, dense_start, dim), Y_fit,
                                       VoteRule(1, 1.0, 0.0))
            candidates += [{"index": UsearchIndex.kind, **c} for c in _knn_candidates(
                searcher, rows, trees, usearch, _block_of(X_valid, dense_start, dim), params,
                threads, halves.score)]
        if PostingsIndex.kind in params.knn_indexes and dense_start > 0:
            found, record = _postings_candidates(searcher, rows, trees, (
                X_fit[:, :dense_start], Y_fit), train.n_docs, params, threads, halves.score)
            candidates += [{"index": PostingsIndex.kind, **c} for c in found]
        trees_alone = {"index": "", "k": 0, "power": 0.0, "weight": 0.0,
                       "centroid_weight": 0.0, **halves.score(trees)}
        alone = None
        if ((0 in params.knn_weight_grid and 0 in params.knn_centroid_weight_grid)
                or not candidates):
            alone = trees_alone
            candidates.append(alone)

        @_once_per_candidate
        def fused_of(candidate: dict[str, Any]) -> Found:
            rule = _vote_rule(candidate, params)
            matcher = usearch.with_rule(rule) if (
                usearch is not None and candidate["index"] == UsearchIndex.kind) else (
                KnnMatcher.build_postings(X_fit[:, :dense_start], Y_fit, rule,
                                          candidate["threshold"]))
            return matcher.fuse(searcher, trees, rows, 5, dense_start=dense_start,
                                threads=threads)

        best, gain, standard_error = halves.choose(candidates, alone, fused_of, trees)
    rule = _vote_rule(best, params)
    log.info("knn: %s index, k %d, power %g, weight %g, centroid weight %g: validation P@1 "
             "%.4f, P@5 %.4f (cross-fitted gain over the trees alone %.4f, standard error "
             "%.4f)", best["index"] or "no", best["k"], best["power"], best["weight"],
             best["centroid_weight"], best["P@1"], best["P@5"], gain, standard_error)
    keys = ("index", "threshold", "k", "power", "weight", "centroid_weight")
    chosen = {key: best[key] for key in keys if key in best}
    return Reranking(rule if rule.scores else None, {
        "validation_share": params.validation_share, "n_validation_docs": len(valid_rows),
        "n_trees": 1, **record, **halves.record(), "candidates": candidates,
        "gain": round(gain, 6), "standard_error": round(standard_error, 6),
        "chosen": chosen}, knn_threshold=best.get("threshold", 0.0),
        knn_index=best["index"] or UsearchIndex.kind)


def _vote_rule(candidate: dict[str, Any], params: BuildParams) -> VoteRule:
    """The vote rule of a kNN candidate (k 0 and weights 0 for the trees alone)."""
    return VoteRule(int(candidate["k"]), candidate["power"], candidate["weight"],
                    candidate.get("centroid_weight", 0.0), params.knn_max_voted_labels)


class Halves:
    """The held-out documents split in two seeded halves, to keep a re-ranking rule only
    where it earns it. Each candidate rule is scored (after ``then``, the re-ranking that
    follows it) on the whole split and on each half; the rule :func:`knn_preference` ranks
    first on the whole split is kept when the rule each half ranks first gains over the
    trees alone on the other half, the two halves' gains together, by more than their
    standard error. The best of many rules overstates its own gain on the documents that
    picked it, and a gain within one standard error is as likely the split's noise; each
    half picking for the other keeps every document in both the pick and the check."""

    def __init__(self, truth: HeldOutTruth, seed: int,
                 then: Callable[[Found], Found] = lambda ranked: ranked) -> None:
        self.truth = truth
        self.first = np.less(np.random.default_rng(seed).random(truth.labelled.shape[0]), 0.5)
        self.then = then
        self._parts = (truth.only(self.first), truth.only(~self.first))

    def score(self, ranked: Found) -> dict[str, Any]:
        """P@1 and P@5 of ``ranked`` (then re-ranked) on the whole split, and ``halves``:
        [P@1, P@5] on each half."""
        ids, _, counts = self.then(ranked)
        return {**self.truth.p1_p5(ids, counts), "halves": [
            list(part.p1_p5(ids, counts).values()) for part in self._parts]}

    def choose(self, candidates: list[dict[str, Any]], alone: dict[str, Any] | None,
               fused_of: Callable[[dict[str, Any]], Found], trees: Found,
               ) -> tuple[dict[str, Any], float, float]:
        """The candidate ranked first on the whole split, or ``alone`` (the trees alone, a
        candidate too; None: not allowed) when the cross-fitted gain is within its standard
        error; with that gain and its standard error. ``fused_of``: a candidate's ranking
        of the held-out documents (before ``then``), ``trees`` the trees' own."""
        best = max(candidates, key=knn_preference)
        if best is alone:
            return best, 0.0, 0.0
        before = self.truth.per_doc(*self.then(trees)[::2])
        gain = np.zeros(before.shape[0])
        for h, picked_by in enumerate((self.first, ~self.first)):
            pick = max(candidates, key=partial(_preference_on_half, h))
            if pick is not alone:
                after = self.truth.per_doc(*self.then(fused_of(pick))[::2])
                gain[~picked_by] = (after - before)[~picked_by]
        gain = gain[self.truth.labelled]
        mean_gain = float(gain.mean()) if gain.size else 0.0
        standard_error = standard_error_of_mean(gain)
        if alone is not None and not (gain.size > 1 and mean_gain > standard_error):
            best = alone
        return best, mean_gain, standard_error

    def record(self) -> dict[str, int]:
        """The halves' sizes for the manifest."""
        return {"n_first_half_docs": int(self.first.sum()),
                "n_second_half_docs": int((~self.first).sum())}


def _once_per_candidate(fused_of: Callable[[dict[str, Any]], Found],
                        ) -> Callable[[dict[str, Any]], Found]:
    """``fused_of`` computed once per candidate (the same dict): both halves often pick the
    same rule, and the kNN part over the feature rows fuses the chosen one again for the
    part that follows; each call builds an index or searches the neighbours anew."""
    rankings: dict[int, Found] = {}

    def once(candidate: dict[str, Any]) -> Found:
        if id(candidate) not in rankings:
            rankings[id(candidate)] = fused_of(candidate)
        return rankings[id(candidate)]

    return once


def _preference_on_half(half: int, candidate: dict[str, Any]) -> tuple[float, ...]:
    """:func:`knn_preference` of a candidate scored by :meth:`Halves.score`, on one half."""
    p1, p5 = candidate["halves"][half]
    return knn_preference({**candidate, "P@1": p1, "P@5": p5})


def _knn_candidates(searcher: Searcher, rows: Rows, trees: Found, matcher: KnnMatcher,
                    queries: Any, params: BuildParams, threads: int,
                    score: Callable[[Found], dict[str, Any]],
                    ) -> list[dict[str, Any]]:
    """Every rule of the grids but the trees alone, with ``score`` of the top 5 it gives
    the validation ``rows`` (as the matcher's index searches them:
    ``queries``), over the trees' ranking ``trees``: the neighbours are searched once, the
    pool built once per (k, power). A matcher without centroids takes a centroid grid of
    0 only."""
    keys, sims = matcher.neighbours(queries, max(params.knn_k_grid), threads)
    centroids_of = (None if matcher.centroids is None
                    else partial(centroid_scores, matcher.centroids, queries))
    candidates = []
    for k in sorted(set(params.knn_k_grid)):
        for power in sorted(set(params.knn_power_grid)):
            votes = vote(keys[:, :k], sims[:, :k], matcher.label_ptr, matcher.label_ids,
                         power)
            pool = candidate_pool(trees, votes, partial(searcher.label_scores, *rows),
                                  centroids_of, max_voted=params.knn_max_voted_labels)
            for w in sorted(set(params.knn_weight_grid)):
                for c in sorted(set(params.knn_centroid_weight_grid)):
                    if w or c:  # both 0: the trees alone
                        candidates.append({"k": k, "power": power, "weight": w,
                                           "centroid_weight": c,
                                           **score(pool.rank(w, c, 5))})
    return candidates


def knn_preference(candidate: dict[str, Any]) -> tuple[float, ...]:
    """Sort key of a kNN candidate (``P@1``, ``P@5``, ``weight``, ``centroid_weight``,
    ``k``, ``power``, ``threshold``), best largest: (P@1 + P@5) / 2 first, then P@1, then
    the smaller weights, k and power, then the larger threshold (the smaller index). By P@1
    alone the votes' weight was chosen high where it lifted the first label a little and
    cost the fifth and the tail labels more (cooking: benchmarks/RESULTS.md)."""
    c = candidate
    return (round(c["P@1"] + c["P@5"], 9), c["P@1"], -c["weight"],
            -c.get("centroid_weight", 0.0), -c["k"], -c["power"], c.get("threshold", 0.0))


@dataclass
class Reranking:
    """What re-ranks the trees' labels in a bundle: a kNN part's vote rule (None: none), its
    index's kind and, for the postings over the (sparse) feature rows, their threshold; the
    label profiles' rule (None: none); with the tables behind each choice for the manifest
    (None: not considered)."""

    knn: VoteRule | None = None
    knn_selection: dict[str, Any] | None = None
    profiles: ProfileRule | None = None
    profile_selection: dict[str, Any] | None = None
    knn_threshold: float = 0.0
    knn_index: str = PostingsIndex.kind


def choose_reranking(train: Corpus, params: BuildParams, threads: int) -> Reranking:
    """The parts that re-rank the trees' labels in a bundle without a dense block, chosen on
    the seeded ``validation_share`` of ``train`` with one tree trained as the bundle's are
    on a seeded ``profile_fit_share`` of the documents outside it (the held-out documents
    searched once): the label profiles' weight and threshold over the trees alone
    (:func:`_choose_profiles`); a kNN part over the feature rows, scored with those profiles
    re-ranking its ranking as they would the trees' (:func:`_choose_feature_knn`), so that
    it is chosen for what it adds to them; then, when a kNN part is kept, the profiles again
    over its ranking. Each is kept only when its gain in (P@1 + P@5) / 2 exceeds one
    standard error of the per-document differences (the kNN part's measured on the half of
    the split that did not pick its rule): a gain that small is as likely the split's
    noise, and the part would cost a request and bytes for it. A training set too small to
    hold a split out gets neither."""
    fit_rows, valid_rows = validation_rows(train.n_docs, params.validation_share, params.seed)
    # a seeded part of the rest: the choice's copy of the features and its tree's training
    # then stay within the memory the bundle's own training takes
    n_fit = min(len(fit_rows), max(1, round(params.profile_fit_share * train.n_docs)))
    fit_rows = np.sort(np.random.default_rng(params.seed).choice(fit_rows, n_fit,
                                                                 replace=False))
    fit, valid = train.subset(fit_rows), train.subset(valid_rows)
    names = distinct_labels(fit.labels)
    if not len(valid_rows) or not names:
        log.info("reranking: %d training documents hold no validation split out, so none",
                 train.n_docs)
        return Reranking()
    X_fit, X_valid, _ = _held_out_features(train, fit_rows, valid_rows, None, params)
    Y_fit = label_matrix(fit.labels, names)
    one_tree = dataclasses.replace(params, n_trees=1).resolved(fused=False)
    ensemble = quantize(next(_train_trees(X_fit, Y_fit, one_tree, threads,
                                          StageTimer(verbose=False))), params.weight_dtype)
    rows = (X_valid.indptr, X_valid.indices, X_valid.data)
    width = ProfileRule(0.0, params.profile_pool_size, 0.0).width(5, len(names))
    choice = Reranking()
    truth = HeldOutTruth(names, valid.labels)
    lookup = FeatureLookup.build(ensemble, X_fit.shape[1], params.bitmap_mb)
    profiles = max(params.profile_weight_grid) > 0
    with Searcher(ensemble, X_fit.shape[1], POST_PROCESSORS[params.post_processor],
                  threads=threads, lookup=lookup) as searcher:
        found = searcher.search(*rows, width, params.beam_size)
        if profiles:
            choice.profiles, choice.profile_selection = _choose_profiles(
                X_fit, Y_fit, rows, found, truth, params)
        if params.feature_knn_max_postings > 0 and max(params.knn_weight_grid) > 0:
            first: ProfilePart = NO_PROFILES if choice.profiles is None else (
                LabelProfiles.build(X_fit, Y_fit, choice.profiles))
            then = partial(first.rerank, rows=rows, top_k=width)
            found, knn = _choose_feature_knn(searcher, rows, found, (X_fit, Y_fit),
                                             train.n_docs, truth, params, threads, then)
            choice.knn, choice.knn_threshold, choice.knn_selection = knn
            choice.knn_selection["scored_after_profiles"] = (
                None if choice.profiles is None else dataclasses.asdict(choice.profiles))
            if choice.knn is not None and profiles:
                choice.profiles, choice.profile_selection = _choose_profiles(
                    X_fit, Y_fit, rows, found, truth, params)
    for selection in (choice.knn_selection, choice.profile_selection):
        if selection is not None:
            selection.update(validation_share=params.validation_share,
                             n_validation_docs=len(valid_rows), n_trees=1)
    return choice


def _choose_feature_knn(searcher: Searcher, rows: Rows, found: Found,
                        fit: tuple[sp.csr_matrix, sp.csr_matrix], n_docs: int,
                        truth: HeldOutTruth, params: BuildParams, threads: int,
                        then: Callable[[Found], Found],
                        ) -> tuple[Found, tuple[VoteRule | None, float, dict[str, Any]]]:
    """The index threshold (``feature_knn_threshold_grid``) and vote rule (``knn_k_grid``
    x ``knn_power_grid`` x ``knn_weight_grid``) of a kNN part over the feature rows that
    :func:`knn_preference` ranks first on the held-out ``rows`` over the trees' ``found``,
    each ranking scored after ``then`` (the re-ranking that follows the part), unless its
    gain over the trees alone is within one standard error when each half of the held-out
    documents picks the rule for the other (:class:`Halves`). The indexes hold the ``fit``
    documents (features, labels); a threshold whose index a held-out query reads more than
    ``feature_knn_max_postings`` postings of, once it holds all ``n_docs`` training
    documents, is not a candidate. Returns the ranking the next part re-ranks (``found``
    fused with the chosen votes, as wide), and the rule (None: the trees alone), its
    threshold and the table behind the choice."""
    X_fit, Y_fit = fit
    halves = Halves(truth, params.seed, then)
    trees_alone = {"threshold": 0.0, "k": 0, "power": 0.0, "weight": 0.0,
                   "centroid_weight": 0.0, **halves.score(found)}
    candidates, record = _postings_candidates(searcher, rows, found, fit, n_docs, params,
                                              threads, halves.score)
    record = {"index": PostingsIndex.kind, **record}
    if not candidates:
        log.info("knn over the features: a query would read more than %d postings at every "
                 "threshold (%s), so none", params.feature_knn_max_postings,
                 record["thresholds"])
        return found, (None, 0.0, {**record, "chosen": None})
    alone = None
    if 0 in params.knn_weight_grid:
        alone = trees_alone
        candidates.append(alone)

    @_once_per_candidate
    def fused_of(candidate: dict[str, Any]) -> Found:
        return KnnMatcher.build_postings(
            X_fit, Y_fit, _vote_rule(candidate, params), candidate["threshold"]).fuse(
                searcher, found, rows, found[0].shape[1], dense_start=0, threads=threads)

    best, mean_gain, standard_error = halves.choose(candidates, alone, fused_of, found)
    rule = _vote_rule(best, params) if best["weight"] else None
    fused = found if rule is None else fused_of(best)
    log.info("knn over the features: threshold %g, k %d, power %g, weight %g: validation "
             "P@1 %.4f, P@5 %.4f (cross-fitted gain over the trees alone %.4f, standard "
             "error %.4f)", best["threshold"], best["k"], best["power"], best["weight"],
             best["P@1"], best["P@5"], mean_gain, standard_error)
    chosen = {key: best[key] for key in ("threshold", "k", "power", "weight")}
    return fused, (rule, best["threshold"], {
        **record, **halves.record(), "candidates": candidates,
        "gain": round(mean_gain, 6), "standard_error": round(standard_error, 6),
        "chosen": chosen})


def _postings_candidates(searcher: Searcher, rows: Rows, found: Found,
                         fit: tuple[sp.csr_matrix, sp.csr_matrix], n_docs: int,
                         params: BuildParams, threads: int,
                         score: Callable[[Found], dict[str, Any]],
                         ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rules of :func:`_knn_candidates` (no centroids) over a postings index of the
    ``fit`` documents (sparse features, labels) at each threshold of
    ``feature_knn_threshold_grid``, each tagged with its threshold, scored by ``score``;
    a threshold whose index a held-out query of ``rows`` reads more than
    ``feature_knn_max_postings`` postings of, once it holds all ``n_docs`` training
    documents, is not a candidate. Also the table of the thresholds for the manifest."""
    X_fit, Y_fit = fit
    record: dict[str, Any] = {"max_postings": params.feature_knn_max_postings,
                              "thresholds": []}
    candidates: list[dict[str, Any]] = []
    knn_params = dataclasses.replace(params, knn_centroid_weight_grid=[0.0])
    for threshold in sorted(set(params.feature_knn_threshold_grid)):
        index = PostingsIndex.build(X_fit, threshold)
        queries = index.queries(rows, X_fit.shape[1])
        # the bundle's index holds every training document: its postings grow with them
        reads = index.reads(queries) * n_docs / X_fit.shape[0]
        admitted = reads <= params.feature_knn_max_postings
        record["thresholds"].append({"threshold": threshold, "mean_postings": round(reads, 1),
                                     "admitted": bool(admitted)})
        if admitted:
            matcher = KnnMatcher.over_postings(index, Y_fit, VoteRule(1, 1.0, 0.0))
            candidates += [{"threshold": threshold, **c} for c in _knn_candidates(
                searcher, rows, found, matcher, queries, knn_params, threads, score)]
            del matcher
        del index  # before the next threshold's: one index of the fit part at a time
    log.info("knn over the features: postings a query reads, by threshold: %s",
             record["thresholds"])
    return candidates, record


def _choose_profiles(X_fit: sp.csr_matrix, Y_fit: sp.csr_matrix, rows: Rows, found: Found,
                     truth: HeldOutTruth, params: BuildParams,
                     ) -> tuple[ProfileRule | None, dict[str, Any]]:
    """The weight and threshold of the label profiles (``profile_weight_grid`` x
    ``profile_threshold_grid``, profiles built over the fit documents ``X_fit``, ``Y_fit``)
    that :func:`profile_preference` ranks first re-ranking ``found`` for the held-out
    ``rows``, unless within one standard error of ``found`` alone. Returns the rule (None
    for weight 0) and the table behind the choice."""
    pifa = pifa_embeddings(X_fit, Y_fit)
    candidates: list[dict[str, float]] = []
    per_doc: list[np.ndarray] = []  # candidate i's (P@1 + P@5) / 2 per held-out document
    grid = [(0.0, 0.0)] if 0 in params.profile_weight_grid else []
    grid += [(w, t) for t in sorted(set(params.profile_threshold_grid))
             for w in sorted(set(params.profile_weight_grid) - {0})]
    cosines = np.zeros(found[0].shape)
    for weight, threshold in grid:
        if threshold and (not candidates or threshold != candidates[-1]["threshold"]):
            probe = ProfileRule(1.0, params.profile_pool_size, threshold)
            cosines = LabelProfiles.build(X_fit, Y_fit, probe, pifa=pifa).cosines(
                rows, found[0], found[2])
        ids, _, counts = rank_fused(found, cosines, weight, 5)
        per_doc.append(truth.per_doc(ids, counts))
        candidates.append({"weight": weight, "threshold": threshold,
                           **truth.p1_p5(ids, counts)})
    best = max(range(len(candidates)), key=lambda i: profile_preference(candidates[i]))
    gain = per_doc[best] - per_doc[0]
    standard_error = standard_error_of_mean(gain)
    if grid[0] == (0.0, 0.0) and gain.mean() <= standard_error:
        best = 0
    chosen = candidates[best]
    log.info("profiles: weight %g, threshold %g: validation P@1 %.4f, P@5 %.4f (first "
             "candidate %.4f, %.4f; gain %.4f, standard error %.4f)", chosen["weight"],
             chosen["threshold"], chosen["P@1"], chosen["P@5"], candidates[0]["P@1"],
             candidates[0]["P@5"], gain.mean(), standard_error)
    rule = (ProfileRule(chosen["weight"], params.profile_pool_size, chosen["threshold"])
            if chosen["weight"] else None)
    return rule, {"pool_size": params.profile_pool_size, "candidates": candidates,
                  "gain": round(float(gain.mean()), 6),
                  "standard_error": round(standard_error, 6),
                  "chosen": {"weight": chosen["weight"], "threshold": chosen["threshold"]}}


def standard_error_of_mean(values: np.ndarray) -> float:
    """The standard error of the mean of ``values`` (sample sd over sqrt(n)); 0 below two."""
    return float(values.std(ddof=1) / np.sqrt(values.shape[0])) if values.size > 1 else 0.0


def profile_preference(candidate: dict[str, float]) -> tuple[float, ...]:
    """Sort key of a profiles candidate, best largest: (P@1 + P@5) / 2, then P@1, then the
    smaller weight, then the larger threshold (smaller profiles)."""
    c = candidate
    return (round(c["P@1"] + c["P@5"], 9), c["P@1"], -c["weight"], c["threshold"])


def _knn_matcher(X: sp.csr_matrix, Y: sp.csr_matrix, reranking: Reranking,
                 dense_start: int | None, params: BuildParams) -> KnnMatcher:
    """The kNN part chosen in ``reranking`` (its rule set) of a model with features ``X``
    and labels ``Y``: a usearch index over the dense block (from ``dense_start``), or
    postings over the sparse features (those before ``dense_start``; None: all) at the
    chosen threshold."""
    assert reranking.knn is not None
    if reranking.knn_index == UsearchIndex.kind:
        assert dense_start is not None  # choose_knn refuses features without a dense block
        return KnnMatcher.build(_block_of(X, dense_start, X.shape[1] - dense_start), Y,
                                reranking.knn)
    sparse = X if dense_start is None else X[:, :dense_start]
    return KnnMatcher.build_postings(sparse, Y, reranking.knn, reranking.knn_threshold)


def _block_of(X: sp.csr_matrix, dense_start: int, dim: int) -> np.ndarray:
    return dense_block(X.indptr, X.indices, X.data, dense_start, dim)


class HeldOutTruth:
    """The held-out documents' labels as ids of the fit part's label ``names``, to score the
    top 5 of many candidate rankings without turning ids into names: P@1 and P@5 as
    :func:`models.metrics.evaluate` counts them (documents without labels left out) and
    (P@1 + P@5) / 2 per document."""

    def __init__(self, names: list[str], labels: Sequence[list[str]]) -> None:
        index = {name: j for j, name in enumerate(names)}
        self.n_labels = len(names)
        self.labelled = np.array([bool(truth) for truth in labels], dtype=np.bool_)
        cells = [d * self.n_labels + index[lab] for d, truth in enumerate(labels)
                 for lab in set(truth) if lab in index]
        self.cells = np.unique(np.asarray(cells, dtype=np.int64))

    def only(self, keep: np.ndarray) -> HeldOutTruth:
        """The same documents, those outside ``keep`` (bool per document) without labels:
        :meth:`p1_p5` then scores the kept ones alone."""
        out = copy.copy(self)
        out.labelled = self.labelled & keep
        out.cells = self.cells[keep[self.cells // max(self.n_labels, 1)]]
        return out

    def hits(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """bool (n_docs, 5): whether each of a ranking's first 5 labels is right."""
        top = np.full((ids.shape[0], 5), -1, dtype=np.int64)
        width = min(ids.shape[1], 5)
        top[:, :width] = ids[:, :width]
        ranked = np.arange(5)[None, :] < np.minimum(counts, 5)[:, None]
        cell = np.arange(ids.shape[0])[:, None] * self.n_labels + top
        at = np.minimum(np.searchsorted(self.cells, cell), max(self.cells.shape[0] - 1, 0))
        return ranked & (top >= 0) & (self.cells[at] == cell if self.cells.size else False)

    def per_doc(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Per held-out document, (P@1 + P@5) / 2 of its top 5."""
        hits = self.hits(ids, counts)
        return (hits[:, 0] + hits.sum(axis=1) / 5) / 2

    def p1_p5(self, ids: np.ndarray, counts: np.ndarray) -> dict[str, float]:
        hits = self.hits(ids, counts)[self.labelled]
        if not hits.shape[0]:
            return {"P@1": 0.0, "P@5": 0.0}
        return {"P@1": round(float(hits[:, 0].mean()), 6),
                "P@5": round(float(hits.sum(axis=1).mean() / 5), 6)}


@dataclass
class HeldOut:
    """What the held-out predictions gave: the tuned threshold (manifest entry) and the
    calibration, each None when not asked for."""

    threshold: dict[str, Any] | None
    calibration: Calibration | None
    calibration_record: dict[str, Any]

    def save(self, folder: Path) -> dict[str, Any]:
        """Writes the calibration's files; returns the manifest's entries."""
        out: dict[str, Any] = {}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if self.calibration is not None:
            out["calibration"] = {**self.calibration.save(folder), **self.calibration_record}
        return out


def held_out_controls(train: Corpus, dense: tuple[np.ndarray, float] | None,
                      params: BuildParams, threads: int,
                      engine: TreeEngine | None = None,
                      reranking: Reranking | None = None) -> HeldOut:
    """A model trained as the bundle will be (same parameters, all its trees) on train less
    the seeded ``validation_share`` predicts the held-out documents (``top_k``,
    ``beam_size``); on those (label, score) pairs: the isotonic calibration
    (``params.calibrate``), then the threshold maximizing micro-F1 on the scores as they will
    be served (``params.tune_threshold``). ``dense``: the fused block's embeddings of every
    training document and its weight; ``reranking``: the kNN part and label profiles the
    bundle takes, built over the fit part and applied as the bundle applies them."""
    reranking = reranking or Reranking()
    fit_rows, valid_rows = validation_rows(train.n_docs, params.validation_share, params.seed)
    if not len(valid_rows) or not len(fit_rows):
        raise InvalidInputError(
            f"{train.n_docs} training documents are too few to hold out a validation split "
            "for the threshold / calibration")
    fit, valid = train.subset(fit_rows), train.subset(valid_rows)
    names = sorted({lab for doc in fit.labels for lab in doc})
    if not names:
        raise InvalidInputError("no labelled document left to tune the threshold on")
    X_fit, X_valid, dense_start = _held_out_features(train, fit_rows, valid_rows, dense,
                                                     params)
    trees = _train_trees(X_fit, label_matrix(fit.labels, names), params.resolved(
        fused=dense is not None), threads, StageTimer(verbose=False), dense_start, engine)
    ensemble = Ensemble.concatenate([quantize(t, params.weight_dtype) for t in trees])
    matcher: KnnPart = NO_KNN if reranking.knn is None else _knn_matcher(
        X_fit, label_matrix(fit.labels, names), reranking, dense_start, params)
    profile_part: ProfilePart = NO_PROFILES if reranking.profiles is None else (
        LabelProfiles.build(X_fit, label_matrix(fit.labels, names), reranking.profiles))
    lookup = FeatureLookup.build(ensemble, X_fit.shape[1], params.bitmap_mb)
    with Searcher(ensemble, X_fit.shape[1], POST_PROCESSORS[params.post_processor],
                  threads=threads, lookup=lookup) as searcher:
        ids, scores, counts = knn_search(
            searcher, matcher, (X_valid.indptr, X_valid.indices, X_valid.data), params.top_k,
            params.beam_size, dense_start=dense_start or 0, threads=threads,
            profiles=profile_part)
    score_list: list[float] = []
    correct_list: list[bool] = []
    for row, srow, c, truth in zip(ids.tolist(), scores.tolist(), counts, valid.labels):
        y = set(truth)
        score_list += srow[:c]
        correct_list += [names[j] in y for j in row[:c]]
    pair_scores, correct = np.asarray(score_list), np.asarray(correct_list, dtype=bool)
    n_true = sum(len(set(t)) for t in valid.labels)
    calibration, record = None, {}
    if params.calibrate:
        calibration = Calibration.fit(pair_scores, correct)
        # no ECE here: on the pairs it was fitted to, isotonic regression's is 0 by
        # construction; xmc eval measures it on a test set
        record = {"n_validation_docs": len(valid_rows), "n_pairs": int(pair_scores.size)}
        pair_scores = calibration.apply(pair_scores)
    threshold = None
    if params.tune_threshold:
        value = best_threshold(pair_scores, correct, n_true)
        prf = micro_prf(pair_scores, correct, n_true, value)
        threshold = {"value": value, **{k: round(v, 6) for k, v in prf.items()},
                     "n_validation_docs": len(valid_rows),
                     "scale": "calibrated" if calibration is not None else "raw",
                     "top_k": params.top_k, "beam_size": params.beam_size}
        log.info("threshold %.4f: validation micro-F1 %.4f (P %.4f, R %.4f)", value,
                 prf["micro_f1"], prf["precision"], prf["recall"])
    return HeldOut(threshold, calibration, record)


def _held_out_features(train: Corpus, fit_rows: np.ndarray, valid_rows: np.ndarray,
                       dense: tuple[np.ndarray, float] | None, params: BuildParams,
                       ) -> tuple[sp.csr_matrix, sp.csr_matrix, int | None]:
    """Features of the fit and validation parts as the bundle computes them, the TF-IDF
    refitted on the fit part alone (the held-out documents' words never shape it); and
    where a dense block starts (None: no dense block)."""
    if not train.is_text:
        X_fit = sp.csr_matrix(train.feature_matrix[fit_rows], dtype=np.float32)
        X_valid = sp.csr_matrix(train.feature_matrix[valid_rows], dtype=np.float32)
        X_fit.sort_indices()
        X_valid.sort_indices()
        return X_fit, X_valid, train.dense_start
    from models.tfidf import TfidfEncoder

    texts = train.text_list
    tfidf, X_fit = TfidfEncoder.fit([texts[i] for i in fit_rows], params.tfidf)
    X_valid = tfidf.transform([texts[i] for i in valid_rows])
    if dense is None:
        return X_fit, X_valid, None
    emb, weight = dense
    return (fuse(X_fit, emb[fit_rows], weight), fuse(X_valid, emb[valid_rows], weight),
            X_fit.shape[1])


def _dense_encoder(params: BuildParams, folder: Path, train: Corpus, stages: StageTimer,
                   ) -> TextEncoder:
    """The encoder ``params.dense_encoder`` names, made ready in ``folder/_export``; with
    ``fine_tune_epochs`` MiniLM is fine-tuned on the documents of ``train`` outside the
    validation split (the split every held-out choice of the build scores on), timed as
    the stage ``fine_tune``."""
    from models.dense import OnnxTextEncoder, StaticTextEncoder

    spec = params.dense_encoder
    if spec is None:
        raise InvalidInputError("no dense encoder was asked for")
    if spec == "minilm-static":
        from models.export import distill_minilm_static

        static = distill_minilm_static(folder / "_export")
        return StaticTextEncoder(np.load(static["embeddings_path"], allow_pickle=False),
                                 static["tokenizer_path"], max_length=params.static_max_length)
    if spec == "minilm" and params.fine_tune_epochs > 0:
        from models.finetune import fine_tune_minilm

        fit_rows, _ = validation_rows(train.n_docs, params.validation_share, params.seed)
        texts = train.text_list
        with stages("fine_tune"):
            info = fine_tune_minilm([texts[i] for i in fit_rows],
                                    [train.labels[i] for i in fit_rows], folder / "_export",
                                    epochs=params.fine_tune_epochs, seed=params.seed,
                                    threads=params.threads or os.cpu_count() or 1,
                                    int8=params.int8)
        model, tokenizer = Path(info["model_path"]), Path(info["tokenizer_path"])
    elif spec == "minilm":
        from models.export import export_minilm

        info = export_minilm(folder / "_export", int8=params.int8)
        model, tokenizer = Path(info["model_path"]), Path(info["tokenizer_path"])
    else:
        model = Path(spec)
        candidates = [model.parent / "tokenizer.json", model.with_suffix(".tokenizer.json")]
        found = next((c for c in candidates if c.is_file()), None)
        if not model.is_file() or found is None:
            raise InvalidInputError(
                f"{spec}: need an .onnx file with tokenizer.json (or "
                f"{model.stem}.tokenizer.json) beside it")
        tokenizer = found
        if params.int8:
            from models.export import quantize_int8

            q = folder / "_export" / "model.int8.onnx"
            q.parent.mkdir(parents=True, exist_ok=True)
            quantize_int8(model, q)
            model = q
    return OnnxTextEncoder(model, tokenizer, intra_op_threads=params.threads or 2)
