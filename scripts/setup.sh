#!/usr/bin/env bash
# Creates .venv in the repository root and installs jointdiff with its test dependencies.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# torch 2.14.1 with torchvision 0.29.1 is the tested pair (lpips imports torchvision).
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.jointdiff-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setting up .venv (first run installs torch and diffusers; this takes a few minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_PINS[@]}"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
fi
