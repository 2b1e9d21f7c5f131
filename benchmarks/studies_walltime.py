"""Wall time of ``make studies`` at its defaults (every study notebook, then the report).

Runs the command in the repository root through a subprocess and prints the seconds it took and
its exit status; the command's own output goes to a log file (``--log``), not the terminal.
With ``--quick`` it only prints what it would run. Exits 1 if the command failed.

    python benchmarks/studies_walltime.py            # runs `make studies` (minutes)
    python benchmarks/studies_walltime.py --quick    # prints the command only
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ["make", "studies"]


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="print the command, run nothing")
    parser.add_argument("--command", default=shlex.join(COMMAND), help="the command to time")
    parser.add_argument("--log", default=None, help="where the command's output goes "
                        "(default: a file in the temporary directory)")
    args = parser.parse_args(argv)
    command = shlex.split(args.command)
    print("== studies_walltime: wall time of the studies at their defaults ==")
    print(harness.machine_description())
    print(f"command : {shlex.join(command)}  (in {ROOT})")
    if args.quick:
        print("QUICK MODE: not running it")
        row = {"command": shlex.join(command), "seconds": "not run", "exit": "—"}
        print(harness.table([row], ["command", "seconds", "exit"]))
        return row
    log = Path(args.log) if args.log else Path(tempfile.gettempdir()) / "lcw-studies-walltime.log"
    sys.stdout.flush()
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    row = {"command": shlex.join(command), "seconds": f"{seconds:.1f}", "exit": code}
    print(harness.table([row], ["command", "seconds", "exit"]))
    print(f"log     : {log}")
    if code != 0:
        print(f"the command failed (exit {code}); the last lines of its output:")
        print("\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]))
    sys.stdout.flush()
    return row


if __name__ == "__main__":
    sys.exit(0 if main()["exit"] in (0, "—") else 1)
