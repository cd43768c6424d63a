#!/usr/bin/env bash
# Set-up-and-go for a new machine:
#   ./run.sh bench [harness options]      the perf harness (perf/harness.py)
#   ./run.sh test [pytest options]        the test suite
#   ./run.sh gpu [--dry-run] OUTDIR       build, test and time everything on a GPU (perf/gpu_run.py);
#                                         --dry-run: the same steps on the CPU (interpreter, emulator)
# Which Python runs the job:
#   * the given one (PYTHON, else python3) when it already has torch: used as it is, no venv;
#     for bench/test, when it lacks some of requirements-dev.txt, a .venv is made that sees its
#     packages (torch included, even when PYTHON is itself a venv) and the missing ones are installed;
#   * else .venv (created with torch==2.13.0 triton==3.6.0 when missing), with requirements-dev.txt
#     and gsops itself (pip install --no-build-isolation -e .).
# The gpu job never downloads anything: it needs a Python with torch and says what else is missing.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${GSOPS_VENV:-.venv}
PY=${PYTHON:-python3}
job=${1:-}
shift || true
case "$job" in
  bench|test|gpu) ;;
  *) echo "usage: ./run.sh bench [options] | ./run.sh test [pytest options] | ./run.sh gpu [--dry-run] OUTDIR" >&2
     exit 2 ;;
esac

has_torch() { "$1" -c "import torch" >/dev/null 2>&1; }
missing_reqs() {  # the requirements-dev.txt distributions $1 cannot see, one line
  "$1" - requirements-dev.txt <<'EOF'
import importlib.metadata as md, re, sys
missing = []
for line in open(sys.argv[1]):
    name = re.split(r"[<>=!~;\[\s#]", line.strip(), maxsplit=1)[0]
    if name:
        try:
            md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
print(" ".join(missing))
EOF
}
log=$(mktemp)
pip_install() {  # quiet unless it fails
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -40 >&2; echo "run.sh: pip install $* failed" >&2; exit 1
  fi
}
run_direct() {  # run the job with $1 as it is: gsops and perf import from this tree
  local py=$1
  shift
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  rm -f "$log"
  case "$job" in
    bench) exec "$py" -m perf.harness "$@" ;;
    test)  exec "$py" -m pytest -q tests "$@" ;;
    gpu)   exec "$py" -m perf.gpu_run "$@" ;;
  esac
}

if [ "$job" = gpu ]; then
  if has_torch "$PY"; then
    gpy=$PY
  elif [ -x "$VENV/bin/python" ] && has_torch "$VENV/bin/python"; then
    gpy=$VENV/bin/python
  else
    echo "run.sh gpu: $PY has no torch (set PYTHON to a Python that has it; the gpu job installs nothing)" >&2
    exit 1
  fi
  miss=$(missing_reqs "$gpy")
  if [ -n "$miss" ]; then
    echo "run.sh gpu: $gpy lacks $miss; the steps that need them say so and the others run"
  fi
  run_direct "$gpy" "$@"
fi

if [ -x "$VENV/bin/python" ] && ! has_torch "$VENV/bin/python" && has_torch "$PY"; then
  # e.g. made with --system-site-packages from a Python that is itself a venv: it cannot see that torch
  echo "run.sh: $VENV cannot import torch but $PY can: recreating $VENV on $PY's packages"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ] && has_torch "$PY"; then
  miss=$(missing_reqs "$PY")
  if [ -z "$miss" ]; then
    run_direct "$PY" "$@"
  fi
  echo "run.sh: $PY has torch $("$PY" -c 'import torch; print(torch.__version__)') but lacks $miss:" \
       "creating $VENV on its packages and installing those"
  # a venv made from a venv does not see the parent's site-packages (--system-site-packages reaches only
  # the base interpreter's): a .pth file adds every site directory of $PY, so its torch is the one used.
  # No pip or setuptools of its own either: older bundled copies would shadow $PY's (torch may pin them).
  "$PY" -m venv --without-pip "$VENV"
  sitedir=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY" -c 'import site, sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
    >"$sitedir/gsops-parent-site.pth"
  "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m ensurepip -q
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "run.sh: creating $VENV with torch==2.13.0 triton==3.6.0 (about a minute)"
  "$PY" -m venv "$VENV"
  pip_install torch==2.13.0 triton==3.6.0
fi
stamp="$VENV/.gsops-installed-$(cat requirements-dev.txt setup.py pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "run.sh: installing requirements-dev.txt and gsops (pip install --no-build-isolation -e .)"
  pip_install -r requirements-dev.txt
  pip_install --no-build-isolation -e .
  rm -f "$VENV"/.gsops-installed-* && touch "$stamp"
fi

rm -f "$log"
case "$job" in
  bench) exec "$VENV/bin/python" -m perf.harness "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest -q tests "$@" ;;
esac
