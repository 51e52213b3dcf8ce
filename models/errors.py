"""The one exception tree of xmc-serve.

::

    XMCError                      anything this package raises on purpose
    ├── BundleError               a bundle folder is missing, corrupt or of another format_version
    ├── DataError                 an input file (JSONL / XC format) has a malformed line
    └── InvalidInputError         a call's arguments are wrong (top_k < 1, empty batch, ...)
        ├── NoTextEncoderError    text given to a bundle that was built from feature vectors only
        └── UnknownLabelError     a label filter names a label the model does not know

The service maps each class to one HTTP status (``service/errors.py``); callers that only
want "did xmc refuse this?" catch ``XMCError``.
"""

from __future__ import annotations

from pathlib import Path


class XMCError(Exception):
    """Base class of every error raised on purpose by xmc-serve."""


class BundleError(XMCError):
    """A model bundle cannot be used; the message names the offending file."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class DataError(XMCError):
    """An input file that cannot be read: ``path`` says which, and ``line_no`` (1-based)
    which line when the fault is in one (None when it is the whole file's)."""

    def __init__(self, message: str, path: str | Path, line_no: int | None = None) -> None:
        self.path = str(path)
        self.line_no = line_no
        where = f"{path}:{line_no}" if line_no is not None else str(path)
        super().__init__(f"{where}: {message}")


class InvalidInputError(XMCError):
    """The arguments of a prediction or build call are not acceptable."""


class NoTextEncoderError(InvalidInputError):
    """The bundle has no text encoder (built from XC feature files): predict from features."""


class UnknownLabelError(InvalidInputError):
    """A label filter names labels (exact, not prefixes) the model does not know; ``labels``
    lists them, so a caller can point at the typo."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = list(labels)
        shown = ", ".join(repr(x) for x in self.labels[:10])
        more = f" and {len(self.labels) - 10} more" if len(self.labels) > 10 else ""
        super().__init__(f"unknown label(s) in the filter: {shown}{more}")
