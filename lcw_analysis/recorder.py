"""A hook recorder that streams per-layer statistics of activation shift into a tidy DataFrame.

``Recorder`` hooks any ``nn.Module``; ``probe`` measures a model at a fixed batch without touching
its training state. See :class:`Recorder` for the sites, the statistics and the frame schema.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.modules import activation as _activation
from torch.nn.utils import parametrize

from .stats import MAX_PENDING, Scratch, batch_moments, reduce_dims, summarize

__all__ = ["Recorder", "probe", "COLUMNS", "SITES", "LAYER_TYPES", "NORM_TYPES", "ACTIVATION_TYPES"]

COLUMNS = ("step", "mode", "index", "layer", "site", "stat", "unit", "value")
SITES = ("input", "weight", "z", "layer", "norm", "a", "param")
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = tuple(
    t
    for t in (
        nn.modules.batchnorm._BatchNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.GroupNorm,
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)
_CHANNEL_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
)
ACTIVATION_TYPES = tuple(
    getattr(_activation, n) for n in _activation.__all__ if n != "MultiheadAttention"
)
_MOMENT_STATS = ("pooled_mean", "within_var", "between_var", "pooled_var", "stripe_ratio")
_SITE_ORDER = {s: i for i, s in enumerate(SITES)}

Selector = str | Iterable[str] | Callable[[str, nn.Module], bool] | None


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, LAYER_TYPES):
        return "layer"
    if isinstance(module, NORM_TYPES):
        return "norm"
    if isinstance(module, ACTIVATION_TYPES):
        return "act"
    return None


def _selector(sites: Selector) -> Callable[[str, nn.Module], bool]:
    if sites is None:
        return lambda name, module: True
    if isinstance(sites, str):
        sites = [sites]
    if callable(sites):
        return sites
    try:
        patterns = list(sites)
    except TypeError:
        patterns = None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"sites={sites!r}: expected None, a glob string, a list of globs or a callable "
            "(name, module) -> bool"
        )
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


_F64 = torch.float64
_PENDING_LIMIT = 4096  # reduced batches a step keeps before merging them (all sites together)


class _Block:
    """Merged moments of several keys with the same number of units: rows of two tensors."""

    __slots__ = ("ids", "n", "mean", "var")

    def __init__(self, ids: list[int], n: list[int], mean: torch.Tensor, var: torch.Tensor):
        self.ids, self.n, self.mean, self.var = ids, n, mean, var


def _merge_rows(ids: list[int], n: list[int], mean: torch.Tensor, var: torch.Tensor) -> _Block:
    """Merge the rows of ``mean``/``var`` that share a key id (Chan's update, vectorized: means as
    offsets from the key's first row); ``n`` are the rows' counts."""
    if len(set(ids)) == len(ids):
        return _Block(ids, n, mean, var)
    seg_of: dict[int, int] = {}
    seg = [seg_of.setdefault(k, len(seg_of)) for k in ids]
    keys = len(seg_of)
    totals = [0] * keys
    first = [-1] * keys
    for row, (s, count) in enumerate(zip(seg, n, strict=True)):
        totals[s] += count
        if first[s] < 0:
            first[s] = row
    dev = mean.device
    seg_t = torch.tensor(seg, device=dev)
    weight = (torch.tensor(n, dtype=_F64, device=dev)
              / torch.tensor(totals, dtype=_F64, device=dev)[seg_t]).unsqueeze(1)
    ref = mean[torch.tensor(first, device=dev)]
    delta = mean - ref[seg_t]
    offset = torch.zeros_like(ref).index_add_(0, seg_t, weight * delta)
    delta.sub_(offset[seg_t])
    merged_var = torch.zeros_like(ref).index_add_(0, seg_t, weight * (var + delta.square_()))
    return _Block(list(seg_of), totals, ref + offset, merged_var)


class _WBlock:
    """Weight-side quantities of layers (rows) with the same weight shape, one row per pass:
    ``w_sum``, ``w_norm``, ``bias`` (None: no bias) in the weight's dtype, ``dot`` = ``w_i·μ``."""

    __slots__ = ("names", "n", "w_sum", "w_norm", "dot", "bias", "groups", "taps")

    def __init__(self, names, n, w_sum, w_norm, dot, bias, groups, taps):
        self.names, self.n, self.w_sum, self.w_norm = names, n, w_sum, w_norm
        self.dot, self.bias, self.groups, self.taps = dot, bias, groups, taps

    def numel(self) -> int:
        return sum(t.numel() for t in (self.w_sum, self.w_norm, self.dot, self.bias)
                   if t is not None)


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy().astype(np.float64, copy=False)


class _Store:
    """Everything recorded in one ``(step, mode)``.

    Reduced batches are appended to flat lists (key id, count, mean, var) and merged into
    :class:`_Block` rows by :meth:`compact` (at a step change, before reading and when
    ``limit`` batches are kept), so a step leaves a handful of tensors behind rather than
    several per site (which also keeps Python's garbage collector quiet).
    """

    __slots__ = ("p_key", "p_n", "p_mean", "p_var", "blocks", "wblocks", "merged", "norms",
                 "dirty", "limit")

    def __init__(self, dirty: set, limit: int):
        self.p_key: list[int] = []
        self.p_n: list[int] = []
        self.p_mean: list[torch.Tensor] = []
        self.p_var: list[torch.Tensor] = []
        self.blocks: dict[tuple, _Block] = {}
        self.wblocks: list[_WBlock] = []
        self.merged = 0  # number of wblocks right after the last merge_wblocks
        self.norms: list[tuple[torch.Tensor, list[int]]] = []
        self.dirty = dirty
        self.limit = limit

    def add(self, kid: int, count: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        keys = self.p_key
        if not keys:
            self.dirty.add(self)
        keys.append(kid)
        self.p_n.append(count)
        self.p_mean.append(mean)
        self.p_var.append(var)
        if len(keys) >= self.limit:
            self.compact()

    def compact(self) -> None:
        """Merge the kept batches into the blocks (one row per key)."""
        self.dirty.discard(self)
        keys = self.p_key
        if not keys:
            return
        means, variances, counts = self.p_mean, self.p_var, self.p_n
        self.p_key, self.p_n, self.p_mean, self.p_var = [], [], [], []
        sizes = [m.numel() for m in means]  # means are vectors over units
        if sizes.count(sizes[0]) == len(sizes):
            groups = {sizes[0]: range(len(sizes))}
        else:
            groups = {}
            for i, size in enumerate(sizes):
                groups.setdefault(size, []).append(i)
        for rows in groups.values():
            try:
                mean = torch.stack([means[i] for i in rows])
                var = torch.stack([variances[i] for i in rows])
            except RuntimeError:  # units on several devices
                for sub in _split_by_device(rows, means):
                    self._merge_group([keys[i] for i in sub], [counts[i] for i in sub],
                                      torch.stack([means[i] for i in sub]),
                                      torch.stack([variances[i] for i in sub]))
                continue
            self._merge_group([keys[i] for i in rows], [counts[i] for i in rows], mean, var)

    def _merge_group(self, ids: list[int], n: list[int], mean: torch.Tensor,
                     var: torch.Tensor) -> None:
        gk = (mean.shape[1], mean.device)
        block = self.blocks.get(gk)
        if block is not None:
            ids, n = block.ids + ids, block.n + n
            mean, var = torch.cat([block.mean, mean]), torch.cat([block.var, var])
        self.blocks[gk] = _merge_rows(ids, n, mean, var)

    def add_wblock(self, block: _WBlock) -> None:
        self.wblocks.append(block)
        if len(self.wblocks) > self.merged + MAX_PENDING:
            self.merge_wblocks()

    def add_norms(self, norms: torch.Tensor, params: list[int]) -> None:
        self.norms.append((norms, params))
        if len(self.norms) > MAX_PENDING:
            self.merge_norms()

    def moments(self) -> dict[int, tuple[int, np.ndarray, np.ndarray]]:
        """``{key id: (count, mean, var)}`` as float64 arrays."""
        self.compact()
        out = {}
        for block in self.blocks.values():
            mean, var = _numpy(block.mean), _numpy(block.var)
            for row, kid in enumerate(block.ids):
                out[kid] = (block.n[row], mean[row], var[row])
        return out

    def weights(self) -> dict[str, list]:
        """``{layer: [count, w_sum, w_norm, bias or None, Σ count·dot, groups, taps]}``: the
        first pass's weight quantities and the count-weighted sum of ``w_i·μ`` over passes."""
        out: dict[str, list] = {}
        for block in self.wblocks:
            w_sum, w_norm, dot, bias = (_numpy(t) for t in (block.w_sum, block.w_norm,
                                                             block.dot, block.bias))
            for row, name in enumerate(block.names):
                rec = out.get(name)
                if rec is None:
                    rec = out[name] = [0, w_sum[row], w_norm[row],
                                       None if bias is None else bias[row],
                                       np.zeros_like(dot[row]), block.groups, block.taps]
                count = block.n[row]
                if count:
                    rec[0] += count
                    rec[4] = rec[4] + dot[row] * count
        return out

    def merge_wblocks(self) -> None:
        """One row per layer (CPU, float64), so memory is bounded whatever the number of passes;
        layers of the same shape share a block."""
        if len(self.wblocks) <= self.merged:
            return
        rows: dict[tuple, list] = {}
        for name, (count, w_sum, w_norm, bias, dot_sum, groups, taps) in self.weights().items():
            key = (len(w_sum), groups, taps, bias is None)
            dot = dot_sum / count if count else dot_sum
            rows.setdefault(key, []).append((name, count, w_sum, w_norm, dot, bias))
        blocks = []
        for (_, groups, taps, no_bias), layers in rows.items():
            names, counts, *arrays = zip(*layers, strict=True)
            w_sum, w_norm, dot, bias = (
                None if no_bias and i == 3 else torch.from_numpy(np.stack(a))
                for i, a in enumerate(arrays))
            blocks.append(_WBlock(list(names), list(counts), w_sum, w_norm, dot, bias, groups,
                                  taps))
        self.wblocks = blocks
        self.merged = len(blocks)

    def grad_norms(self) -> dict[int, float]:
        """``{parameter position: ‖grad‖}``, the last value of each parameter."""
        out = {}
        for norms, params in self.norms:
            for p, value in zip(params, _numpy(norms).tolist(), strict=True):
                out[p] = value
        return out

    def merge_norms(self) -> None:
        if len(self.norms) > 1:
            last = self.grad_norms()
            self.norms = [(torch.tensor(list(last.values()), dtype=_F64), list(last))]

    def numel(self) -> int:
        self.compact()
        self.merge_wblocks()
        self.merge_norms()
        total = sum(b.mean.numel() + b.var.numel() for b in self.blocks.values())
        total += sum(b.numel() for b in self.wblocks)
        return total + sum(norms.numel() for norms, _ in self.norms)


def _split_by_device(rows, tensors: list[torch.Tensor]) -> list[list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i in rows:
        groups.setdefault(tensors[i].device, []).append(i)
    return list(groups.values())


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _norms(grads: list[torch.Tensor], scratch: Scratch) -> torch.Tensor:
    """‖g‖₂ of each tensor (all of one shape, dtype and device), reduced in float64 (vanishing
    gradients, ~1e-30, would underflow in float32), as one float64 vector: stacked into a
    reused float64 buffer (one conversion, one reduction) when it fits, else one by one."""
    g0 = grads[0]
    buf = None if g0.is_sparse else scratch.get((len(grads), g0.numel()), g0.device)
    if buf is not None:
        torch.stack([g.reshape(-1) for g in grads], out=buf)
        return torch.linalg.vector_norm(buf, dim=1)
    return torch.stack([torch.linalg.vector_norm(g, dtype=_F64) for g in grads])


class Recorder:
    """Stream per-unit statistics of preactivations, activations and their gradients.

    ``with Recorder(model, sites=None, every=1, keep_matrix=0) as rec: ...; rec.frame()``

    **Sites** (``sites``: ``None`` = all; a glob or list of globs matched with ``fnmatch`` against
    qualified module names, e.g. ``"hidden.3.*"``; or a callable ``(name, module) -> bool``):

    - every ``nn.Linear``/``nn.Conv1d/2d/3d``: its output ``z`` (the preactivation), its input
      (``a^{l-1}``), its weight and the derived layer quantities;
    - every norm module (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm): its output;
    - every activation (a module class of ``torch.nn.modules.activation``): its output ``a``.

    The *unit* axis is the last axis for Linear outputs/inputs and the channel axis (dim 1) for
    convolutions and channel norms; LayerNorm and activations use the unit axis of the most recent
    Linear/Conv. Statistics are over all other axes (batch and spatial). Forward values are taken
    in forward hooks, gradients in hooks on the autograd node that made each tensor (a tensor hook
    for a leaf; never module backward hooks, which break on in-place activations); ``z`` stats
    are pre-activation even when an in-place activation later overwrites the tensor, and ``grad``
    of ``z`` is ``∂L/∂z``.

    **Statistics** (``stat`` column; variances are population variances, float64):

    - sites ``z``, ``norm``, ``a``, ``input`` — per unit: ``mean`` (the activation shift of that
      unit for ``z``), ``var``; summary (``unit`` NA): ``count`` (values per unit),
      ``pooled_mean`` (mean of unit means), ``within_var`` (mean of unit variances),
      ``between_var`` (variance of unit means across units), ``pooled_var`` (within + between =
      variance over samples *and* units), ``stripe_ratio`` (between / within). The same with a
      ``grad_`` prefix for the gradient ``∂L/∂(site output)`` (``∂L/∂a^{l-1}`` for ``input``),
      present when the tensor required grad and a backward pass ran: ``grad_mean``, ``grad_var``,
      ``grad_count``, ``grad_pooled_mean``, ``grad_within_var``, ``grad_between_var``,
      ``grad_pooled_var``, ``grad_stripe_ratio``. For a conv the input is reduced per input
      channel.
    - site ``weight`` — per unit (row ``w_i`` of the effective weight ``module.weight``, i.e. the
      constrained ``w`` of an LCW layer, flattened over the fan-in): ``w_sum`` (``w_i·1``),
      ``w_norm`` (``‖w_i‖``), ``mu_norm`` (``‖μ‖``, μ = measured mean of the layer input, for a
      conv the per-input-channel mean broadcast over the kernel taps of the unit's group),
      ``w_dot_mu`` (``w_i·μ``), ``cos_theta`` (``w_i·μ / (‖w_i‖‖μ‖)``), ``bias`` (if any).
    - site ``layer`` — per unit: ``mean_pred`` (Proposition 1, ``‖w_i‖‖μ‖cos θ_i + b_i``),
      ``mean_pred_gamma`` (Proposition 1 under Definition 1, ``γ w_i·1 + b_i`` with ``γ`` = mean
      of μ over input features); summary: ``gamma``, ``mean_pred_r2`` and ``mean_pred_gamma_r2``
      (R² of the ``z`` unit means against each prediction), ``fwd_amp`` = pooled_var(z^l) /
      pooled_var(a^{l-1}), ``bwd_amp`` = grad_pooled_var(a^{l-1}) / grad_pooled_var(z^l),
      ``amp_ratio`` = fwd_amp / bwd_amp. Pooled variances include the between-unit spread, as in
      digest §5.2 (``Var(z_i) = m σ_w² (σ_a² + γ²)``). ``bwd_amp`` needs the layer input to
      require grad (not the case for the network input unless you ask for it).
    - site ``param`` — ``grad_norm``: ``‖p.grad‖₂`` of each leaf parameter that has a gradient
      after the last recorded backward pass of the step (what the optimizer sees), read when that
      pass is complete. For an LCW layer the leaf is the free ``v``
      (``<layer>.parametrizations.weight.original``), not the constrained ``w``.

    For a Linear layer ``mean_pred`` equals the measured ``z`` mean exactly (``z`` is linear in
    ``a``). For a conv, μ is the per-input-channel mean over all positions: exact for 1×1 kernels;
    with larger kernels each tap sees a shifted window (equal up to noise for spatially stationary
    inputs), and zero padding makes border outputs see zeros instead of μ, so measured means
    deviate from ``mean_pred`` (digest §4.2). Weight-side quantities assume the weights do
    not change within a step: ``w_sum``, ``w_norm``, ``bias`` are those of the step's first
    recorded forward pass, ``w_dot_mu`` is taken at every pass (weighted like μ). For a Linear
    layer they are computed when the pass's backward pass is complete (before an optimizer step
    can change the weights; batched over the layers), or at once for a pass without gradients; a
    ``RuntimeWarning`` says when a weight changed in place in between.

    **Frame** (:meth:`frame`): long format with columns ``step, mode, index, layer, site, stat,
    unit, value``. ``mode`` is ``"train"``/``"eval"`` from ``module.training`` at hook time;
    ``index`` (nullable Int64) is the forward-order number ``l = 1..L`` of the Linear/Conv layer
    (norm and activation sites get the index of the most recent preceding Linear/Conv; parameter
    rows that of their module, or NA); ``layer`` is the qualified module name (for ``param`` rows
    the qualified parameter name); ``unit`` is nullable Int64, NA on summary rows.

    **Schedule**: :meth:`begin_step` sets the step (default 0); recording is active for a step iff
    ``step % every == 0``; several forward/backward passes within a step are merged. Nothing is
    recorded inside ``with rec.paused():``. Hooks are on the model only during active steps
    (:meth:`begin_step` adds or removes them), so steps that are not recorded run at full speed.

    **Matrices**: ``keep_matrix=N`` also keeps, per step, the first ``N`` samples of the output of
    every Linear/Conv layer (``z``) and of every norm module (e.g. the BatchNorm output that
    enters the activation) as a CPU copy, under the module's qualified name; see
    :meth:`matrices`.

    Hooks are attached on ``__enter__`` (or :meth:`attach`) and removed on exit, also on an
    exception; :meth:`remove` is idempotent. Recording does not change outputs or gradients and
    holds no reference to activation tensors (except the ``keep_matrix`` copies).

    **Cost**: each hooked tensor is reduced at once to a mean and a variance per unit by a float64
    two-pass reduction (:func:`~lcw_analysis.stats.batch_moments`; a non-float64 tensor is first
    copied into a reused float64 scratch buffer, so float32 values are reduced exactly and tiny
    gradients do not underflow); the tensor is not kept. Merging the passes of a step is
    deferred and vectorized (at a step change, before reading, and whenever 4096 reduced batches
    are kept), so the state per recorded step is a few vectors per site whatever the number of
    samples, held in a few stacked tensors (which keeps Python's garbage collector quiet), and
    grows with the number of recorded steps. Parameter gradient norms (float64) and Linear
    weight-side quantities (in the weight's dtype: float32 for a float32 model) are batched per
    shape at the end of each backward pass. Reused scratch buffers (at most 64 MB per device and
    dtype) hold the largest hooked tensor in float64 and the stacked weights and gradients of a
    shape. Steps that are not recorded run without hooks (no overhead). Measured with
    ``benchmarks/recorder_overhead.py`` on a busy 2-core CPU (float32 MLP, depth 50, width 100,
    batch 128, sigmoid, SGD; vanishing gradients), recording every step costs about 2-2.8x the
    unrecorded step and ``every=10`` about 1.1-1.2x: the ~200 float64 reductions per step are
    most of it.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Selector = None,
        every: int = 1,
        keep_matrix: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if (isinstance(keep_matrix, bool) or not isinstance(keep_matrix, numbers.Integral)
                or keep_matrix < 0):
            raise ValueError(f"keep_matrix must be an integer >= 0, got {keep_matrix!r}")
        self.model = model
        self.every = int(every)
        self.keep_matrix = int(keep_matrix)
        select = _selector(sites)
        self._sites: list[tuple[str, nn.Module, str, bool]] = []
        for name, module in model.named_modules():
            kind = _kind(module)
            if kind is not None:
                self._sites.append((name, module, kind, bool(select(name, module))))
        if not any(chosen for *_, chosen in self._sites):
            raise ValueError(f"sites={sites!r} selects no Linear/Conv, norm or activation module")
        chosen = {id(m) for _, m, _, c in self._sites if c}
        self._params: list[tuple[str, nn.Parameter, str, nn.Module]] = []
        for pname, param in model.named_parameters():
            owner = pname.split(".parametrizations.")[0] if ".parametrizations." in pname else (
                pname.rpartition(".")[0]
            )
            module = model.get_submodule(owner)
            if sites is None or id(module) in chosen:
                self._params.append((pname, param, owner, module))
        self._handles: list = []
        self._hooks: list[tuple[Callable, Callable]] | None = None
        self._attached = False
        self._pause = 0
        self._step = 0
        self._active = False
        self._index: dict[str, int | None] = {}
        self._n_layers = 0
        self._order: dict[str, int] = {}
        self._last_index: int | None = None
        self._last_unit = -1
        self._last_out: tuple | None = None
        self._weight_stash: dict[int, torch.Tensor] = {}
        self._scratch = Scratch()
        # key ids: (module name, site, is_grad) <-> int
        self._kid: dict[tuple[str, str, bool], int] = {}
        self._kname: list[tuple[str, str, bool]] = []
        self._stores: dict[tuple[int, str], _Store] = {}
        self._dirty: set[_Store] = set()
        self._limit = _PENDING_LIMIT
        self._w_pending: list[tuple] = []
        self._norm_step: int | None = None  # step of a backward pass whose grad norms are due
        self._flush_queued = False
        self._kept: dict[tuple, list[torch.Tensor]] = {}
        self._kept_n: dict[tuple, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> Recorder:
        """Attach to the model (done by ``__enter__``); returns ``self``. The hooks are on the
        model while the current step is recorded (see :meth:`begin_step`)."""
        if self._attached:
            return self
        self._attached = True
        try:
            self._sync_hooks()
        except BaseException:
            self.remove()
            raise
        return self

    def _hook_list(self) -> list[tuple[Callable, Callable]]:
        """``(register, hook)`` pairs, built once: ``register(hook)`` returns a handle."""
        if self._hooks is not None:
            return self._hooks
        hooks: list[tuple[Callable, Callable]] = [
            (self.model.register_forward_pre_hook, self._forward_start)]
        for name, module, kind, chosen in self._sites:
            if kind == "layer":
                hook = self._layer_hook(name, module, chosen)
                if chosen and parametrize.is_parametrized(module, "weight"):
                    plist = module.parametrizations.weight
                    hooks.append((plist.register_forward_hook, self._stash_hook(id(module))))
            elif chosen:
                hook = self._site_hook(name, module, kind)
            else:
                continue
            hooks.append((module.register_forward_hook, hook))
        self._hooks = hooks
        return hooks

    def _sync_hooks(self) -> None:
        """Put the hooks on the model iff attached and the step is recorded; update ``active``."""
        want = self._attached and self._step % self.every == 0
        if want and not self._handles:
            handles = self._handles
            for register, hook in self._hook_list():
                handles.append(register(hook))
        elif not want and self._handles:
            self._drop_hooks()
        self._update()

    def _drop_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        self._last_out = None
        self._weight_stash.clear()

    def remove(self) -> None:
        """Remove every hook; idempotent. Statistics stay available."""
        self._drop_hooks()
        self._attached = False
        self._update()
        self._flush()

    def __enter__(self) -> Recorder:
        return self.attach()

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def __del__(self):
        with contextlib.suppress(Exception):
            self.remove()

    # ------------------------------------------------------------------ schedule
    @property
    def step(self) -> int:
        return self._step

    @property
    def active(self) -> bool:
        """True when hooks are attached, not paused and ``step % every == 0``."""
        return self._active

    def begin_step(self, step: int) -> None:
        """Set the current step; recording is active for it iff ``step % every == 0``."""
        step = int(step)
        if step != self._step:
            self._flush()
        self._step = step
        self._sync_hooks()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside this block (e.g. evaluation passes); nestable."""
        self._pause += 1
        self._update()
        try:
            yield
        finally:
            self._pause -= 1
            self._update()

    def _update(self) -> None:
        self._active = self._attached and self._pause == 0 and self._step % self.every == 0

    @property
    def layer_index(self) -> dict[str, int]:
        """Forward-order index ``l`` of every Linear/Conv layer seen so far."""
        layers = {name for name, _, kind, _ in self._sites if kind == "layer"}
        return {n: i for n, i in self._index.items() if n in layers}

    # ------------------------------------------------------------------ state
    def _key(self, name: str, site: str, grad: bool) -> int:
        key = (name, site, grad)
        kid = self._kid.get(key)
        if kid is None:
            kid = self._kid[key] = len(self._kname)
            self._kname.append(key)
        return kid

    def _store(self, step: int, mode: str, name: str | None = None) -> _Store:
        """The store of ``(step, mode)``; ``name``: a site recorded in it (first-seen order)."""
        store = self._stores.get((step, mode))
        if store is None:
            store = self._stores[(step, mode)] = _Store(self._dirty, self._limit)
        if name is not None and name not in self._order:
            self._order[name] = len(self._order)
        return store

    def _flush(self, compact: bool = True) -> None:
        """Compute what was deferred (parameter gradient norms, weight-side quantities) and, with
        ``compact``, merge the kept batches; done when the step changes, before reading and (not
        compacting) at the end of each backward pass."""
        if self._norm_step is not None:
            self._flush_norms()
        if self._w_pending:
            self._flush_weights()
        dirty = self._dirty
        while compact and dirty:
            dirty.pop().compact()

    def _end_of_backward(self) -> None:
        self._flush_queued = False
        self._flush(compact=False)

    def _queue_flush(self, norms: bool) -> None:
        """Have :meth:`_flush` run once the current backward pass is complete (called by the
        gradient hooks); with ``norms`` it also reads the parameter gradient norms."""
        if norms:
            self._norm_step = self._step
        if self._flush_queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        except RuntimeError:  # not inside a backward pass
            return
        self._flush_queued = True

    def _flush_norms(self) -> None:
        """``‖p.grad‖`` of every recorded parameter that has a gradient after a recorded
        backward pass, batched over the parameters of each shape."""
        step, self._norm_step = self._norm_step, None
        groups: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
        for position, (_pname, param, _owner, module) in enumerate(self._params):
            grad = param.grad
            if grad is None or not param.requires_grad:
                continue
            key = ("train" if module.training else "eval", grad.shape, grad.dtype,
                   grad.device)
            entry = groups.get(key)
            if entry is None:
                entry = groups[key] = ([], [])
            entry[0].append(position)
            entry[1].append(grad.detach())
        for (mode, *_), (positions, grads) in groups.items():
            self._store(step, mode).add_norms(_norms(grads, self._scratch), positions)

    def _flush_weights(self) -> None:
        """Weight-side quantities of the Linear layers of the pending passes, batched over the
        layers of each weight shape: ``w_i·1``, ``‖w_i‖``, ``w_i·μ`` (in the weight's dtype)."""
        entries, self._w_pending = self._w_pending, []
        groups: dict[tuple, list[tuple]] = {}
        stale = False
        for entry in entries:
            store, _name, w, w_version, b, b_version, _count, _mu = entry
            if w_version is not None and (w._version != w_version or (
                    b is not None and b._version != b_version)):
                stale = True
            key = (id(store), w.shape, w.dtype, w.device, b is None)
            group = groups.get(key)
            if group is None:
                group = groups[key] = []
            group.append(entry)
        if stale:
            warnings.warn("a Linear weight changed in place between a recorded forward pass and "
                          "the end of its backward pass (or of its step); its weight-side "
                          "statistics use the changed weight", RuntimeWarning, stacklevel=2)
        for group in groups.values():
            ws = [e[2] for e in group]
            w0 = ws[0]
            mu = _stack([e[7] for e in group]).to(w0.dtype)
            # rows [1, μ] @ wᵀ: w_i·1 and w_i·μ in one product per layer, (layers, 2, out)
            lhs = torch.stack((w0.new_ones(()).expand_as(mu), mu), 1)
            buf = self._scratch.get((len(ws), *w0.shape), w0.device, w0.dtype)
            if buf is not None:  # stacked into reused memory: a few batched kernels
                w = torch.stack(ws, out=buf) if len(ws) > 1 else w0.unsqueeze(0)
                both = torch.bmm(lhs, w.transpose(1, 2))
                w_norm = torch.linalg.vector_norm(w, dim=2)
            else:
                both = torch.stack([torch.mm(lhs[i], w.t()) for i, w in enumerate(ws)])
                w_norm = torch.stack([torch.linalg.vector_norm(w, dim=1) for w in ws])
            bias = None if group[0][4] is None else torch.stack([e[4] for e in group])
            group[0][0].add_wblock(_WBlock(
                [e[1] for e in group], [e[6] for e in group], both[:, 0], w_norm, both[:, 1],
                bias, 1, 1))

    # ------------------------------------------------------------------ hooks
    def _forward_start(self, module, args) -> None:
        self._last_index = None
        self._last_unit = -1
        self._last_out = None
        self._weight_stash.clear()
        self._flush_queued = False  # in case a backward pass failed before its callback

    def _stash_hook(self, key: int):
        """Keep the weight a parametrization just computed for its layer's forward pass, so the
        layer hook need not evaluate ``module.weight`` (e.g. the LCW basis) a second time."""

        def hook(plist, args, weight):
            if self._active:
                self._weight_stash[key] = weight

        return hook

    def _grad_hook(self, t: torch.Tensor, store: _Store, targets: list[int],
                   dims: tuple[int, ...]) -> None:
        """Reduce ``∂L/∂t`` into ``targets`` when the backward pass reaches it: a pre-hook on the
        node that made ``t`` (a tensor hook for a leaf), so an in-place change of ``t`` later in
        the forward pass does not matter."""
        node = t.grad_fn
        if node is None:
            t.register_hook(functools.partial(self._on_grad, store, targets, dims))
        else:
            node.register_prehook(
                functools.partial(self._on_node_grads, store, targets, dims, t.output_nr))

    def _on_node_grads(self, store, targets, dims, index: int, grads: tuple) -> None:
        grad = grads[index]
        if grad is not None:
            self._on_grad(store, targets, dims, grad)

    def _on_grad(self, store: _Store, targets: list[int], dims, grad: torch.Tensor) -> None:
        if not self._attached:
            return
        recording = self._pause == 0
        if recording:
            count, mean, var = batch_moments(grad, dims, self._scratch)
            if count:
                for kid in targets:
                    store.add(kid, count, mean, var)
        # weight-side quantities of the forward pass are due before an optimizer step; gradient
        # norms only if this step is recorded (not paused, not after the step moved on)
        self._queue_flush(self._active)

    def _watch(self, store: _Store, out: torch.Tensor, dims, moments, grad_kid: int) -> None:
        """Register the gradient hook of a site output and remember it for reuse as an input."""
        targets = None
        if out.requires_grad:
            targets = [grad_kid]
            self._grad_hook(out, store, targets, dims)
        # inference tensors have no version counter, so in-place changes could not be detected
        self._last_out = None if out.is_inference() else (
            weakref.ref(out), out._version, dims, moments, targets, store)

    def _layer_hook(self, name: str, module: nn.Module, chosen: bool):
        is_conv = not isinstance(module, nn.Linear)
        spatial = len(module.kernel_size) if is_conv else 0
        unit_from_end = -(spatial + 1)
        groups = module.groups if is_conv else 1
        scratch = self._scratch
        z_kid, z_grad = self._key(name, "z", False), self._key(name, "z", True)
        in_kid, in_grad = self._key(name, "input", False), self._key(name, "input", True)

        def hook(mod, args, output):
            index = self._index.get(name)
            if index is None:
                self._n_layers += 1
                index = self._index[name] = self._n_layers
            self._last_index = index
            self._last_unit = unit_from_end
            if not (chosen and self._active and isinstance(output, torch.Tensor)):
                return
            store = self._store(self._step, "train" if mod.training else "eval", name)
            dims = reduce_dims(output.ndim, unit_from_end)
            # input a^{l-1} (before _watch(z) replaces the remembered previous output)
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None:
                in_dims = reduce_dims(x.ndim, unit_from_end)
                last = self._last_out
                if last is not None and last[0]() is x and last[1] == x._version and (
                    last[2] == in_dims
                ):
                    moments, targets = last[3], last[4] if last[5] is store else None
                else:
                    moments, targets = batch_moments(x, in_dims, scratch), None
                if moments[0]:
                    store.add(in_kid, *moments)
                if x.requires_grad:
                    if targets is not None:
                        targets.append(in_grad)
                    else:
                        self._grad_hook(x, store, [in_grad], in_dims)
                self._weight_side(store, name, mod, groups, moments, output.requires_grad)
            z_moments = batch_moments(output, dims, scratch)
            if z_moments[0]:
                store.add(z_kid, *z_moments)
            if self.keep_matrix and output.ndim > spatial + 1:
                self._keep((self._step, name), output, dims)
            self._watch(store, output, dims, z_moments, z_grad)

        return hook

    def _weight_side(self, store: _Store, name: str, mod: nn.Module, groups: int, moments,
                     deferred: bool) -> None:
        count, mu, _ = moments
        w = self._weight_stash.pop(id(mod), None)
        w = (mod.weight if w is None else w).detach()
        b = None if mod.bias is None else mod.bias.detach()
        if w.ndim == 2:  # Linear: batched over layers, once the backward pass is done
            if deferred:
                entry = (store, name, w, w._version, b, None if b is None else b._version,
                         count, mu)
                self._w_pending.append(entry)
            else:  # no backward pass will follow: now
                self._w_pending.append((store, name, w, None, b, None, count, mu))
                self._flush_weights()
            return
        out_units = w.shape[0]
        rows = w.reshape(out_units, -1)  # reduce in the weight's dtype
        # per-unit weight sums per input channel (out, cin/g), then per group
        wc = w.reshape(out_units, w.shape[1], -1).sum(-1).to(_F64)
        dot = torch.bmm(
            wc.reshape(groups, out_units // groups, -1), mu.reshape(groups, -1, 1)
        ).reshape(1, out_units)
        store.add_wblock(_WBlock(
            [name], [count], rows.sum(1)[None], torch.linalg.vector_norm(rows, dim=1)[None], dot,
            None if b is None else b.clone()[None], groups, w[0, 0].numel()))

    def _keep(self, key: tuple, output: torch.Tensor, dims) -> None:
        got = self._kept_n.get(key, 0)
        if got >= self.keep_matrix:
            return
        take = min(self.keep_matrix - got, output.shape[0])
        unit = next(d for d in range(output.ndim) if d not in dims)
        chunk = output.detach()[:take].movedim(unit, 0).to("cpu", copy=True)
        self._kept.setdefault(key, []).append(chunk)
        self._kept_n[key] = got + take

    def _site_hook(self, name: str, module: nn.Module, kind: str):
        site = "norm" if kind == "norm" else "a"
        keep = kind == "norm"
        channel = isinstance(module, _CHANNEL_NORMS)
        scratch = self._scratch
        kid, grad_kid = self._key(name, site, False), self._key(name, site, True)

        def hook(mod, args, output):
            if not (self._active and isinstance(output, torch.Tensor)):
                return
            if name not in self._index:
                self._index[name] = self._last_index
            ndim = output.ndim
            if channel or not -ndim <= self._last_unit < 0:
                unit = 1 if ndim >= 2 else 0
            else:
                unit = self._last_unit
            store = self._store(self._step, "train" if mod.training else "eval", name)
            dims = reduce_dims(ndim, unit)
            moments = batch_moments(output, dims, scratch)
            if moments[0]:
                store.add(kid, *moments)
            if keep and self.keep_matrix and 0 in dims:
                self._keep((self._step, name), output, dims)
            self._watch(store, output, dims, moments, grad_kid)

        return hook

    # ------------------------------------------------------------------ results
    def state_numel(self) -> int:
        """Total number of tensor elements in the accumulators (``keep_matrix`` copies excluded);
        merges what the accumulators keep first."""
        self._flush()
        return sum(store.numel() for store in self._stores.values())

    def matrices(self) -> dict[tuple[int, str], np.ndarray]:
        """Kept output matrices: ``{(step, module name): array}``.

        Each array holds the first ``keep_matrix`` samples recorded in that step (any mode) of the
        output of a Linear/Conv layer (``z``) or of a norm module (the normalized values that
        enter the activation, e.g. ``(0, "hidden.3.norm")``), units first: ``(units, samples)``
        for a Linear layer or a norm over features, ``(channels, samples, *spatial)`` for a conv
        or a channel norm, ``(units, samples, *middle)`` for a Linear applied to
        ``(N, ..., features)``. Rows are neurons, so activation shift shows as horizontal stripes
        (``plt.imshow(m)``).
        """
        return {key: torch.cat(chunks, dim=1).numpy() for key, chunks in self._kept.items()}

    def frame(self) -> pd.DataFrame:
        """All statistics as a tidy long-format DataFrame (see the class docstring)."""
        self._flush()
        blocks: list[tuple] = []

        def emit(key, index, layer, site, stat, values, per_unit):
            blocks.append((key[0], key[1], index, layer, site, stat, values, per_unit))

        def emit_pair(key, index, layer, site, fwd, grad):
            for prefix, acc in (("", fwd), ("grad_", grad)):
                if acc is None or acc[0] == 0:
                    continue
                count, mean, var = acc
                emit(key, index, layer, site, prefix + "mean", mean, True)
                emit(key, index, layer, site, prefix + "var", var, True)
                emit(key, index, layer, site, prefix + "count", float(count), False)
                for stat, value in summarize(mean, var).items():
                    emit(key, index, layer, site, prefix + stat, value, False)

        groups: dict[tuple, dict[str, list]] = {}  # (step, mode, layer) -> {site: [fwd, grad]}
        weights: dict[tuple, list] = {}
        for (step, mode), store in self._stores.items():
            for kid, acc in store.moments().items():
                layer, site, grad = self._kname[kid]
                sites = groups.setdefault((step, mode, layer), {})
                sites.setdefault(site, [None, None])[grad] = acc
            for layer, rec in store.weights().items():
                weights[(step, mode, layer)] = rec
                groups.setdefault((step, mode, layer), {})

        def order(key):
            index = self._index.get(key[2])
            return (key[0], key[1], math.inf if index is None else index,
                    self._order.get(key[2], math.inf), key[2])

        for key in sorted(groups, key=order):
            step, mode, layer = key
            index = self._index.get(layer)
            found = groups[key]
            sites = sorted(set(found) | ({"weight"} if key in weights else set()),
                           key=_SITE_ORDER.get)
            for site in sites:
                if site == "weight":
                    self._emit_weight_and_layer(emit, key, index, weights[key], found)
                else:
                    emit_pair(key, index, layer, site, *found[site])
        owners = {pname: (i, owner) for i, (pname, _, owner, _) in enumerate(self._params)}

        def param_order(item):
            (step, mode, pname), _ = item
            position, owner = owners[pname]
            index = self._index.get(owner)
            return (step, mode, math.inf if index is None else index, position)

        norms = {}
        for (step, mode), store in self._stores.items():
            for position, value in store.grad_norms().items():
                norms[(step, mode, self._params[position][0])] = value
        for (step, mode, pname), norm in sorted(norms.items(), key=param_order):
            index = self._index.get(owners[pname][1])
            emit((step, mode), index, pname, "param", "grad_norm", norm, False)
        return _blocks_to_frame(blocks)

    def _emit_weight_and_layer(self, emit, key, index, rec, found) -> None:
        layer = key[2]
        count, w_sum, w_norm, bias_values, dot_sum, groups, taps = rec
        inp = found.get("input", (None, None))
        z = found.get("z", (None, None))
        bias = np.zeros_like(w_sum) if bias_values is None else bias_values
        emit(key, index, layer, "weight", "w_sum", w_sum, True)
        emit(key, index, layer, "weight", "w_norm", w_norm, True)
        derived: list[tuple[str, object, bool]] = []
        if inp[0] is not None and inp[0][0] and count:
            mu = inp[0][1].reshape(groups, -1)  # (groups, cin/g)
            per_group = w_sum.shape[0] // groups
            mu_norm = np.repeat(np.sqrt(taps) * np.linalg.norm(mu, axis=1), per_group)
            gamma = np.repeat(mu.mean(axis=1), per_group)
            dot = dot_sum / count
            with np.errstate(divide="ignore", invalid="ignore"):
                cos = dot / (w_norm * mu_norm)
            emit(key, index, layer, "weight", "mu_norm", mu_norm, True)
            emit(key, index, layer, "weight", "w_dot_mu", dot, True)
            emit(key, index, layer, "weight", "cos_theta", cos, True)
            pred, pred_gamma = dot + bias, gamma * w_sum + bias
            derived += [("mean_pred", pred, True), ("mean_pred_gamma", pred_gamma, True),
                        ("gamma", float(mu.mean()), False)]
            if z[0] is not None and z[0][0]:
                zm = z[0][1]
                derived += [("mean_pred_r2", _r2(zm, pred), False),
                            ("mean_pred_gamma_r2", _r2(zm, pred_gamma), False)]
        if bias_values is not None:
            emit(key, index, layer, "weight", "bias", bias, True)
        fwd = bwd = None
        if z[0] is not None and inp[0] is not None and z[0][0] and inp[0][0]:
            fwd = _div(_pooled(z[0]), _pooled(inp[0]))
            derived.append(("fwd_amp", fwd, False))
        if z[1] is not None and inp[1] is not None and z[1][0] and inp[1][0]:
            bwd = _div(_pooled(inp[1]), _pooled(z[1]))
            derived.append(("bwd_amp", bwd, False))
        if fwd is not None and bwd is not None:
            derived.append(("amp_ratio", _div(fwd, bwd), False))
        for stat, value, per_unit in derived:
            emit(key, index, layer, "layer", stat, value, per_unit)


def _pooled(acc: tuple[int, np.ndarray, np.ndarray]) -> float:
    _, mean, var = acc
    return float(np.mean(var) + np.var(mean))


def _div(a: float, b: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination of ``y`` by ``pred`` (1 − SS_res / SS_tot)."""
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return _div(1.0 * ss_tot - float(np.sum((y - pred) ** 2)), ss_tot)


def _blocks_to_frame(blocks: list[tuple]) -> pd.DataFrame:
    if not blocks:
        return pd.DataFrame(
            {
                "step": pd.Series([], dtype="int64"),
                "mode": pd.Series([], dtype=object),
                "index": pd.Series([], dtype="Int64"),
                "layer": pd.Series([], dtype=object),
                "site": pd.Series([], dtype=object),
                "stat": pd.Series([], dtype=object),
                "unit": pd.Series([], dtype="Int64"),
                "value": pd.Series([], dtype="float64"),
            }
        )
    values = [np.atleast_1d(np.asarray(b[6], dtype=np.float64)) for b in blocks]
    lengths = np.array([len(v) for v in values])
    per_unit = np.array([b[7] for b in blocks])

    def repeat(i, dtype=object):
        return np.repeat(np.array([b[i] for b in blocks], dtype=dtype), lengths)

    index_raw = np.array([-1 if b[2] is None else b[2] for b in blocks], dtype=np.int64)
    index = np.repeat(index_raw, lengths)
    units = np.concatenate([np.arange(n) for n in lengths])
    unit_mask = np.repeat(~per_unit, lengths)
    return pd.DataFrame(
        {
            "step": repeat(0, np.int64),
            "mode": repeat(1),
            "index": pd.arrays.IntegerArray(index, index < 0),
            "layer": repeat(3),
            "site": repeat(4),
            "stat": repeat(5),
            "unit": pd.arrays.IntegerArray(units.astype(np.int64), unit_mask),
            "value": np.concatenate(values),
        }
    )


def probe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    loss_fn: Callable = nn.functional.cross_entropy,
    sites: Selector = None,
    batch_size: int | None = None,
    mode: str = "eval",
    keep_matrix: int = 0,
    step: int = 0,
) -> Recorder:
    """Measure ``model`` on the fixed batch ``x`` (and targets ``y``); returns the (closed)
    :class:`Recorder` — call ``.frame()`` / ``.matrices()`` on it.

    With ``y``, the loss ``loss_fn(model(x), y)`` is backpropagated so gradient statistics and
    parameter ``grad_norm`` are recorded; ``loss_fn`` must return the batch *mean* (like the
    default ``cross_entropy``): with ``batch_size`` the batch is streamed in chunks and each chunk's
    loss is weighted by its share of the batch, so statistics and gradients equal those of one
    full-batch pass (up to rounding; not for BN in ``mode="train"``, whose batch statistics depend
    on the chunk). A floating ``x`` is made to require grad, so layer 1 also gets
    ``∂L/∂a^0``. Without ``y`` only forward statistics are recorded (under ``no_grad``).

    ``mode`` (``"eval"`` or ``"train"``) is the module mode during the probe. The model is left as
    it was: every module's ``training`` flag, every parameter's ``.grad`` (the same tensor objects)
    and all buffers (BN running statistics, restored after a ``"train"`` probe), and the RNG state.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode={mode!r} is not known; expected 'eval' or 'train'")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    n = len(x)
    if y is not None and len(y) != n:
        raise ValueError(f"y has {len(y)} samples but x has {n}")
    rec = Recorder(model, sites=sites, every=1, keep_matrix=keep_matrix)
    flags = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in [x, *params] if t.device.type == "cuda"})
    size = n if batch_size is None else batch_size
    try:
        for p in params:
            p.grad = None
        model.train(mode == "train")
        with torch.random.fork_rng(devices=devices), rec, torch.set_grad_enabled(y is not None):
            rec.begin_step(step)
            for start in range(0, n, size):
                xc = x[start : start + size]
                if y is not None and xc.is_floating_point():
                    xc = xc.detach().requires_grad_(True)
                out = model(xc)
                if y is not None:
                    loss = loss_fn(out, y[start : start + size]) * (len(xc) / n)
                    if loss.requires_grad:
                        loss.backward()
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in flags:
            m.training = training
    return rec
