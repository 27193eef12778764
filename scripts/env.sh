# Sourced by run.sh and test.sh: creates or reuses the virtual environment
# ($NOSTALGIA_VENV, default .venv in the repository) and installs the package
# with its test extras whenever pyproject.toml changed since the last install.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NOSTALGIA_VENV:-$REPO/.venv}"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV" >&2
  "$PYTHON_BIN" -m venv "$VENV"
fi
STAMP="$VENV/.nostalgia_jax-$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing nostalgia_jax and its dependencies (first run: a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -e "$REPO[test]" >&2
  rm -f "$VENV"/.nostalgia_jax-*
  touch "$STAMP"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
cd "$REPO"
