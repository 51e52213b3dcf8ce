"""Calibrated scores: a monotone map from the ensemble score to the probability that the label
is right, fitted at build time (``--calibrate``) and applied to every returned score.

The map is isotonic regression (scikit-learn's, at build time only) of "this (document,
label) pair is a true label" on the pair's ensemble score, over the top ``top_k`` pairs a
model trained on train less the validation share returns for the held-out documents. It is
stored as two small float64 arrays, the knots ``x`` (scores, increasing) and ``y``
(probabilities, non-decreasing), and applied by linear interpolation between the knots,
constant beyond the ends: serving needs numpy only. Being monotone it never reorders labels
(it may tie them; the raw order is kept).

A calibrated score of 0.7 means: of the held-out pairs scoring about the same, 70 % were true
labels. It holds for documents like the training set's and for pairs in the top ``top_k``
of an unfiltered request; it says nothing about a label outside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import load_npy
from models.errors import BundleError

FILES = ("calibration_x.npy", "calibration_y.npy")


@dataclass(frozen=True)
class Calibration:
    x: np.ndarray
    y: np.ndarray

    @classmethod
    def fit(cls, scores: np.ndarray, correct: np.ndarray) -> Calibration:
        """Isotonic fit of ``correct`` (bool per pair) on ``scores``, clipped to [0, 1]."""
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=np.float64))
        return cls(np.asarray(iso.X_thresholds_, dtype=np.float64),
                   np.asarray(iso.y_thresholds_, dtype=np.float64))

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """The calibrated scores (same shape)."""
        return np.interp(scores, self.x, self.y)

    def save(self, folder: Path) -> dict[str, Any]:
        """Writes the knots into the bundle ``folder``; returns the manifest entry."""
        for name, arr in zip(FILES, (self.x, self.y)):
            np.save(folder / name, arr, allow_pickle=False)
        return {"method": "isotonic", "files": list(FILES), "n_knots": int(self.x.shape[0])}

    @classmethod
    def load(cls, folder: Path) -> Calibration:
        x, y = (np.asarray(load_npy(folder / name, mmap=False, dtype=np.float64))
                for name in FILES)
        if x.ndim != 1 or x.shape != y.shape or not x.size:
            raise BundleError("calibration knots must be two float64 vectors of one length",
                              folder / FILES[0])
        if (not np.all(np.isfinite(x)) or np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0)
                or not np.all((y >= 0) & (y <= 1))):
            raise BundleError("calibration knots are not a monotone map into [0, 1]",
                              folder / FILES[0])
        return cls(x, y)
