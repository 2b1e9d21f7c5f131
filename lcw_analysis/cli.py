"""``lcw-analysis``: run study notebooks over parameter grids, collect results, build a report.

    lcw-analysis list [STUDY ...]
    lcw-analysis run STUDY|all [-p key=value ...] [-f params.yaml] [--preset quick|full]
                     [--grid key=v1,v2 ...] [--seeds N] [--workers N] [--scheduler ADDRESS]
                     [--out runs/]
    lcw-analysis collect [--out runs/]
    lcw-analysis report [--out runs/]

Exit status: 0 ok, 1 some run failed, 2 bad input (nothing was started).
"""

from __future__ import annotations

import argparse
import sys

from .runner import (
    RUNNER_OWNED,
    StudyError,
    discover_studies,
    parse_assignments,
    parse_grid,
    preset_path,
    run_studies,
    select_studies,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    nb = argparse.ArgumentParser(add_help=False)
    nb.add_argument(
        "--notebooks",
        metavar="DIR",
        default=None,
        help="folder of NN_name.ipynb study notebooks (default ./notebooks)",
    )
    outp = argparse.ArgumentParser(add_help=False)
    outp.add_argument("--out", metavar="DIR", default="runs", help="runs folder (default runs)")

    parser = argparse.ArgumentParser(
        prog="lcw-analysis",
        description="Batch-run the lcw-analysis study notebooks (papermill), collect and report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("list", parents=[nb], help="studies and their parameters")
    ls.add_argument("studies", nargs="*", metavar="STUDY", help="studies to show (default all)")

    run = sub.add_parser(
        "run",
        parents=[nb, outp],
        help="run studies over a parameter grid",
        description="Parameters resolve as: notebook defaults < preset < -f "
        "files < -p < --grid/--seeds. Completed runs are skipped.",
    )
    run.add_argument(
        "studies",
        nargs="+",
        metavar="STUDY",
        help="'all', a full stem (01_activation_shift), a name or a number (01)",
    )
    run.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a parameter (value parsed as YAML, checked against its type)",
    )
    run.add_argument(
        "-f",
        "--params-file",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML mapping of parameters (repeatable, later wins)",
    )
    run.add_argument(
        "--preset",
        metavar="NAME",
        default=None,
        help="quick (the notebook defaults) or full: <notebooks>/presets/<stem>.<NAME>.yaml",
    )
    run.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="sweep a parameter (repeatable: Cartesian product)",
    )
    run.add_argument("--seeds", type=int, default=None, metavar="N", help="sweep seed = 0..N-1")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="notebooks run at once on this machine (default 1)",
    )
    run.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        help="Dask scheduler address (tcp://host:8786): run on that cluster",
    )
    run.add_argument(
        "--kernel", default="python3", metavar="NAME", help="Jupyter kernel name (default python3)"
    )
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="OMP/MKL threads per kernel (default max(1, cores // workers))",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="per-cell execution timeout (default none)",
    )
    run.add_argument("--force", action="store_true", help="rerun completed runs too")
    run.add_argument("--dry-run", action="store_true", help="show the runs, execute nothing")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    col = sub.add_parser("collect", parents=[outp], help="all runs' results as one CSV table")
    col.add_argument(
        "--csv",
        metavar="FILE",
        default=None,
        help="also write the table here (always written to <out>/results.csv)",
    )
    sub.add_parser("report", parents=[outp], help="build <out>/report/index.html")
    return parser


def _list(args) -> int:
    studies = discover_studies(args.notebooks)
    chosen = select_studies(args.studies or ["all"], studies)
    for study in chosen:
        print(f"{study.stem}  ({study.path})")
        params = study.parameters
        if not params:
            print("  (no cell tagged 'parameters': cannot be run)")
        width = max(
            (len(f"{p.name}: {p.type_name} = {_default(p)}") for p in params.values()), default=0
        )
        for p in params.values():
            head = f"{p.name}: {p.type_name} = {_default(p)}"
            note = "set by the runner (the run folder)" if p.name in RUNNER_OWNED else p.help
            print(f"  {head:<{width}}  {note}".rstrip())
        if params and "out_dir" not in params:
            print("  (no 'out_dir' parameter: cannot be run)")
        presets = []
        for name in study.presets():
            path = preset_path(study, name)
            presets.append(name if path.is_file() else f"{name} (defaults)")
        print(f"  presets: {', '.join(presets)}")
        print()
    return 0


def _default(p) -> str:
    return repr(p.default) if p.evaluated else str(p.default)


def _run(args) -> int:
    results = run_studies(
        args.studies,
        parse_assignments(args.param),
        params_files=args.params_file,
        preset=args.preset,
        grid=parse_grid(args.grid),
        seeds=args.seeds,
        workers=args.workers,
        scheduler=args.scheduler,
        out=args.out,
        notebooks_dir=args.notebooks,
        kernel_name=args.kernel,
        threads=args.threads,
        timeout=args.timeout,
        force=args.force,
        dry_run=args.dry_run,
        quiet=args.quiet,
    )
    if args.dry_run:
        for r in results:
            print(f"{r.status:>8}  {r.study}/{r.run_id}")
    return 1 if any(r.status == "failed" for r in results) else 0


def _collect(args) -> int:
    from .runner import COLLECTED_FILE, collect

    table = collect(args.out)
    if args.csv:
        table.to_csv(args.csv, index=False)
    n_runs = table["run_id"].nunique() if len(table) else 0
    print(f"{len(table)} rows from {n_runs} runs -> {args.out}/{COLLECTED_FILE}")
    return 0


def _report(args) -> int:
    from .report import build_report

    print(f"report -> {build_report(args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lcw-analysis`` console script."""
    args = _parser().parse_args(argv)
    command = {"list": _list, "run": _run, "collect": _collect, "report": _report}[args.command]
    try:
        return command(args)
    except StudyError as exc:
        print(f"lcw-analysis {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: unfinished runs will be rerun next time", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
