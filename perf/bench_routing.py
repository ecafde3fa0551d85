"""Routing benchmark entry point: ``python -m perf.bench_routing --help``.

Deliberately tiny: every worker process is started with multiprocessing's
"spawn", which re-imports this __main__ module in each child. Keeping the real
work in perf.cli saves each of up to 500 children ~25 ms of imports.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see perf/cli.py and perf/README.md)."""
    from perf.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
