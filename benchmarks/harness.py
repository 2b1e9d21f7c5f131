"""Shared timing harness for the benchmarks: interleaved repetitions, paired ratios, tables.

Every benchmark measures its variants side by side in one process: each repetition runs every
variant once, in a fresh random order, and a variant's ratio is the median over repetitions of
``time(variant) / time(baseline)`` taken in the *same* repetition (paired, so slow drifts and
bursts of background load mostly cancel). Warm-up calls run before any timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_common_args(parser: argparse.ArgumentParser, reps: int) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check it runs")
    parser.add_argument("--reps", type=int, default=None, help=f"repetitions (default {reps})")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per variant")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: perf_counter (default); cpu: process time, steadier on a busy machine "
        "with --threads 1 (it counts every thread's CPU time, spin-waits included)",
    )
    parser.add_argument("--seed", type=int, default=0)


def setup(args: argparse.Namespace, reps: int, quick_reps: int = 2) -> None:
    """Apply ``--threads``/``--seed`` and resolve the repetition count."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.reps is None:
        args.reps = quick_reps if args.quick else reps
    if args.quick:
        args.warmup = min(args.warmup, 1)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One block of text: CPU model, cores, load, Python/torch versions and torch threads."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return "\n".join(
        [
            f"machine : {cpu_model()} | {os.cpu_count()} logical cores ({usable} usable) | "
            f"{platform.system()} {platform.release()}",
            f"software: Python {platform.python_version()} | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} "
            f"inter-op | MKL {torch.backends.mkl.is_available()} | "
            f"{torch.backends.cpu.get_cpu_capability()}",
            f"load avg: {load} (1, 5, 15 min) at start; other processes distort timings",
        ]
    )


@dataclass
class Timings:
    """Seconds per call, one entry per repetition, for each variant."""

    seconds: dict[str, list[float]]
    baseline: str

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratios(self, name: str) -> list[float]:
        base = self.seconds[self.baseline]
        return [t / b for t, b in zip(self.seconds[name], base, strict=True)]

    def ratio(self, name: str) -> float:
        """Median over repetitions of the paired ratio to the baseline."""
        return statistics.median(self.ratios(name))

    def spread(self, name: str) -> tuple[float, float]:
        """Quartiles of the paired ratio (min/max when there are fewer than four)."""
        r = sorted(self.ratios(name))
        if len(r) < 4:
            return r[0], r[-1]
        q = statistics.quantiles(r, n=4)
        return q[0], q[2]


def interleaved(
    variants: dict[str, Callable[[], object]],
    baseline: str,
    reps: int,
    inner: int = 1,
    warmup: int = 2,
    clock: str = "wall",
    seed: int = 0,
) -> Timings:
    """Time each variant ``inner`` calls per repetition, variants in a fresh random order each
    repetition, after ``warmup`` untimed calls each (also interleaved)."""
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {list(variants)}")
    now = CLOCKS[clock]
    rng = random.Random(seed)
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            fn = variants[name]
            start = now()
            for _ in range(inner):
                fn()
            seconds[name].append((now() - start) / inner)
    return Timings(seconds, baseline)


def status(ok: bool | None) -> str:
    return "—" if ok is None else ("PASS" if ok else "MISS")


def table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """A plain fixed-width text table (left-aligned first column, right-aligned others)."""
    cells = [[str(c) for c in columns]]
    for row in rows:
        cells.append([_fmt(row.get(c, "")) for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r: list[str]) -> str:
        pairs = enumerate(zip(r, widths, strict=True))
        return "  ".join((c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in pairs)

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def header(title: str, args: argparse.Namespace, extra: str = "") -> None:
    print(f"== {title} ==")
    print(machine_description())
    print(
        f"timing  : {args.reps} interleaved repetitions (random order each), {args.warmup} "
        f"warm-up call(s) per variant, clock={args.clock}; ratio = median over repetitions of "
        f"the paired ratio to the baseline, [q1, q3] its quartiles"
        + (f"; {extra}" if extra else "")
    )
    if args.quick:
        print("QUICK MODE: tiny sizes; the numbers and PASS/MISS mean nothing")
    sys.stdout.flush()
