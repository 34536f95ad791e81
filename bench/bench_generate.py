"""Benchmark generate: `python bench/bench_generate.py [options]` is `kvkernels bench generate [options]`.

See `python bench/bench_generate.py --help` and bench/README.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from kvkernels.benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
