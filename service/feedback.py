"""The learn feedback log: documents that users labelled, kept for the next build.

``POST /v1/projects/{name}/learn`` never changes the model served (bundles stay read-only):
its documents are appended to ``XMC_FEEDBACK_DIR/NAME.jsonl`` in the corpus format
``xmc build`` reads (``{"text", "labels"}`` a line, plus where and when it was learned), and
``xmc build TRAIN --extra-train NAME.jsonl`` trains on them.

Several workers (processes) append to one file at once. Each call's lines go out as one
``O_APPEND`` write (the kernel puts every write at the end of the file, never over another),
under an exclusive ``flock`` so that a write the kernel splits still never interleaves with
another call's, then ``fsync``: when learn answers 204, its lines are on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import orjson

from models.errors import InvalidInputError
from models.vocab import LabelInfo

#: a model name that is safe as a file name (repository folder names always are)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

#: one learned subject: (uri, label), at least one of them given
Subject = tuple[str | None, str | None]


def log_path(folder: Path, model: str) -> Path:
    """``folder/model.jsonl``; a model name that is not a plain file name is refused."""
    if not _SAFE_NAME.fullmatch(model):
        raise InvalidInputError(f"model name {model!r} cannot name a feedback file")
    return folder / f"{model}.jsonl"


def label_names(subjects: Sequence[Subject], info: Mapping[str, LabelInfo],
                by_label: Mapping[str, str]) -> list[str]:  # fmt: skip
    """The training label of each subject: its URI when given (a bundle built with a
    vocabulary names its labels by URI; without one, the Annif API gives each label's name
    as its uri), else the name whose vocabulary label it is, else the label itself. Names the
    model does not know yet are kept: the next build learns them."""
    names = []
    for uri, label in subjects:
        if uri:
            names.append(uri)
        elif label:
            names.append(label if label in info else by_label.get(label, label))
    return list(dict.fromkeys(names))


def encode_lines(docs: Sequence[tuple[str, list[str]]], model: str, version: str) -> bytes:
    """Whole JSONL lines, one per (text, labels); ``read_jsonl`` ignores the extra fields."""
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return b"".join(
        orjson.dumps({"text": text, "labels": labels, "model": model, "version": version,
                      "learned_at": when}) + b"\n"
        for text, labels in docs
    )


def append_durably(path: Path, data: bytes) -> None:
    """Append ``data`` (whole lines) to ``path`` as one uninterleaved, fsync'ed write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC  # read: the last byte, see below
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        created = True
    except FileExistsError:
        fd = os.open(path, flags)
        created = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            # A writer that died mid-line (disk full, killed) left a fragment: end it, so that
            # it stays one bad line (--skip-bad-lines) instead of spoiling our first one.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    if created:  # the new file's directory entry must be durable too
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
            os.fsync(fd)
    finally:
        os.close(fd)
