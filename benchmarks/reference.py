"""The op-by-op Helmert implementation that the library used before the fused kernels, kept as the
reference the benchmarks compare against (same basis, autograd through a dozen small ops)."""

from __future__ import annotations

import torch
from torch import nn

from lcw_analysis.parametrizations import LCW


def _helmert_scale(m: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.arange(1, m, dtype=like.dtype, device=like.device)
    return k, torch.rsqrt(k * (k + 1))


def helmert_apply_ops(v: torch.Tensor) -> torch.Tensor:
    """``w = B_m v`` with flip/cumsum/pad ops and a centering pass; autograd records every op."""
    m = v.shape[1] + 1
    k, scale = _helmert_scale(m, v)
    c = v * scale
    tail = c.flip(-1).cumsum(-1).flip(-1)  # S_j = Σ_{k ≥ j} c_k
    w = nn.functional.pad(tail, (0, 1)) - nn.functional.pad(k * c, (1, 0))
    return w - w.mean(dim=1, keepdim=True)


def helmert_transpose_ops(w: torch.Tensor) -> torch.Tensor:
    """``v = B_mᵀ w`` with cumsum ops."""
    m = w.shape[1]
    k, scale = _helmert_scale(m, w)
    return (w.cumsum(-1)[:, :-1] - k * w[:, 1:]) * scale


class OpByOpLCW(LCW):
    """Orthonormal LCW whose forward is :func:`helmert_apply_ops` (the pre-fusion library code)."""

    def __init__(self):
        super().__init__("orthonormal")

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.shape is None:
            raise RuntimeError("LCW used before right_inverse set the weight shape")
        return helmert_apply_ops(v).reshape(self.shape)
