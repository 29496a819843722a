"""The inference layer, and scripts/cuda_check.py which uses it, need torch and transformers
only: a GPU machine that has just those runs the CUDA check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = """
import sys
# None in sys.modules: `import x` raises ModuleNotFoundError, importlib.util.find_spec says absent
for name in ("strawberry", "sqlmodel", "sqlalchemy", "pydantic", "pydantic_settings", "starlette", "uvicorn",
             "rich", "typer", "redis", "httpx", "websockets", "psycopg", "alembic"):
    sys.modules[name] = None
import app.inference.engine, app.inference.model, app.inference.fidelity, app.inference.backends
import runpy
runpy.run_path("scripts/cuda_check.py", run_name="not_main")
print("ok")
"""


def test_the_inference_layer_and_the_cuda_check_import_without_the_api_stack():
    out = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
