"""``python -m bench [runner] [--rounds N] [--idle SECONDS]``."""

from __future__ import annotations

import argparse

from bench import runner

BENCHMARKS = {"runner": runner}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {list(BENCHMARKS)})"
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (>= 10)")
    parser.add_argument("--idle", type=float, default=60.0, help="idle window in seconds")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    for name in args.names or list(BENCHMARKS):
        print(f"== {name}")
        if name == "runner":
            runner.main(args.rounds, args.idle)


if __name__ == "__main__":
    main()
