"""Annif-style files made from the tiny synthetic corpus: a subject vocabulary (TSV, CSV,
SKOS Turtle) and a short-text corpus, for the tests of the Annif formats and API."""

from __future__ import annotations

import csv
from pathlib import Path

BASE = "http://example.org/subject/"


def uri(name: str) -> str:
    return BASE + name.replace("/", "-")


def pref_label(name: str) -> str:
    """Unique and without spaces, so a corpus line may give it bare instead of the URI."""
    return "label-" + name.rsplit("/", 1)[1]


def notation(name: str) -> str | None:
    """Every other subject has a notation, so both cases are seen."""
    number = int(name.rsplit("/", 1)[1][1:])
    return f"{number // 10}.{number % 10}" if number % 2 == 0 else None


def write_vocab_tsv(path: Path, names: list[str]) -> Path:
    lines = []
    for name in names:
        cols = [f"<{uri(name)}>", pref_label(name)]
        if notation(name) is not None:
            cols.append(str(notation(name)))
        lines.append("\t".join(cols))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_vocab_csv(path: Path, names: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["uri", "label_fi", "label_en", "notation"])
        for name in names:
            w.writerow([uri(name), "fi-" + pref_label(name), pref_label(name),
                        notation(name) or ""])
    return path


def write_vocab_ttl(path: Path, names: list[str]) -> Path:
    out = ["@prefix skos: <http://www.w3.org/2004/02/skos/core#> .", ""]
    for name in names:
        out.append(f"<{uri(name)}> a skos:Concept ;")
        out.append(f'    skos:prefLabel "{pref_label(name)}"@en, "fi-{pref_label(name)}"@fi'
                   + (f' ;\n    skos:notation "{notation(name)}" .' if notation(name) else " ."))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def write_annif_corpus(path: Path, docs: list[dict], bare_every: int = 4) -> Path:
    """``text<TAB><uri> ...``; every ``bare_every``-th document gives its first subject by
    its bare label instead, as Annif corpora may."""
    lines = []
    for i, doc in enumerate(docs):
        subjects = [f"<{uri(n)}>" for n in doc["labels"]]
        if i % bare_every == 0 and doc["labels"]:
            subjects[0] = pref_label(doc["labels"][0])
        lines.append(f"{doc['text']}\t{' '.join(subjects)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
