"""Cost of recording: train-step time with the hook recorder, and its memory against the samples.

1. Time: a depth-50 width-100 sigmoid MLP, batch 128, SGD. Three copies of the same network
   side by side: no recorder, ``Recorder(model, every=1)`` and ``Recorder(model, every=10)``
   (all sites, the default). Each timed call is a block of 10 steps (``rec.begin_step(step)``
   before each), so an ``every=10`` block holds exactly one recorded step. Building the
   DataFrame (``rec.frame()``) happens after training and is not timed. Targets: every step
   ≤ 1.3×, every 10 steps ≤ 1.05×.
2. Memory: 1k, 10k and 100k samples through one fixed network (forward and backward, batches of
   1000, all in one recorded step, so the streaming accumulators merge them). Reported: the bytes
   the accumulators hold (``rec.state_numel()`` float64 elements × 8) against the bytes that
   keeping every preactivation ``z`` in float32 would need (samples × units summed over layers,
   × 4; counted, not allocated). Target: accumulator bytes flat in the number of samples.

    python benchmarks/recorder_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from lcw_analysis.models import build_mlp  # noqa: E402
from lcw_analysis.recorder import Recorder  # noqa: E402

REPS = 9
BLOCK = 10  # steps per timed call
TARGETS = {"every step": 1.3, "every 10 steps": 1.05}


def step_block(model: nn.Module, x, y, rec: Recorder | None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    state = {"step": 0}

    def run() -> None:
        for _ in range(BLOCK):
            if rec is not None:
                rec.begin_step(state["step"])
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            state["step"] += 1

    return run


def time_overhead(args, width: int, depth: int, batch: int) -> list[dict[str, object]]:
    x = torch.randn(batch, width)
    y = torch.randint(0, 10, (batch,))
    models = {}
    for name in ("no recorder", "every step", "every 10 steps"):
        torch.manual_seed(args.seed)
        models[name] = build_mlp(width, 10, depth, width, "sigmoid", "none")
    recorders = {"every step": Recorder(models["every step"], every=1),
                 "every 10 steps": Recorder(models["every 10 steps"], every=10)}
    variants = {name: step_block(model, x, y, recorders.get(name))
                for name, model in models.items()}
    for rec in recorders.values():
        rec.attach()
    try:
        t = harness.interleaved(variants, "no recorder", args.reps, 1, args.warmup, args.clock,
                                args.seed)
    finally:
        for rec in recorders.values():
            rec.remove()
    rows = []
    for name in variants:
        r = t.ratio(name)
        lo, hi = t.spread(name)
        target = TARGETS.get(name)
        rows.append({
            "recording": name,
            "ms/step": t.median(name) * 1e3 / BLOCK,
            "ratio": r,
            "[q1, q3]": f"[{lo:.3f}, {hi:.3f}]",
            "target": "" if target is None else f"≤ {target:.2f}",
            "status": "" if target is None else harness.status(r <= target),
        })
    print(f"\n-- time: MLP depth {depth} width {width} batch {batch} sigmoid, {BLOCK} steps per "
          "timed call --")
    print(harness.table(rows, ["recording", "ms/step", "ratio", "[q1, q3]", "target", "status"]))
    sys.stdout.flush()
    return rows


def memory_growth(args, samples: list[int], width: int, depth: int,
                  chunk: int) -> list[dict[str, object]]:
    torch.manual_seed(args.seed)
    model = build_mlp(width, 10, depth, width, "sigmoid", "none")
    units = sum(m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    rows = []
    for n in samples:
        with Recorder(model) as rec:
            rec.begin_step(0)
            done = 0
            while done < n:
                size = min(chunk, n - done)
                x = torch.randn(size, width)
                y = torch.randint(0, 10, (size,))
                model.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                done += size
            state = rec.state_numel() * 8
        rows.append({"samples": n, "accumulator bytes": state, "keep-all z bytes": n * units * 4,
                     "keep-all / accumulators": n * units * 4 / state})
    flat = len({r["accumulator bytes"] for r in rows}) == 1
    for r in rows:
        r["flat"] = harness.status(flat)
    print(f"\n-- memory: MLP depth {depth} width {width}, all sites, one recorded step, batches of "
          f"{chunk}; {units} preactivation units in all --")
    print(harness.table(rows, ["samples", "accumulator bytes", "keep-all z bytes",
                               "keep-all / accumulators", "flat"]))
    sys.stdout.flush()
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, object]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser, REPS)
    args = parser.parse_args(argv)
    harness.setup(args, REPS)
    harness.header("recorder_overhead: hook recorder time and memory", args)
    if args.quick:
        time_rows = time_overhead(args, width=8, depth=3, batch=4)
        mem_rows = memory_growth(args, [100, 1000], width=8, depth=3, chunk=100)
    else:
        time_rows = time_overhead(args, width=100, depth=50, batch=128)
        mem_rows = memory_growth(args, [1_000, 10_000, 100_000], width=100, depth=50,
                                 chunk=1000)
    return {"time": time_rows, "memory": mem_rows}


if __name__ == "__main__":
    main()
