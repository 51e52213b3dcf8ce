"""The ``xmc`` command as a user on a fresh clone meets it: every refusal is exit 2 with a
one-line message naming what is wrong, never a traceback, and the help says what is needed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from xmc.cli import _parser

REPO = Path(__file__).resolve().parents[2]


def xmc(*args: str, stdin: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xmc", *args], input=stdin, cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    return proc.stderr


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_eval_refuses_an_empty_file(tiny_bundle: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    refused(xmc("eval", str(tiny_bundle), str(empty)), "empty.jsonl", "no document")


def test_eval_refuses_a_file_without_labels(tiny_bundle: Path, tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "alpha beta"}, {"text": "gamma"}])
    refused(xmc("eval", str(tiny_bundle), str(plain)), "plain.jsonl", "no document has a label")


def test_eval_defaults_come_from_the_bundle(tiny_bundle: Path, tiny_docs, tmp_path: Path) -> None:
    test = write_jsonl(tmp_path / "test.jsonl", tiny_docs[1])
    proc = xmc("eval", str(tiny_bundle), str(test), "--json")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    got = json.loads(proc.stdout)
    assert (got["top_k"], got["beam_size"]) == (manifest["params"]["top_k"],
                                                manifest["params"]["beam_size"])


@pytest.mark.parametrize("texts", [("",), ("tag me", "   "), ("\t",)])
def test_predict_refuses_an_empty_text_argument(tiny_bundle: Path, texts: tuple[str, ...]) -> None:
    position = next(i for i, t in enumerate(texts, start=1) if not t.strip())
    proc = xmc("predict", str(tiny_bundle), *texts)
    refused(proc, f"text argument {position} is empty")
    assert proc.stdout == ""  # nothing predicted before the refusal


def test_predict_refuses_an_empty_stdin_line(tiny_bundle: Path, tiny_docs) -> None:
    first = tiny_docs[1][0]["text"]
    proc = xmc("predict", str(tiny_bundle), stdin=f"{first}\n\nnever reached\n")
    refused(proc, "stdin line 2 is empty")
    assert len(proc.stdout.splitlines()) == 1  # line 1 was answered


def test_predict_answers_stdin_lines(tiny_bundle: Path, tiny_docs) -> None:
    texts = [d["text"] for d in tiny_docs[1][:3]]
    proc = xmc("predict", str(tiny_bundle), "--top-k", "2", stdin="\n".join(texts) + "\n")
    assert proc.returncode == 0, proc.stderr
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(answers) == 3 and all(len(a["labels"]) == 2 for a in answers)


def test_build_help_shows_train_and_out_required() -> None:
    proc = xmc("build", "--help")
    assert proc.returncode == 0
    usage = proc.stdout.split("\n\n")[0]
    assert "[TRAIN]" not in usage and "TRAIN" in usage
    assert "--out OUT" in usage and "[--out OUT]" not in usage


def test_build_without_train_is_a_usage_error() -> None:
    refused(xmc("build", "--out", "x"), "TRAIN")


def test_print_default_params_needs_no_train() -> None:
    proc = xmc("build", "--print-default-params")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_trees"] >= 1


@pytest.mark.parametrize("command", ["build", "eval", "predict", "synth"])
def test_every_argument_has_help(command: str) -> None:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    missing = [a.dest for a in parser._actions if a.help is None]
    assert missing == []
    assert xmc(command, "--help").returncode == 0


def test_file_errors_name_the_file_not_line_zero(tmp_path: Path) -> None:
    err = refused(xmc("build", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")),
                  "missing.jsonl", "no such file")
    assert ":0" not in err


def test_a_directory_as_train_says_so(tmp_path: Path) -> None:
    refused(xmc("build", str(tmp_path), "--out", str(tmp_path / "o")), "is a directory")


def test_skipped_lines_are_reported_once(tiny_docs, tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    write_jsonl(train, tiny_docs[0])
    with train.open("a") as fh:
        fh.write("not json\n")
    proc = xmc("build", str(train), "--out", str(tmp_path / "b"), "--n-trees", "1",
               "--skip-bad-lines")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("skipped 1 malformed line") == 1, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["skipped_lines"] == 1


@pytest.mark.parametrize(("args", "words"), [
    (("predict", "{bundle}", "text", "--top-k", "0"), ("--top-k", "at least 1")),
    (("predict", "{bundle}", "text", "--beam-size", "-1"), ("--beam-size",)),
    (("eval", "{bundle}", "{missing}"), ("no such file",)),
    (("predict", "{tmp}", "text"), ("manifest",)),
    (("eval", "{missing}", "{missing}"), ("no such bundle",)),
    (("build", "{train}", "--out", "{tmp}/o", "--threads", "-3"), ("threads",)),
    (("build", "{train}", "--out", "{tmp}/o", "--params", "{badjson}"), ("parameters",)),
    (("build", "{train}", "--out", "{tmp}/o", "--fine-tune", "2"), ("fine_tune_epochs",
                                                                      "minilm")),
    (("synth", "--labels", "0", "--out", "{tmp}/s"), ("n_labels",)),
    (("serve", "{missing}"), ("not a bundle",)),
])
def test_bad_inputs_exit_2_with_a_message(tiny_bundle: Path, tiny_docs, tmp_path: Path,
                                          args: tuple[str, ...], words: tuple[str, ...]) -> None:
    (tmp_path / "bad.json").write_text("not json")
    train = write_jsonl(tmp_path / "train.jsonl", tiny_docs[0])
    names = {"bundle": str(tiny_bundle), "missing": str(tmp_path / "missing"),
             "tmp": str(tmp_path), "badjson": str(tmp_path / "bad.json"), "train": str(train)}
    refused(xmc(*(a.format(**names) for a in args)), *words)
