"""`kvkernels` / `python -m kvkernels`: info, memory, bench, demo."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). Each module has `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "info": ("kvkernels.info", "versions, GPU, usable backends, extension build"),
    "memory": ("kvkernels.memory", "KV cache memory table for real models"),
    "bench": ("kvkernels.benchmark.cli", "benchmarks against the copy/matmul ceilings and peers"),
    "demo": ("kvkernels.demo", "generate with and without a KV cache through our kernels"),
}


def main(argv=None) -> int:
    from . import __version__
    parser = argparse.ArgumentParser(prog="kvkernels", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvkernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:  # a command whose module is missing still shows up, and says why
            p.set_defaults(_error=f"kvkernels {name}: unavailable ({e})")
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    if getattr(args, "_error", None):
        print(args._error, file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
