"""Run every benchmark, one fresh process each, and print everything (``make bench``).

    python benchmarks/run_all.py                   # full sizes (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick           # tiny sizes, to check they run
    python benchmarks/run_all.py --skip studies_walltime --threads 1 --clock cpu

Options other than ``--only``/``--skip`` are passed on to the timing benchmarks (``--quick`` to
all of them). Exits non-zero if a benchmark crashed; a MISS against a target is reported, not
an error.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("helmert_kernel", "layer_cost", "recorder_overhead", "studies_walltime")
TIMED = ("helmert_kernel", "layer_cost", "recorder_overhead")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check they run")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None)
    parser.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=())
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default=None)
    args = parser.parse_args(argv)
    chosen = [b for b in (args.only or BENCHMARKS) if b not in args.skip]
    failed = []
    for name in chosen:
        extra = ["--quick"] if args.quick else []
        if name in TIMED:
            for flag, value in (("--reps", args.reps), ("--threads", args.threads),
                                ("--clock", args.clock)):
                if value is not None:
                    extra += [flag, str(value)]
        command = [sys.executable, str(HERE / f"{name}.py"), *extra]
        print(f"\n######## {name} ########", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command)
        print(f"######## {name}: exit {code}, {time.perf_counter() - start:.1f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"\nFAILED to run: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
