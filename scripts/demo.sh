#!/usr/bin/env bash
# Sets up .venv and runs the main job: a panorama on the built-in offline tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
HF_HUB_OFFLINE=1 .venv/bin/jointdiff run examples/panorama_tiny.toml "$@"
