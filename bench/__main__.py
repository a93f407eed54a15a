"""``python -m bench [runner] [manager] [api] [flags]``; see each module's docstring."""

from __future__ import annotations

import argparse

from bench import api, compare, faults, manager, runner

BENCHMARKS = {
    "runner": runner, "manager": manager, "api": api, "faults": faults, "compare": compare,
}  # fmt: skip


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 10,100,1000") from None
    if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give increasing positive sizes")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {list(BENCHMARKS)})"
    )
    parser.add_argument(
        "--rounds", type=int, default=None,
        help="interleaved rounds (runner: 10, >= 10; api start-to-Running: 5, >= 5)",
    )  # fmt: skip
    parser.add_argument(
        "--idle", type=float, default=None,
        help="idle window in seconds (runner: 60; manager running VMs: 30)",
    )  # fmt: skip
    parser.add_argument(
        "--defined", type=_sizes, default=[10, 100, 1000],
        help="manager: defined VM counts, one growing store (default 10,100,1000)",
    )  # fmt: skip
    parser.add_argument(
        "--running", type=int, default=20,
        help=f"manager: most running tiny TCG VMs, steps 1, 10, N (default 20, at most "
        f"{manager.MAX_RUNNING}; 0 skips; 50 on 2 cores takes many minutes)",
    )  # fmt: skip
    parser.add_argument(
        "--calls", type=int, default=200, help="manager/api: get calls per size (>= 200)"
    )
    parser.add_argument(
        "--list-calls", type=int, default=None,
        help="list calls per size (manager: 200, >= 200; api: 30, >= 30)",
    )  # fmt: skip
    parser.add_argument(
        "--vms",
        type=int,
        default=None,
        help="api: defined VMs in the daemon (1000); faults: running VMs (3)",
    )
    parser.add_argument("--lock", type=float, default=3.0, help="faults: store lock held (s)")
    parser.add_argument(
        "--help-runs", type=int, default=10, help="api: corral --help runs (median)"
    )
    parser.add_argument(
        "--density", type=_sizes, default=[10, 50, 100],
        help="compare: running VMs per density wave, one daemon (default 10,50,100)",
    )  # fmt: skip
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    for name in args.names or list(BENCHMARKS):
        print(f"== {name}")
        if name == "runner":
            runner.main(args.rounds or 10, args.idle if args.idle is not None else 60.0)
        elif name == "manager":
            manager.main(
                args.defined, args.calls, args.list_calls or 200, args.running,
                args.idle if args.idle is not None else 30.0,
            )  # fmt: skip
        elif name == "api":
            api.main(
                args.vms or 1000, args.calls, args.list_calls or 30,
                args.rounds if args.rounds is not None else 5, args.help_runs,
            )  # fmt: skip
        elif name == "compare":
            compare.main(args.rounds or 5, args.vms or 1000, args.density)
        elif name == "faults":
            faults.main(args.rounds or 3, args.vms or 3, args.lock)


if __name__ == "__main__":
    main()
