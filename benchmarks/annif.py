"""Annif 1.4.3 (omikuji backend) and xmc-serve side by side, through Annif's REST API:
``python -m benchmarks.annif ../shared/data/cooking_stackexchange``.

Both are fed the same Annif files made from the cooking questions (a TSV vocabulary, label
``eggs`` -> ``<http://example.org/cooking/eggs>``, and a short-text TSV corpus), both are
served with 2 worker processes on loopback, and both are asked the same questions with the
same code: accuracy from ``suggest`` through ``annif-client`` (P@1, P@5 over the test set),
``suggest`` requests/s with p50/p99 at concurrency 1 and 16 (every text unique: no cache
helps), ``suggest-batch`` documents/s (batches of 32, Annif's maximum), server memory
(RSS and PSS of the process tree) and the model's size on disk.

Annif runs from ``benchmarks/.venv-annif`` (``bash benchmarks/annif_env.sh``) as its docs
advise for production: gunicorn with uvicorn workers. Every Annif analyzer needs NLTK's
``punkt_tab`` data and downloads it when missing, which cannot work here; NLTK's own
unsupervised ``PunktTrainer``, trained on the training texts and saved in the punkt_tab
layout under ``$NLTK_DATA``, stands in for it (``english`` only splits sentences; the
snowball analyzer then stems words as usual).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from benchmarks.http import free_port, run_python

HERE = Path(__file__).resolve().parent
ANNIF_VENV = HERE / ".venv-annif"
PROJECT = "cooking"
BASE_URI = "http://example.org/cooking/"

_PROJECTS_CFG = """[{project}]
name=Cooking questions (omikuji)
language=en
backend=omikuji
analyzer=snowball(english)
vocab={project}
limit=100
"""

_PUNKT = """
import sys
from nltk.tokenize.punkt import PunktTrainer, save_punkt_params
trainer = PunktTrainer()
trainer.train(open(sys.argv[1], encoding="utf-8").read(), finalize=True)
save_punkt_params(trainer.get_params(), sys.argv[2])
"""


def uri(label: str) -> str:
    return BASE_URI + urllib.parse.quote(label, safe="")


def prepare(data: Path, work: Path) -> tuple[list[str], list[list[str]]]:
    """vocab.tsv, train.tsv and train.txt (for punkt) in ``work``; returns the test texts and
    their gold URIs."""
    from models.data import read_corpus

    train, test = read_corpus(data / "train.jsonl"), read_corpus(data / "test.jsonl")
    labels = sorted({lab for doc in train.labels for lab in doc})
    (work / "vocab.tsv").write_text("".join(f"<{uri(lab)}>\t{lab}\n" for lab in labels))

    def clean(text: str) -> str:
        return " ".join(text.split())

    with (work / "train.tsv").open("w") as fh:
        for text, labs in zip(train.texts or [], train.labels):
            fh.write(f"{clean(text)}\t{' '.join(f'<{uri(lab)}>' for lab in labs)}\n")
    (work / "train.txt").write_text("\n".join(train.texts or []))
    keep = [i for i, labs in enumerate(test.labels) if labs]
    return ([clean((test.texts or [])[i]) for i in keep],
            [[uri(lab) for lab in test.labels[i]] for i in keep])  # fmt: skip


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})},
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def annif_env(work: Path) -> dict[str, str]:
    return {"NLTK_DATA": str(work / "nltk_data"), "ANNIF_PROJECTS": str(work / "projects.cfg"),
            "PATH": f"{ANNIF_VENV / 'bin'}:{os.environ['PATH']}"}  # fmt: skip


def build_annif(work: Path) -> dict[str, Any]:
    """punkt_tab from PunktTrainer, then load-vocab and train, timed."""
    punkt = work / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    punkt.parent.mkdir(parents=True, exist_ok=True)
    py = str(ANNIF_VENV / "bin" / "python")
    run([py, "-c", _PUNKT, str(work / "train.txt"), str(punkt)], work)
    (work / "projects.cfg").write_text(_PROJECTS_CFG.format(project=PROJECT))
    env, annif = annif_env(work), str(ANNIF_VENV / "bin" / "annif")
    run([annif, "load-vocab", PROJECT, str(work / "vocab.tsv"), "--language", "en"], work, env)
    seconds = run([annif, "train", PROJECT, str(work / "train.tsv")], work, env)
    return {"train_seconds": round(seconds, 1),
            "model_mb": du_mb(work / "data" / "projects" / PROJECT)}  # fmt: skip


def build_xmc(work: Path) -> dict[str, Any]:
    """The migration guide's own command: Annif's corpus and vocabulary, unchanged."""
    out = work / "bundle"
    seconds = run([sys.executable, "-m", "xmc.cli", "build", str(work / "train.tsv"),
                   "--vocab", str(work / "vocab.tsv"), "--vocab-language", "en",
                   "--name", PROJECT, "--out", str(out), "--force"], Path.cwd())  # fmt: skip
    return {"train_seconds": round(seconds, 1), "model_mb": du_mb(out)}


def du_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def start(kind: str, work: Path, port: int) -> subprocess.Popen[bytes]:
    if kind == "annif":
        argv = [str(ANNIF_VENV / "bin" / "gunicorn"), "annif:create_app()", "--workers", "2",
                "--worker-class", "uvicorn.workers.UvicornWorker", "--timeout", "600",
                "--bind", f"127.0.0.1:{port}"]  # fmt: skip
        env = {**os.environ, **annif_env(work)}
    else:
        argv = [sys.executable, "-m", "xmc.cli", "serve", str(work / "bundle"), "--port",
                str(port), "--workers", "2"]  # fmt: skip
        env = {**os.environ, "XMC_ACCESS_LOG": "false", "XMC_LRU_SIZE": "0"}
    return subprocess.Popen(argv, cwd=work if kind == "annif" else Path.cwd(), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def wait_ready(client: Any, proc: subprocess.Popen[bytes], deadline_s: float = 300) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            client.suggest(PROJECT, "warm up the model")  # Annif loads a project lazily
            return
        except Exception:
            time.sleep(0.5)
    raise SystemExit("server never answered")


def memory_mb(pid: int) -> dict[str, float]:
    """RSS and PSS summed over the server and its children (workers share mapped files:
    PSS counts a shared page once in all)."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    rss = pss = 0
    for p in pids:
        for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return {"rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1)}


def accuracy(client: Any, texts: list[str], gold: list[list[str]]) -> dict[str, float]:
    p1 = p5 = 0.0
    for text, truth in zip(texts, gold):
        uris = [r["uri"] for r in client.suggest(PROJECT, text, limit=5)]
        p1 += float(bool(uris) and uris[0] in truth)
        p5 += sum(u in truth for u in uris[:5]) / 5
    return {"P@1": round(100 * p1 / len(texts), 2), "P@5": round(100 * p5 / len(texts), 2)}


def load(port: int, texts: list[str], seconds: float) -> dict[str, Any]:
    form = [urllib.parse.urlencode({"text": t, "limit": 5}).encode() for t in texts]
    out: dict[str, Any] = {}
    path = f"/v1/projects/{PROJECT}/suggest"
    for c in (1, 16):
        r = run_python(port, path, form, True, c, seconds, 200_000,
                       content_type="application/x-www-form-urlencoded", marker=b"text=",
                       space=b"+")  # fmt: skip
        out[f"c{c}"] = {"req_per_s": round(r["requests"] / r["seconds"], 1),
                        "p50_ms": round(r["p50_ms"], 2), "p99_ms": round(r["p99_ms"], 2),
                        "errors": r["errors"]}  # fmt: skip
    batches = [json.dumps({"documents": [{"document_id": str(j), "text": t}
                                         for j, t in enumerate(texts[i:i + 32])]}).encode()
               for i in range(0, len(texts) - 32, 32)]  # fmt: skip
    r = run_python(port, f"/v1/projects/{PROJECT}/suggest-batch?limit=5", batches, True, 2,
                   seconds, 200_000)  # fmt: skip
    out["batch_docs_per_s"] = round(32 * r["requests"] / r["seconds"], 1)
    out["batch_errors"] = r["errors"]
    return out


def measure(kind: str, work: Path, texts: list[str], gold: list[list[str]],
            seconds: float) -> dict[str, Any]:  # fmt: skip
    import annif_client

    port = free_port()
    proc = start(kind, work, port)
    try:
        client = annif_client.AnnifClient(api_base=f"http://127.0.0.1:{port}/v1/")
        wait_ready(client, proc)
        result: dict[str, Any] = {"accuracy": accuracy(client, texts, gold)}
        result.update(load(port, texts, seconds))
        result["memory"] = memory_mb(proc.pid)
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="folder with train.jsonl and test.jsonl")
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "annif")
    ap.add_argument("--seconds", type=float, default=10.0, help="per load scenario")
    ap.add_argument("--n-eval", type=int, default=2000, help="test documents for P@k")
    args = ap.parse_args(argv)
    if not (ANNIF_VENV / "bin" / "annif").exists():
        raise SystemExit("no Annif venv: bash benchmarks/annif_env.sh")
    args.work = args.work.resolve()  # Annif runs from inside it
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    texts, gold = prepare(args.data, args.work)
    texts, gold = texts[:args.n_eval], gold[:args.n_eval]
    results = {"annif": build_annif(args.work), "xmc": build_xmc(args.work)}
    for kind in ("annif", "xmc"):
        results[kind].update(measure(kind, args.work, texts, gold, args.seconds))
        print(kind, json.dumps(results[kind]), flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
