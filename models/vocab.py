"""Subject vocabularies in Annif's formats, and the label metadata a bundle keeps from one.

A vocabulary gives each subject a URI, a label (in one language) and optionally a notation:

* TSV: ``<uri>\\tlabel[\\tnotation]`` a line (angle brackets optional);
* CSV: a header with ``uri``, one ``label_xx`` column per language and optionally
  ``notation``;
* SKOS (``.ttl``, ``.rdf``, ``.nt``, ...): every ``skos:Concept`` with its ``skos:prefLabel``
  in the chosen language and ``skos:notation``; needs rdflib (the ``build`` extra).

When a bundle is built with a vocabulary, a training label that is a subject's URI or label
becomes that URI (the label's identity), and ``label_meta.json`` stores uri, label and
notation for every label of the bundle, in label-id order. A bundle without that file loads
as before: each label is then its own name.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from models.errors import BundleError, DataError, InvalidInputError

log = logging.getLogger(__name__)

#: the bundle file of label metadata, aligned with labels.json
LABEL_META = "label_meta.json"
_SKOS_SUFFIXES = {".ttl": "turtle", ".rdf": "xml", ".xml": "xml", ".owl": "xml",
                  ".nt": "nt", ".n3": "n3", ".jsonld": "json-ld", ".trig": "trig"}  # fmt: skip


class LabelInfo(NamedTuple):
    """What a served label says about itself: uri and notation are None when unknown."""

    uri: str | None
    label: str
    notation: str | None


@dataclass
class Vocabulary:
    """Subjects by URI; ``source`` and ``language`` say where they came from."""

    subjects: dict[str, LabelInfo]
    source: str = ""
    language: str | None = None
    by_label: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # A label shared by two subjects names neither: only unique labels map to a URI.
        counts = Counter(s.label for s in self.subjects.values())
        self.by_label = {s.label: uri for uri, s in self.subjects.items()
                         if counts[s.label] == 1}  # fmt: skip

    def __len__(self) -> int:
        return len(self.subjects)

    def canonical(self, name: str) -> str:
        """The URI of the subject ``name`` is the URI or the label of; else ``name``."""
        if name in self.subjects:
            return name
        return self.by_label.get(name, name)

    def canonicalize(self, labels: Sequence[list[str]]) -> tuple[list[list[str]], int]:
        """Every document's labels as canonical names (order kept, repeats dropped) and the
        number of distinct names the vocabulary does not know."""
        unknown: set[str] = set()
        out = []
        for doc in labels:
            names = [self.canonical(name) for name in doc]
            unknown.update(n for n in names if n not in self.subjects)
            out.append(list(dict.fromkeys(names)))
        return out, len(unknown)

    def info(self, name: str) -> LabelInfo:
        return self.subjects.get(name) or LabelInfo(None, name, None)


def clean_uri(value: str) -> str:
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        return value[1:-1]
    return value


def read_vocab(path: str | Path, language: str | None = None) -> Vocabulary:
    """A vocabulary from a ``.tsv``, ``.csv`` or SKOS file (chosen by extension);
    ``language`` picks the label language of CSV and SKOS files (and names a TSV file's)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such vocabulary file", path)
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        subjects = dict(_read_tsv(path))
    elif suffix == ".csv":
        subjects, language = _read_csv(path, language)
    elif suffix in _SKOS_SUFFIXES:
        subjects, language = _read_skos(path, _SKOS_SUFFIXES[suffix], language)
    else:
        raise InvalidInputError(
            f"{path}: a vocabulary is .tsv, .csv or SKOS ({', '.join(sorted(_SKOS_SUFFIXES))})")
    if not subjects:
        raise DataError("the vocabulary has no subject", path)
    return Vocabulary(subjects, str(path), language)


def _read_tsv(path: Path) -> Iterator[tuple[str, LabelInfo]]:
    with path.open(encoding="utf-8-sig") as fh:
        try:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                vals = line.rstrip("\r\n").split("\t", 2)
                uri = clean_uri(vals[0])
                if not uri:
                    raise DataError("a line must start with a URI", path, line_no)
                label = vals[1].strip() if len(vals) > 1 and vals[1].strip() else uri
                notation = vals[2].strip() if len(vals) > 2 and vals[2].strip() else None
                yield uri, LabelInfo(uri, label, notation)
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text ({exc.reason})", path) from None


def _read_csv(path: Path, language: str | None) -> tuple[dict[str, LabelInfo], str | None]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        languages = [c[len("label_"):] for c in columns if c.startswith("label_")]
        if "uri" not in columns or not languages:
            raise DataError("the header must name 'uri' and at least one 'label_xx' column",
                            path, 1)  # fmt: skip
        language = language or languages[0]
        if language not in languages:
            raise InvalidInputError(f"{path}: no label_{language} column (has "
                                    f"{', '.join(languages)})")  # fmt: skip
        subjects = {}
        for row in reader:
            uri = clean_uri(row["uri"] or "")
            if not uri:
                raise DataError("empty uri", path, reader.line_num)
            label = (row.get(f"label_{language}") or "").strip() or uri
            notation = (row.get("notation") or "").strip() or None
            subjects[uri] = LabelInfo(uri, label, notation)
    return subjects, language


def _read_skos(path: Path, fmt: str, language: str | None
               ) -> tuple[dict[str, LabelInfo], str | None]:  # fmt: skip
    try:
        import rdflib
        from rdflib.namespace import RDF, SKOS
    except ImportError:
        raise InvalidInputError(
            "reading a SKOS vocabulary needs rdflib: pip install 'xmc-serve[build]'") from None
    graph = rdflib.Graph()
    try:
        graph.parse(path, format=fmt)
    except Exception as exc:  # rdflib raises many unrelated types for a bad file
        raise DataError(f"not a readable {fmt} file ({exc})", path) from None
    concepts = sorted({str(c) for c in graph.subjects(RDF.type, SKOS.Concept)})
    labels: dict[str, dict[str | None, str]] = {}
    for concept, label in graph.subject_objects(SKOS.prefLabel):
        labels.setdefault(str(concept), {})[getattr(label, "language", None)] = str(label)
    if language is None:
        # the most common label language, as a SKOS file often carries several
        found = Counter(lang for by_lang in labels.values() for lang in by_lang if lang)
        language = found.most_common(1)[0][0] if found else None
    subjects = {}
    for uri in concepts:
        by_lang = labels.get(uri, {})
        name = by_lang.get(language) or by_lang.get(None) or uri
        notation = graph.value(rdflib.URIRef(uri), SKOS.notation)
        subjects[uri] = LabelInfo(uri, name, str(notation) if notation is not None else None)
    return subjects, language


# ---------------------------------------------------------------------- bundle metadata
def write_label_meta(folder: Path, label_names: Sequence[str], vocab: Vocabulary) -> int:
    """Write ``label_meta.json`` for the bundle's labels; returns how many the vocabulary
    knows."""
    rows = [vocab.info(name) for name in label_names]
    payload = [{"uri": r.uri, "label": r.label, "notation": r.notation} for r in rows]
    (folder / LABEL_META).write_text(json.dumps(payload, ensure_ascii=False))
    return sum(1 for r in rows if r.uri is not None)


def read_label_meta(folder: Path, label_names: Sequence[str]) -> dict[str, LabelInfo]:
    """The metadata of a bundle's labels by name; empty when the bundle has none."""
    path = folder / LABEL_META
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"unreadable label metadata ({exc})", path) from None
    if not isinstance(rows, list) or len(rows) != len(label_names):
        raise BundleError(f"expected a list of {len(label_names)} label entries", path)
    out = {}
    for name, row in zip(label_names, rows):
        if not isinstance(row, dict) or not isinstance(row.get("label"), str):
            raise BundleError(f"label {name!r}: an entry needs a string 'label'", path)
        uri, notation = row.get("uri"), row.get("notation")
        if not (uri is None or isinstance(uri, str)) or not (
                notation is None or isinstance(notation, str)):
            raise BundleError(f"label {name!r}: uri and notation are strings or null", path)
        out[name] = LabelInfo(uri, row["label"], notation)
    return out


def describe(name: str, score: float, meta: Mapping[str, LabelInfo]) -> dict[str, Any]:
    """One ranked label as xmc-serve answers it: ``label`` (the vocabulary's label when the
    bundle has one, else the name as trained), ``score``, and ``uri`` / ``notation`` when
    known."""
    info = meta.get(name)
    if info is None:
        return {"label": name, "score": score}
    out: dict[str, Any] = {"label": info.label, "score": score}
    if info.uri is not None:
        out["uri"] = info.uri
    if info.notation is not None:
        out["notation"] = info.notation
    return out
