"""Benchmark decode: `python bench/bench_decode.py [options]` is `kvkernels bench decode [options]`.

See `python bench/bench_decode.py --help` and bench/README.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from kvkernels.benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["decode", *sys.argv[1:]]))
