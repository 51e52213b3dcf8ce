"""Training on a Dask cluster: a two-worker LocalCluster builds the bundle a local build makes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from models.builder import build
from models.engine import DaskEngine, code_fingerprint
from models.errors import InvalidInputError
from tests.conftest import REPO, tiny_params
from xmc.cli import main


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def cluster_address():
    """A scheduler with two worker processes of one thread, each offering one tree slot.
    Under CI a cluster that cannot start is a failure, elsewhere a skip."""
    try:
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=None, resources={"xmc_tree": 1})
    except Exception as exc:  # ImportError without the [build] extra, or no worker starts
        if _ci():
            pytest.fail(f"a Dask LocalCluster must start under CI: {exc!r}")
        pytest.skip(f"no Dask LocalCluster here: {exc!r}")
    yield cluster.scheduler_address
    cluster.close()


def _ensemble_bytes(bundle) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(bundle.glob("*.npy"))} | {
        "labels.json": (bundle / "labels.json").read_bytes()}


def test_dask_bundle_is_byte_identical_to_the_local_one(cluster_address, tiny_bundle,
                                                        tiny_corpus, tmp_path):
    train, _ = tiny_corpus
    with DaskEngine(cluster_address) as engine:
        out = build(train, tmp_path / "tiny", tiny_params(), name="tiny", engine=engine)
    local = json.loads((tiny_bundle / "manifest.json").read_text())
    remote = json.loads((out / "manifest.json").read_text())
    assert remote["version"] == local["version"]
    theirs, ours = _ensemble_bytes(out), _ensemble_bytes(tiny_bundle)
    assert sorted(theirs) == sorted(ours) and len(ours) > 15
    assert [n for n in ours if theirs[n] != ours[n]] == []
    assert local["build"]["engine"] == {"kind": "local"}
    engine_record = remote["build"]["engine"]
    # 3 trees, two one-slot workers: both trained some
    assert engine_record == {"kind": "dask", "scheduler_host": "127.0.0.1", "n_workers": 2,
                             "worker_threads": 2, "workers_used": 2}
    assert remote["build"]["stages"]["train_tree2"]["on"] == "dask"


def test_cli_reads_xmc_dask_and_builds_the_same_bundle(cluster_address, tiny_bundle, tiny_docs,
                                                       tmp_path, monkeypatch, capsys):
    train_docs, _ = tiny_docs
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in train_docs))
    params = tmp_path / "params.json"
    params.write_text(tiny_params().to_json())
    monkeypatch.setenv("XMC_DASK", cluster_address)
    rc = main(["build", str(data), "--out", str(tmp_path / "b"), "--params", str(params)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == json.loads((tiny_bundle / "manifest.json").read_text())["version"]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["build"]["engine"]["kind"] == "dask"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:{port}", "not-an-address",
                                     "nonsense://host:8786"])
def test_bad_address_exits_2_with_a_message(address, tmp_path, capsys):
    address = address.format(port=_closed_port())
    rc = main(["build", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "b"),
               "--dask", address])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("xmc build: error: Dask scheduler ") and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_flag_wins_over_the_environment(cluster_address, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XMC_DASK", cluster_address)
    rc = main(["build", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "b"),
               "--dask", "not-an-address"])
    assert rc == 2 and "not-an-address" in capsys.readouterr().err


def test_local_builds_never_import_dask():
    code = ("import sys, xmc.cli, models.builder, models.engine\n"
            "assert models.engine.open_engine(None).describe() == {'kind': 'local'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


def test_workers_running_other_code_are_refused(cluster_address, monkeypatch):
    import numpy

    # the client process only: the workers keep the real version, so the fingerprints differ
    monkeypatch.setattr(numpy, "__version__", "0.0-not-the-workers")
    code_fingerprint.cache_clear()
    try:
        with pytest.raises(InvalidInputError, match=r"2 of 2 worker\(s\) run other xmc code"):
            DaskEngine(cluster_address)
    finally:
        monkeypatch.undo()
        code_fingerprint.cache_clear()
