#!/usr/bin/env bash
# Create (or reuse) the project's Python 3.12 virtual environment and install vq_megatron into it.
# Env: VENV (default .venv), PYTHON (a python3.12 to build the venv with; found via pyenv otherwise),
#      EXTRAS (default "test").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-test}"

find_python312() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  if PYENV_VERSION=3.12.1 python3.12 --version >/dev/null 2>&1; then echo "env PYENV_VERSION=3.12.1 python3.12"; return; fi
  if command -v python3.12 >/dev/null 2>&1; then echo python3.12; return; fi
  echo "error: Python 3.12 is required (megatron-core >= 0.17); set PYTHON=/path/to/python3.12" >&2
  exit 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
  PY="$(find_python312)"
  echo "[setup] creating $VENV with $($PY --version)"
  $PY -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "[setup] installing vq_megatron[$EXTRAS] (first time: torch + megatron-core + deepspeed, a few minutes)"
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
echo "[setup] ready: $VENV ($("$VENV/bin/python" --version))"
