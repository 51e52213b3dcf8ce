"""Where the served bundles live: one bundle folder, or a repository of models and versions.

A repository is a folder of models, each a folder of versions, each a bundle written by
``xmc build``::

    PATH/NAME/VERSION/manifest.json ...

The version served is the one that ``PATH/NAME/current`` links to when that symlink exists,
else the greatest VERSION (compared as integers when every name is digits, else as strings).
Names starting with ``.`` are ignored, so a version is published by writing it to
``PATH/NAME/.tmp-x/`` and renaming it into place (``xmc build --out PATH/NAME/7`` does exactly
that). A model's defaults may sit beside its versions in ``PATH/NAME/config.json`` (see
:mod:`service.controls`); a change to it reloads the model like a new version. Reading a
bundle never needs the web stack: ``xmc serve`` uses this module before any worker starts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import BundleError

log = logging.getLogger("xmc.service")

MANIFEST = "manifest.json"
CURRENT = "current"
CONFIG = "config.json"
SAFE_PUBLISHING = (
    "publish a version as a new folder: copy it to NAME/.tmp-x/ and rename that to "
    "NAME/VERSION/ (or `xmc build --out NAME/VERSION`), never copy over served files"
)
#: set by the supervisor in each worker's environment, so a worker can reach its siblings
SUPERVISOR_PID_ENV = "XMC_SUPERVISOR_PID"


@dataclass(frozen=True)
class Source:
    """One version on disk as the repository names it, before it is loaded.

    ``fingerprint`` tells whether what is on disk changed: the version folder's real path,
    the content hash its manifest declares (None when the manifest cannot be read) and the
    model's ``config.json`` as read (None without one).
    """

    path: Path
    repository_version: str | None
    declared_version: str | None
    config: bytes | None = None

    @property
    def fingerprint(self) -> Fingerprint:
        return (str(self.path), self.declared_version, self.config)


Fingerprint = tuple[str, str | None, bytes | None]


def is_bundle(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def publish(model_dir: Path, version: str, bundle: Path) -> Path:
    """Publish ``bundle`` as ``model_dir/version`` the safe way: copied under a dot name the
    watcher ignores, then renamed into place, so no reader ever sees half a version."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(bundle, tmp)
    target = model_dir / version
    tmp.rename(target)
    return target


def model_names(root: Path) -> list[str]:
    """The models of a repository: its sub-folders, except dot-folders."""
    return sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )


def resolve(model_dir: Path) -> Source:
    """The version of one model to serve: ``current`` when it links somewhere, else the
    greatest version folder. Raises :class:`BundleError` when there is none, or when what
    would be served lies outside ``model_dir`` (see :func:`contained`)."""
    current = model_dir / CURRENT
    if current.is_symlink():
        target = contained(current, model_dir)
        if not target.is_dir():
            raise BundleError(f"'{CURRENT}' links to {target}, which is not a folder", current)
        check_links(target, model_dir)
        return Source(target, target.name, declared_version(target), read_config(model_dir))
    versions = [
        entry.name
        for entry in model_dir.iterdir()
        if entry.is_dir() and not entry.name.startswith(".") and entry.name != CURRENT
    ]
    if not versions:
        raise BundleError("no version folder (expected NAME/VERSION/manifest.json)", model_dir)
    numeric = all(name.isdigit() for name in versions)
    best = max(versions, key=int) if numeric else max(versions)
    folder = contained(model_dir / best, model_dir)
    check_links(folder, model_dir)
    return Source(folder, best, declared_version(folder), read_config(model_dir))


def contained(path: Path, model_dir: Path) -> Path:
    """``path`` resolved, refused unless it lies inside the model's folder: a ``current``
    link, a version folder or a bundle file that leads elsewhere (``..``, another model,
    anywhere on the disk) would serve what was never published as this model."""
    real = path.resolve()
    home = model_dir.resolve()
    if home not in real.parents:
        raise BundleError(
            f"{path.name!r} resolves to {real}, outside the model's folder {home}: a version "
            "must be a folder of the model (links only within it)", path)  # fmt: skip
    return real


def check_links(folder: Path, model_dir: Path) -> None:
    """Every symbolic link under a version folder must stay inside the model's folder (a
    version may share files with another version of the same model, no more)."""
    for parent, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            entry = Path(parent, name)
            if entry.is_symlink():
                contained(entry, model_dir)


def read_config(model_dir: Path) -> bytes | None:
    """The bytes of a model's ``config.json``, None without one; other read errors raise."""
    try:
        return (model_dir / CONFIG).read_bytes()
    except FileNotFoundError:
        return None


def single(bundle: Path) -> Source:
    """A bundle served on its own: no repository version."""
    folder = bundle.resolve()
    return Source(folder, None, declared_version(folder))


def declared_version(folder: Path) -> str | None:
    """The content hash a bundle's manifest declares; None if it cannot be read (a bundle
    being written, or corrupt: loading it will say why)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None
    version = manifest.get("version") if isinstance(manifest, dict) else None
    return str(version) if version is not None else None


class Watcher:
    """Calls ``on_change`` (from its own thread) after files under the served paths change.

    A repository is watched recursively; a lone bundle through its folder and the folder's
    parent, so that a bundle replaced by a rename (``xmc build --force``) is seen too. Changes
    are debounced by watchfiles: copying a bundle of many files is one call.
    """

    def __init__(self, root: Path, repository: bool, on_change: Callable[[], None]) -> None:
        self._root = root.absolute()
        self._repository = repository
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xmc-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import watchfiles

        polling = False
        while not self._stop.is_set():
            if self._repository:
                paths, recursive = [self._root], True
            else:
                paths = [p for p in (self._root.parent, self._root) if p.is_dir()]
                recursive = False
            try:
                for changes in watchfiles.watch(
                    *paths,
                    recursive=recursive,
                    stop_event=self._stop,
                    debounce=500,
                    rust_timeout=1000,
                    ignore_permission_denied=True,
                    raise_interrupt=False,
                    force_polling=polling,
                    poll_delay_ms=2000,
                ):
                    self._on_change()
                    if any(str(self._root) == path for _, path in changes):
                        break  # the watched folder itself was replaced: watch the new one
            except Exception as exc:  # never let watching take a worker down
                if polling:
                    log.warning("watching %s failed (%s); retrying in 30 s", self._root, exc)
                    self._stop.wait(30)
                else:  # e.g. a file system without change notifications
                    log.warning("watching %s failed (%s); polling it every 2 s instead",
                                self._root, exc)  # fmt: skip
                polling = True
