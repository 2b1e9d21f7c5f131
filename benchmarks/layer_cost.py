"""Train-step cost of every weight-space variant and BN, as a ratio to the plain network.

A step is ``zero_grad → forward → loss → backward → SGD step``; the parametrized weight is
recomputed in every forward, so its materialization (and the backward through it) is part of the
step. ``lcw [cached]`` runs forward+backward inside ``parametrize.cached()`` (each weight is
materialized once per step either way; this shows the context's own cost). ``lcw [op-by-op]`` is
the pre-fusion Helmert implementation (``reference.py``) for comparison.

Networks: depth-50 sigmoid MLPs (``width`` inputs, ``width`` units, batch 128) at widths 100, 256
and 1024, and a stack of 8 3×3 convolutions (64 channels, 32×32 maps, ReLU, batch 16, global
average pool and a linear head). Targets: LCW/plain ≤ 1.05 where the fan-in is ≥ 512 and ≤ 1.25
below; LCW cheaper than BN everywhere.

    python benchmarks/layer_cost.py            # full sizes
    python benchmarks/layer_cost.py --quick    # tiny sizes, to check it runs
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from reference import OpByOpLCW  # noqa: E402

from lcw_analysis.models import apply_norm, build_mlp, init_weights  # noqa: E402
from lcw_analysis.parametrizations import constrain  # noqa: E402

NORMS = ("none", "lcw", "lcw-simple", "centered", "ws", "wn", "bn", "lcw+bn")
LABELS = {"none": "plain"}
EXTRA = ("lcw [cached]", "lcw [op-by-op]")
REPS = 9


def label(norm: str) -> str:
    return LABELS.get(norm, norm)


def conv_stack(
    norm: str, layers: int, channels: int, in_channels: int = 3, classes: int = 10
) -> nn.Module:
    """``layers`` 3×3 convs (+BN) with ReLU, global average pool, linear head; ``norm`` as in
    :func:`lcw_analysis.build_mlp` (``lcw-ref`` = the op-by-op reference LCW)."""
    use_bn = norm in ("bn", "lcw+bn")
    body: list[nn.Module] = []
    for i in range(layers):
        body.append(
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=not use_bn)
        )
        if use_bn:
            body.append(nn.BatchNorm2d(channels))
        body.append(nn.ReLU())
    model = nn.Sequential(
        *body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)
    )
    gain = math.sqrt(2.0)
    init_weights(model, gain)
    if norm == "lcw-ref":
        return constrain(model, OpByOpLCW)
    return apply_norm(model, norm, gain)


def mlp(norm: str, width: int, depth: int) -> nn.Module:
    if norm == "lcw-ref":
        return constrain(build_mlp(width, 10, depth, width, "sigmoid", "none", gain=4.0), OpByOpLCW)
    return build_mlp(width, 10, depth, width, "sigmoid", norm)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cached: bool = False):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.functional.cross_entropy

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if cached:
            with parametrize.cached():
                loss_fn(model(x), y).backward()
        else:
            loss_fn(model(x), y).backward()
        opt.step()

    return step


def target_for(fan_in: int) -> float:
    return 1.05 if fan_in >= 512 else 1.25


def measure(
    name: str,
    build: Callable[[str], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    fan_in: int,
    args: argparse.Namespace,
    inner: int,
) -> dict[str, object]:
    """Time every variant of one network side by side; print its table; return a summary row."""
    steps: dict[str, Callable[[], None]] = {}
    for norm in NORMS:
        torch.manual_seed(args.seed)
        model = build(norm)
        steps[label(norm)] = train_step(model, x, y)
        if norm == "lcw":
            steps["lcw [cached]"] = train_step(model, x, y, cached=True)
    torch.manual_seed(args.seed)
    steps["lcw [op-by-op]"] = train_step(build("lcw-ref"), x, y)
    t = harness.interleaved(
        steps, "plain", args.reps, inner, args.warmup, args.clock, args.seed
    )
    target = target_for(fan_in)
    bn = t.ratio("bn")
    rows = []
    for variant in steps:
        r = t.ratio(variant)
        lo, hi = t.spread(variant)
        row = {
            "variant": variant,
            "ms/step": t.median(variant) * 1e3,
            "ratio": r,
            "[q1, q3]": f"[{lo:.3f}, {hi:.3f}]",
            "target": "",
            "status": "",
            "< BN": "",
        }
        if variant in ("lcw", "lcw [cached]"):
            row["target"] = f"≤ {target:.2f}"
            row["status"] = harness.status(r <= target)
            row["< BN"] = harness.status(r < bn)
        rows.append(row)
    print(f"\n-- {name} (fan-in {fan_in}; {inner} step(s) per timed call) --")
    print(harness.table(rows, ["variant", "ms/step", "ratio", "[q1, q3]", "target", "status",
                               "< BN"]))
    sys.stdout.flush()
    lcw = t.ratio("lcw")
    return {
        "network": name,
        "plain ms": t.median("plain") * 1e3,
        "lcw": lcw,
        "lcw [cached]": t.ratio("lcw [cached]"),
        "lcw [op-by-op]": t.ratio("lcw [op-by-op]"),
        "centered": t.ratio("centered"),
        "bn": bn,
        "target": f"≤ {target:.2f}",
        "LCW ≤ target": harness.status(lcw <= target),
        "LCW < BN": harness.status(lcw < bn),
    }


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser, REPS)
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="MLP widths (default 100 256 1024)")
    parser.add_argument("--depth", type=int, default=None, help="MLP depth (default 50)")
    parser.add_argument("--batch", type=int, default=None, help="MLP batch (default 128)")
    parser.add_argument("--no-conv", action="store_true", help="skip the conv stack")
    args = parser.parse_args(argv)
    harness.setup(args, REPS)
    if args.quick:
        widths, depth, batch = args.widths or [8, 16], args.depth or 3, args.batch or 4
        conv = dict(layers=2, channels=4, size=8, batch=2)
    else:
        widths, depth, batch = args.widths or [100, 256, 1024], args.depth or 50, args.batch or 128
        conv = dict(layers=8, channels=64, size=32, batch=16)
    harness.header("layer_cost: train-step time (forward+backward+SGD) vs plain", args)
    summary = []
    for width in widths:
        x = torch.randn(batch, width)
        y = torch.randint(0, 10, (batch,))
        inner = 1 if args.quick else max(1, round(1_000_000 / (width * width)))
        summary.append(measure(
            f"MLP depth {depth} width {width} batch {batch} sigmoid",
            lambda norm, w=width: mlp(norm, w, depth), x, y, width, args, min(inner, 10),
        ))
    if not args.no_conv:
        x = torch.randn(conv["batch"], 3, conv["size"], conv["size"])
        y = torch.randint(0, 10, (conv["batch"],))
        summary.append(measure(
            f"conv3x3 x{conv['layers']} {conv['channels']}ch {conv['size']}x{conv['size']} "
            f"batch {conv['batch']} relu",
            lambda norm: conv_stack(norm, conv["layers"], conv["channels"]),
            x, y, conv["channels"] * 9, args, 1,
        ))
    print("\n-- layer_cost summary (ratios to plain) --")
    print(harness.table(summary, ["network", "plain ms", "lcw", "lcw [cached]", "lcw [op-by-op]",
                                  "centered", "bn", "target", "LCW ≤ target", "LCW < BN"]))
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    main()
