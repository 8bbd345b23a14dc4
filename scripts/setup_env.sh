#!/usr/bin/env bash
# Idempotent set-up shared by the README's commands: a virtual environment in .venv
# (reused when present), torch 2.13.0 installed first (from MASKSC_TORCH_INDEX when set), then
# masksc itself built with --no-build-isolation, so the build never fetches a torch of its own. Re-runs only what changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${MASKSC_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

if [ ! -x "$venv/bin/python" ]; then
  echo "[masksc] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

stamp="$venv/.masksc-install-stamp"
want=$(cat "$root/pyproject.toml" "$root/setup.py" "$root"/csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import masksc._C" 2>/dev/null; then
  exit 0
fi
echo "[masksc] installing dependencies (first run takes a few minutes)"
pip install -q --upgrade pip "setuptools>=68" wheel
# MASKSC_TORCH_INDEX: the index torch comes from (e.g. https://download.pytorch.org/whl/cpu on a CPU-only machine)
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0" ${MASKSC_TORCH_INDEX:+--index-url "$MASKSC_TORCH_INDEX"}
pip install -q --no-build-isolation -e "$root[test]"
echo "$want" > "$stamp"
echo "[masksc] environment ready: $venv"
