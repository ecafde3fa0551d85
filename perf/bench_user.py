"""User benchmark entry point: ``python -m perf.bench_user --help``.

Deliberately tiny, like perf/bench_routing.py: every worker process is started with
multiprocessing's "spawn", which re-imports this __main__ module in each child.
The work is in perf/user/ (perf/README.md, "User benchmark").
"""

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see perf/user/cli.py)."""
    from perf.user.cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
