"""xmc-serve model package: bundle format, encoders, label trees, beam search, builder.

Public API (stable; the service and the benchmarks use only this)::

    import models
    predictor = models.load_bundle("artifacts/demo")      # -> models.Predictor
    predictor.predict(["a document"], top_k=5, beam_size=10)
    # -> [[("label", 0.93), ...]]

Errors: see :mod:`models.errors` for the tree under :class:`XMCError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.errors import (
    BundleError,
    DataError,
    InvalidInputError,
    NoTextEncoderError,
    UnknownLabelError,
    XMCError,
)

if TYPE_CHECKING:
    from models.predictor import Predictor

__all__ = [
    "BundleError",
    "DataError",
    "InvalidInputError",
    "NoTextEncoderError",
    "Predictor",
    "UnknownLabelError",
    "XMCError",
    "load_bundle",
]


def load_bundle(path: str, *, mmap: bool = True) -> Predictor:
    """Open a bundle folder written by ``xmc build``; arrays are memory-mapped by default so
    several server processes share one copy. Raises :class:`BundleError`."""
    from models.predictor import Predictor

    return Predictor.load(path, mmap=mmap)


def __getattr__(name: str) -> type:
    if name == "Predictor":
        from models.predictor import Predictor

        return Predictor
    raise AttributeError(name)
