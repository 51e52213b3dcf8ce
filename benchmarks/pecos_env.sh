#!/usr/bin/env bash
# Build benchmarks/.venv-pecos: PECOS (libpecos) in a virtual environment of its own.
#
# Why a separate venv: libpecos pins numpy<2 and scipy<1.14 and pulls torch, transformers,
# peft and datasets; none of that may leak into the project's .venv. The PECOS runner
# (benchmarks/peer_runners/pecos_runner.py) is started with this venv's python.
#
# torch is pinned and installed first: it comes from this machine's local wheel folder as a
# CPU build; left unpinned, libpecos' torch>=2.0 would pull a multi-GB CUDA build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-pecos"
python="${PYTHON:-python3.11}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --upgrade pip
"$venv/bin/pip" install "torch==2.13.0"
"$venv/bin/pip" install libpecos
"$venv/bin/python" -c "import pecos, numpy, scipy, torch; \
print('pecos ok', 'numpy', numpy.__version__, 'scipy', scipy.__version__, 'torch', torch.__version__)"
