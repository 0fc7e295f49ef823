#!/usr/bin/env bash
# Sets up .venv and runs the test suite (offline, tiny models, one process per core).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The viewer test drives headless Chromium (Debian packages); skipped with JOINTDIFF_SKIP_BROWSER=1.
if [ -z "${JOINTDIFF_SKIP_BROWSER:-}" ]; then
  bash scripts/install-browser.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
workers=$(.venv/bin/python -c "import os; print(min(2, os.cpu_count() or 1))")
# loadgroup: tests marked xdist_group (the web UI's) share one process, so one app and one browser.
exec .venv/bin/python -m pytest -n "$workers" --dist loadgroup -q "$@"
