"""Benchmark prefill: `python bench/bench_prefill.py [options]` is `kvkernels bench prefill [options]`.

See `python bench/bench_prefill.py --help` and bench/README.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from kvkernels.benchmark.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prefill", *sys.argv[1:]]))
