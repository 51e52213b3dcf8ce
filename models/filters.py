"""Label filters: which labels a prediction may return, compiled to masks the beam search reads.

A filter is two lists, ``include`` and ``exclude``; each entry is an exact label name or, when
it ends in ``*``, a prefix (``science/physics/*`` selects every label whose name starts with
``science/physics/``; ``*`` alone selects all). A label is allowed when it matches the include
list (or there is none) and does not match the exclude list: exclude wins. An exact name the
model does not know is an :class:`UnknownLabelError` naming it (a typo must not silently allow
nothing); a prefix that matches nothing simply allows nothing. Several filters combine by
intersection: a model's configured filter and a request's are passed together, so the
request's include narrows the configured one and its exclude adds to it.

The beam search never sees names: a filter is compiled to an allowed-label mask, then to an
allowed-**node** mask over the whole forest (a node is allowed when an allowed label lies below
it in its tree), and the kernel keeps disallowed children out of the beam. Compiling costs
O(entries x log labels + allowed labels x depth): prefixes are ranges of a sorted copy of the
names found by bisection. Node masks are cached per normalized filter, since a model's
configured filter repeats on every request.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import InvalidInputError, UnknownLabelError
from models.tree import Ensemble

#: compiled node masks kept per predictor (one per distinct normalized filter)
CACHE_SIZE = 256
#: above every code point: the end of a prefix's range when its last character is the largest
_MAX_CHAR = chr(0x10FFFF)


@dataclass(frozen=True)
class LabelFilter:
    """One filter, normalized: entries sorted and unique, ``include`` None when absent (every
    label allowed) and a tuple otherwise (an empty one allows nothing)."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, include: Iterable[str] | None = None,
           exclude: Iterable[str] | None = None) -> LabelFilter:
        return cls(None if include is None else _entries(include, "include"),
                   _entries(exclude or (), "exclude"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelFilter:
        """From ``{"include": [...], "exclude": [...]}`` (both optional, nothing else)."""
        if not isinstance(data, Mapping):
            raise InvalidInputError("a label filter must be an object with include / exclude")
        unknown = set(data) - {"include", "exclude"}
        if unknown:
            raise InvalidInputError(f"unknown label filter key(s): {sorted(unknown)}")
        return cls.of(data.get("include"), data.get("exclude"))

    @property
    def is_open(self) -> bool:
        """True when it allows every label (no include list, nothing excluded)."""
        return self.include is None and not self.exclude

    def to_dict(self) -> dict[str, list[str]]:
        out = {"exclude": list(self.exclude)}
        if self.include is not None:
            out["include"] = list(self.include)
        return out


#: what the predictor accepts as a filter: one, as an object or a dict, or several to intersect
FilterSpec = LabelFilter | Mapping[str, Any] | Sequence[LabelFilter | Mapping[str, Any]]


def normalize(spec: FilterSpec | None) -> tuple[LabelFilter, ...]:
    """The filters of ``spec`` normalized, open ones dropped: () means no filtering."""
    if spec is None:
        return ()
    if isinstance(spec, (LabelFilter, Mapping)):
        spec = [spec]
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise InvalidInputError("a label filter must be an object with include / exclude")
    out = []
    for f in spec:
        f = f if isinstance(f, LabelFilter) else LabelFilter.from_dict(f)
        if not f.is_open:
            out.append(f)
    return tuple(out)


def _raw_key(spec: FilterSpec) -> Hashable | None:
    """A cache key of ``spec`` as given (lists in their order), or None where only
    :func:`normalize` can tell what it means. Equal raw keys normalize equally."""
    if isinstance(spec, LabelFilter):
        return spec
    if isinstance(spec, Mapping):
        if not set(spec) <= {"include", "exclude"}:
            return None
        parts = []
        for name in ("include", "exclude"):
            v = spec.get(name)
            if v is not None and not isinstance(v, (list, tuple)):
                return None
            parts.append(None if v is None else tuple(v))
        try:
            hash(parts[0]), hash(parts[1])
        except TypeError:  # an entry that is no string: normalize says so
            return None
        return ("raw", *parts)
    if isinstance(spec, (list, tuple)):
        keys = tuple(_raw_key(f) for f in spec)
        return None if any(k is None for k in keys) else ("all", keys)
    return None


def _entries(values: Iterable[str], field: str) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        raise InvalidInputError(f"filter {field} must be a list of label names, not a string")
    out = set()
    for v in values:
        if not isinstance(v, str) or not v:
            raise InvalidInputError(f"filter {field} entries must be non-empty strings, "
                                    f"got {v!r}")
        out.add(v)
    return tuple(sorted(out))


class FilterCompiler:
    """Compiles filters for one model: label names -> allowed-label mask -> allowed-node mask;
    thread-safe, node masks cached (LRU of ``cache_size``)."""

    def __init__(self, label_names: Sequence[str], ensemble: Ensemble, *,
                 cache_size: int = CACHE_SIZE) -> None:
        self.n_labels = len(label_names)
        self._names = label_names
        self._ensemble = ensemble
        self._sorted: list[str] | None = None  # built on first use: most models never filter
        self._order: np.ndarray | None = None
        self._cache: OrderedDict[Hashable, np.ndarray] = OrderedDict()  # raw and normalized keys
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def node_mask(self, spec: FilterSpec | None) -> np.ndarray | None:
        """bool (n_nodes,) allowed-node mask of ``spec``, or None when it filters nothing.
        The array is shared between calls: read it, never write it."""
        if spec is None:
            return None
        # a repeated filter is found by its lists as given: normalizing (checking and
        # sorting) 1,000 names costs more than the search they filter
        raw = _raw_key(spec)
        mask = self._cached(raw) if raw is not None else None
        if mask is not None:
            return mask
        key = normalize(spec)
        if not key:
            return None
        mask = self._cached(key)
        if mask is None:
            mask = self._nodes_of(self.label_mask(key))
            mask.flags.writeable = False
        with self._lock:
            for k in (key, raw) if raw is not None else (key,):
                self._cache[k] = mask
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return mask

    def _cached(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            mask = self._cache.get(key)
            if mask is not None:
                self._cache.move_to_end(key)
            return mask

    def label_mask(self, spec: FilterSpec | None) -> np.ndarray:
        """bool (n_labels,): the labels every filter of ``spec`` allows."""
        allowed = np.ones(self.n_labels, dtype=bool)
        for f in normalize(spec):
            if f.include is not None:
                allowed &= self._matches(f.include)
            if f.exclude:
                allowed &= ~self._matches(f.exclude)
        return allowed

    def _matches(self, entries: Sequence[str]) -> np.ndarray:
        """bool (n_labels,): labels matched by any entry; unknown exact names raise."""
        names, order = self._sorted_names()
        hit = np.zeros(self.n_labels, dtype=bool)
        unknown = []
        for entry in entries:
            if entry.endswith("*"):
                lo, hi = _prefix_range(names, entry[:-1])
                hit[order[lo:hi]] = True
                continue
            i = bisect_left(names, entry)
            if i < len(names) and names[i] == entry:
                hit[order[i]] = True
            else:
                unknown.append(entry)
        if unknown:
            raise UnknownLabelError(unknown)
        return hit

    def _sorted_names(self) -> tuple[list[str], np.ndarray]:
        with self._lock:
            if self._sorted is None:
                order = sorted(range(self.n_labels), key=self._names.__getitem__)
                self._order = np.asarray(order, dtype=np.int64)
                self._sorted = [self._names[i] for i in order]
            assert self._order is not None  # set together with _sorted
            return self._sorted, self._order

    def _nodes_of(self, allowed_labels: np.ndarray) -> np.ndarray:
        """Allowed-node mask: the leaves of the allowed labels in every tree and, layer by
        layer up, every ancestor of one."""
        ens = self._ensemble
        mask = np.zeros(ens.n_nodes, dtype=bool)
        frontier = np.unique(np.asarray(ens.label_node)[:, allowed_labels].ravel())
        parent = np.asarray(ens.parent)
        while frontier.size:
            mask[frontier] = True
            up = np.unique(parent[frontier])
            up = up[up >= 0]
            frontier = up[~mask[up]]
        return mask


def _prefix_range(names: list[str], prefix: str) -> tuple[int, int]:
    """Positions lo..hi of the sorted ``names`` that start with ``prefix``."""
    lo = bisect_left(names, prefix)
    # the first string above every one starting with prefix: its last character (that is
    # not already the largest) plus one
    stem = prefix.rstrip(_MAX_CHAR)
    if not stem:
        return lo, len(names)
    return lo, bisect_left(names, stem[:-1] + chr(ord(stem[-1]) + 1), lo)
