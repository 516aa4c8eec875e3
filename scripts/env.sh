# Sourced by the other scripts: make .venv (Python 3.11+) and install the package with
# the extras named in $RQML_EXTRAS, holding Dask to the version dask-cuda accepts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.rqml-installed-${RQML_EXTRAS:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q -c constraints.txt -e ".${RQML_EXTRAS:+[$RQML_EXTRAS]}"
    touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
