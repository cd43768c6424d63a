#!/usr/bin/env bash
# Set-up-and-go for a new machine: ./run.sh bench [harness options] | ./run.sh test [pytest options]
# Creates .venv if missing (reusing a system torch when one is installed, e.g. a CUDA build
# on a GPU machine; otherwise torch==2.13.0 + triton==3.6.0), installs the dev requirements
# and gsops itself (pip install --no-build-isolation -e .), then runs the job.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${GSOPS_VENV:-.venv}
PY=${PYTHON:-python3}

log=$(mktemp)
pip_install() {  # quiet unless it fails
  if ! "$VENV/bin/pip" install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -40 >&2; echo "run.sh: pip install $* failed" >&2; exit 1
  fi
}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "run.sh: creating $VENV on the system torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    echo "run.sh: creating $VENV with torch==2.13.0 triton==3.6.0 (about a minute)"
    "$PY" -m venv "$VENV"
    pip_install torch==2.13.0 triton==3.6.0
  fi
fi
stamp="$VENV/.gsops-installed-$(cat requirements-dev.txt setup.py pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "run.sh: installing requirements-dev.txt and gsops (pip install --no-build-isolation -e .)"
  pip_install -r requirements-dev.txt
  pip_install --no-build-isolation -e .
  rm -f "$VENV"/.gsops-installed-* && touch "$stamp"
fi
rm -f "$log"

job=${1:-}
shift || true
case "$job" in
  bench) exec "$VENV/bin/python" -m perf.harness "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest -q tests "$@" ;;
  *) echo "usage: ./run.sh bench [options] | ./run.sh test [pytest options]" >&2; exit 2 ;;
esac
