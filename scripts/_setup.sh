# Sourced by scripts/serve and scripts/test: make .venv, install, fetch the model.
# Idempotent: a second run only checks stamps (about a second).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.inferql-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing InferQL and its dependencies into .venv"
  # torch is pinned in pyproject.toml: an unpinned torch would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi

# Fetches and converts the default model on first run (progress bar); a no-op after.
if [ -z "${INFERQL_MODEL_PATH:-}" ]; then
  .venv/bin/inferql model pull
fi
