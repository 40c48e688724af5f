#!/usr/bin/env python3
"""envlane benchmarks: `./build.sh bench [quick|full]` builds the modules and
installs the tools, then runs this. The work is in benches/envbench/: one
module per job (variants, load, callgrind, push, native, report, cli).
`python3 benches/run.py --help` for the knobs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from envbench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
