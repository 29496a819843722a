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

# The frontend tests (tests/e2e/test_frontends.py) only: the pinned npm clients and a
# headless browser. Each step runs once; after that only its check (a stamp, a file).
if [ "$(basename "$0")" = test ]; then
  if command -v npm >/dev/null; then
    js_stamp=tests/js/node_modules/.inferql-npm-ci
    if [ ! -f "$js_stamp" ] || [ tests/js/package-lock.json -nt "$js_stamp" ]; then
      echo "==> installing the pinned npm packages of tests/js (npm ci)"
      (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
      touch "$js_stamp"
    fi
  else
    echo "==> npm not found: the frontend tests (Node clients, browser) will be skipped"
  fi
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "==> installing Debian's chromium for the browser tests"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "==> /usr/bin/chromium is missing and cannot be installed here (needs root and apt-get):"
      echo "    the browser test will be skipped. As root: apt-get install chromium"
    fi
  fi
fi
