#!/usr/bin/env python3
"""InferQL benchmark: the GraphQL `generate` subscription against the engine called directly.

    python scripts/bench.py [--smoke | --jobs-only | --peer ...]   (--help for every flag)

The code is in scripts/benchlib/ (cli, server, machine, streams, peer, fidelity, jobs,
report; its __init__ says what is measured and how); the server it starts is the tests'
harness, tests/harness.py. This file only puts the repository root on sys.path, for `app`
and `tests.harness`, and runs benchlib.cli.main.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchlib.cli import main  # noqa: E402  (scripts/ is sys.path[0] when run as a script)

if __name__ == "__main__":
    sys.exit(main())
