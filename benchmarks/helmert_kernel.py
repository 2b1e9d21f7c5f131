"""Cost of the Helmert basis itself: ``w = B_m v`` forward + ``B_mᵀ g`` backward for one weight.

Side by side, per weight of ``n = m`` rows (a square layer): the library's fused
``helmert_apply`` (one autograd node, hand-written backward), the pre-fusion op-by-op version
(``reference.py``), centering ``u − mean(u)`` (the cheapest zero-sum map), and a bare
``cumsum`` forward+backward (the scan any O(m) Helmert apply needs, twice per step). Ratios are
to the op-by-op reference; no target (the train-step targets are in ``layer_cost``).

    python benchmarks/helmert_kernel.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from reference import helmert_apply_ops  # noqa: E402

from lcw_analysis.parametrizations import helmert_apply  # noqa: E402

REPS = 15


def fwd_bwd(fn, x: torch.Tensor, grad: torch.Tensor):
    def call() -> None:
        x.grad = None
        fn(x).backward(grad)

    return call


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser, REPS)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="fan-in m (default 100 256 1024 4608)")
    args = parser.parse_args(argv)
    harness.setup(args, REPS)
    sizes = args.sizes or ([8, 32] if args.quick else [100, 256, 1024, 4608])
    harness.header("helmert_kernel: B_m v forward + B_mᵀ g backward, one n = m weight", args)
    rows = []
    for m in sizes:
        n = min(m, 1024)
        v = torch.randn(n, m - 1, requires_grad=True)
        u = torch.randn(n, m, requires_grad=True)
        g = torch.randn(n, m)
        variants = {
            "op-by-op": fwd_bwd(helmert_apply_ops, v, g),
            "fused": fwd_bwd(helmert_apply, v, g),
            "centered": fwd_bwd(lambda t: t - t.mean(dim=1, keepdim=True), u, g),
            "cumsum": fwd_bwd(lambda t: t.cumsum(1), u, g),
        }
        inner = 1 if args.quick else max(1, min(200, 2_000_000 // (n * m)))
        t = harness.interleaved(variants, "op-by-op", args.reps, inner, args.warmup, args.clock,
                                args.seed)
        row: dict[str, object] = {"weight": f"{n}x{m}"}
        for name in variants:
            row[f"{name} µs"] = t.median(name) * 1e6
        row["fused/op-by-op"] = t.ratio("fused")
        row["centered/op-by-op"] = t.ratio("centered")
        rows.append(row)
    columns = ["weight", *(f"{k} µs" for k in ("op-by-op", "fused", "centered", "cumsum")),
               "fused/op-by-op", "centered/op-by-op"]
    print()
    print(harness.table(rows, columns))
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
