#!/usr/bin/env bash
# Build benchmarks/.venv-annif: Annif 1.4.3 with its omikuji backend, in a venv of its own.
#
# Why a separate venv: Annif pins numpy 2.2, scipy 1.15, scikit-learn 1.7 and starlette 1.6,
# none of which may leak into the project's .venv. benchmarks/annif.py starts Annif (and its
# gunicorn) with this venv's binaries.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-annif"
python="${PYTHON:-python3.11}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --upgrade pip
"$venv/bin/pip" install "annif[omikuji]==1.4.3"
"$venv/bin/python" -c "import annif, omikuji, nltk; print('annif ok, nltk', nltk.__version__)"
