"""A hook recorder that streams per-layer statistics of activation shift into a tidy DataFrame.

``Recorder`` hooks any ``nn.Module``; ``probe`` measures a model at a fixed batch without touching
its training state. See :class:`Recorder` for the sites, the statistics and the frame schema.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import numbers
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.modules import activation as _activation
from torch.nn.utils import parametrize

from .stats import Moments, RunningMean, batch_moments, reduce_dims, summarize

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


@dataclass(slots=True)
class _Pair:
    """Forward and gradient moments of one site in one step."""

    fwd: Moments = field(default_factory=Moments)
    grad: Moments = field(default_factory=Moments)


@dataclass(slots=True)
class _Weight:
    """Weight-side quantities of one Linear/Conv layer in one step (read at forward time)."""

    groups: int
    taps: int
    w_sum: torch.Tensor | None = None
    w_norm: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    w_dot_mu: RunningMean = field(default_factory=RunningMean)


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
    in forward hooks, gradients in *tensor* hooks on the same tensors (never module backward hooks,
    which break on in-place activations); ``z`` stats are pre-activation even when an in-place
    activation later overwrites the tensor, and ``grad`` of ``z`` is ``∂L/∂z``.

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
    - site ``param`` — ``grad_norm``: ``‖p.grad‖₂`` of each leaf parameter after the last backward
      pass of the step (what the optimizer sees). For an LCW layer the leaf is the free ``v``
      (``<layer>.parametrizations.weight.original``), not the constrained ``w``.

    For a Linear layer ``mean_pred`` equals the measured ``z`` mean exactly (``z`` is linear in
    ``a``). For a conv, μ is the per-input-channel mean over all positions: exact for 1×1 kernels;
    with larger kernels each tap sees a shifted window (equal up to noise for spatially stationary
    inputs), and zero padding makes border outputs see zeros instead of μ, so measured means
    deviate from ``mean_pred`` (digest §4.2). Weight-side quantities assume the weights do
    not change within a step: ``w_sum``, ``w_norm``, ``bias`` are read at the step's first
    recorded forward pass, ``w_dot_mu`` at every pass (weighted like μ).

    **Frame** (:meth:`frame`): long format with columns ``step, mode, index, layer, site, stat,
    unit, value``. ``mode`` is ``"train"``/``"eval"`` from ``module.training`` at hook time;
    ``index`` (nullable Int64) is the forward-order number ``l = 1..L`` of the Linear/Conv layer
    (norm and activation sites get the index of the most recent preceding Linear/Conv; parameter
    rows that of their module, or NA); ``layer`` is the qualified module name (for ``param`` rows
    the qualified parameter name); ``unit`` is nullable Int64, NA on summary rows.

    **Schedule**: :meth:`begin_step` sets the step (default 0); recording is active for a step iff
    ``step % every == 0``; several forward/backward passes within a step are merged. Nothing is
    recorded inside ``with rec.paused():``.

    **Matrices**: ``keep_matrix=N`` also keeps, per step and Linear/Conv layer, the first ``N``
    samples of ``z`` as a CPU copy; see :meth:`matrices`.

    Hooks are attached on ``__enter__`` (or :meth:`attach`) and removed on exit, also on an
    exception; :meth:`remove` is idempotent. Recording does not change outputs or gradients and
    holds no reference to activation tensors (except the ``keep_matrix`` copies).

    **Cost**: each hooked tensor is reduced at once in float64 (a few small kernels; no storage),
    so the state per recorded step is a few vectors per site whatever the number of samples, and
    grows with the number of recorded steps. On a CPU, recording *every* step of a narrow deep
    MLP (depth 50, width 100, batch 128) costs about 2.1x (LCW) to 2.5x (plain) its step time;
    inactive steps cost ~5%, so ``every=k`` amortizes it to ~``1.05 + 1.5/k``.
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
        self._pairs: dict[tuple, _Pair] = {}
        self._weights: dict[tuple, _Weight] = {}
        self._grad_norms: dict[tuple, torch.Tensor] = {}
        self._kept: dict[tuple, list[torch.Tensor]] = {}
        self._kept_n: dict[tuple, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> Recorder:
        """Register all hooks (done by ``__enter__``); returns ``self``."""
        if self._attached:
            return self
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._forward_start))
            for name, module, kind, chosen in self._sites:
                if kind == "layer":
                    hook = self._layer_hook(name, module, chosen)
                    if chosen and parametrize.is_parametrized(module, "weight"):
                        plist = module.parametrizations.weight
                        stash = self._stash_hook(id(module))
                        self._handles.append(plist.register_forward_hook(stash))
                elif chosen:
                    hook = self._site_hook(name, module, kind)
                else:
                    continue
                self._handles.append(module.register_forward_hook(hook))
            for pname, param, _owner, module in self._params:
                if param.requires_grad:
                    hook = self._param_hook(pname, module)
                    self._handles.append(param.register_post_accumulate_grad_hook(hook))
        except BaseException:
            self.remove()
            raise
        self._attached = True
        self._update()
        return self

    def remove(self) -> None:
        """Remove every hook; idempotent. Statistics stay available."""
        while self._handles:
            self._handles.pop().remove()
        self._attached = False
        self._last_out = None
        self._weight_stash.clear()
        self._update()

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
        self._step = int(step)
        self._update()

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

    # ------------------------------------------------------------------ hooks
    def _forward_start(self, module, args) -> None:
        self._last_index = None
        self._last_unit = -1
        self._last_out = None
        self._weight_stash.clear()

    def _stash_hook(self, key: int):
        """Keep the weight a parametrization just computed for its layer's forward pass, so the
        layer hook need not evaluate ``module.weight`` (e.g. the LCW basis) a second time."""

        def hook(plist, args, weight):
            if self._active:
                self._weight_stash[key] = weight

        return hook

    def _pair(self, key: tuple) -> _Pair:
        pair = self._pairs.get(key)
        if pair is None:
            pair = self._pairs[key] = _Pair()
            self._order.setdefault(key[2], len(self._order))
        return pair

    def _grad_hook(self, targets: list[Moments], dims: tuple[int, ...]):
        def hook(grad: torch.Tensor) -> None:
            if self._attached and self._pause == 0:
                moments = batch_moments(grad, dims)
                for acc in targets:
                    acc.merge(*moments)

        return hook

    def _watch(self, out: torch.Tensor, dims, moments, pair: _Pair) -> None:
        """Register the gradient hook of a site output and remember it for reuse as an input."""
        targets = None
        if out.requires_grad:
            targets = [pair.grad]
            out.register_hook(self._grad_hook(targets, dims))
        # inference tensors have no version counter, so in-place changes could not be detected
        self._last_out = None if out.is_inference() else (
            weakref.ref(out), out._version, dims, moments, targets)

    def _layer_hook(self, name: str, module: nn.Module, chosen: bool):
        is_conv = not isinstance(module, nn.Linear)
        spatial = len(module.kernel_size) if is_conv else 0
        unit_from_end = -(spatial + 1)
        groups = module.groups if is_conv else 1

        def hook(mod, args, output):
            index = self._index.get(name)
            if index is None:
                self._n_layers += 1
                index = self._index[name] = self._n_layers
            self._last_index = index
            self._last_unit = unit_from_end
            if not (chosen and self._active and isinstance(output, torch.Tensor)):
                return
            step, mode = self._step, "train" if mod.training else "eval"
            z = self._pair((step, mode, name, "z"))
            dims = reduce_dims(output.ndim, unit_from_end)
            # input a^{l-1} (before _watch(z) replaces the remembered previous output)
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None:
                inp = self._pair((step, mode, name, "input"))
                in_dims = reduce_dims(x.ndim, unit_from_end)
                last = self._last_out
                if last is not None and last[0]() is x and last[1] == x._version and (
                    last[2] == in_dims
                ):
                    moments, targets = last[3], last[4]
                else:
                    moments, targets = batch_moments(x, in_dims), None
                inp.fwd.merge(*moments)
                if x.requires_grad:
                    if targets is not None:
                        targets.append(inp.grad)
                    else:
                        x.register_hook(self._grad_hook([inp.grad], in_dims))
                self._weight_side((step, mode, name), mod, groups, moments)
            z_moments = batch_moments(output, dims)
            z.fwd.merge(*z_moments)
            if self.keep_matrix and output.ndim > spatial + 1:
                self._keep((step, name), output, dims)
            self._watch(output, dims, z_moments, z)

        return hook

    def _weight_side(self, key: tuple, mod: nn.Module, groups: int, moments) -> None:
        count, mu, _ = moments
        with torch.no_grad():
            w = self._weight_stash.pop(id(mod), None)
            w = (mod.weight if w is None else w).detach()
            out_units = w.shape[0]
            ws = self._weights.get(key)
            if ws is None:
                ws = self._weights[key] = _Weight(groups, w[0, 0].numel())
            if ws.w_norm is None:
                rows = w.reshape(out_units, -1)  # reduce in the weight's dtype, then cast
                ws.w_sum = rows.sum(1).to(torch.float64)
                ws.w_norm = torch.linalg.vector_norm(rows, dim=1).to(torch.float64)
                if mod.bias is not None:
                    ws.bias = mod.bias.detach().to(torch.float64, copy=True)
            if w.ndim == 2:  # Linear: one mat-vec in the weight's dtype
                dot = torch.mv(w, mu.to(w.dtype)).to(torch.float64)
            else:  # per-unit weight sums per input channel (out, cin/g), then per group
                wc = w.reshape(out_units, w.shape[1], -1).sum(-1).to(torch.float64)
                dot = torch.bmm(
                    wc.reshape(groups, out_units // groups, -1), mu.reshape(groups, -1, 1)
                ).reshape(out_units)
            ws.w_dot_mu.merge(count, dot)

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
        channel = isinstance(module, _CHANNEL_NORMS)

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
            step, mode = self._step, "train" if mod.training else "eval"
            pair = self._pair((step, mode, name, site))
            dims = reduce_dims(ndim, unit)
            moments = batch_moments(output, dims)
            pair.fwd.merge(*moments)
            self._watch(output, dims, moments, pair)

        return hook

    def _param_hook(self, pname: str, module: nn.Module):
        def hook(param: torch.Tensor) -> None:
            if self._active and param.grad is not None:
                mode = "train" if module.training else "eval"
                # float64 inside the reduction: vanishing gradients (~1e-30) would underflow
                self._grad_norms[(self._step, mode, pname)] = torch.linalg.vector_norm(
                    param.grad.detach(), dtype=torch.float64
                )

        return hook

    # ------------------------------------------------------------------ results
    def state_numel(self) -> int:
        """Total number of tensor elements in the accumulators (``keep_matrix`` copies excluded)."""
        total = sum(p.fwd.numel() + p.grad.numel() for p in self._pairs.values())
        for ws in self._weights.values():
            total += ws.w_dot_mu.numel()
            total += sum(t.numel() for t in (ws.w_sum, ws.w_norm, ws.bias) if t is not None)
        return total + len(self._grad_norms)

    def matrices(self) -> dict[tuple[int, str], np.ndarray]:
        """Kept preactivation matrices: ``{(step, layer): array}``.

        Each array holds the first ``keep_matrix`` samples of the layer output ``z`` recorded in
        that step (any mode), units first: ``(units, samples)`` for a Linear layer,
        ``(channels, samples, *spatial)`` for a conv, ``(units, samples, *middle)`` for a Linear
        applied to ``(N, ..., features)``. Rows are neurons, so activation shift shows as horizontal
        stripes (``plt.imshow(m)``).
        """
        return {key: torch.cat(chunks, dim=1).numpy() for key, chunks in self._kept.items()}

    def frame(self) -> pd.DataFrame:
        """All statistics as a tidy long-format DataFrame (see the class docstring)."""
        blocks: list[tuple] = []

        def emit(key, index, layer, site, stat, values, per_unit):
            blocks.append((key[0], key[1], index, layer, site, stat, values, per_unit))

        def emit_pair(key, index, layer, site, pair):
            for prefix, acc in (("", pair.fwd), ("grad_", pair.grad)):
                if acc.count == 0:
                    continue
                mean, var = acc.mean.cpu().numpy(), acc.var.cpu().numpy()
                emit(key, index, layer, site, prefix + "mean", mean, True)
                emit(key, index, layer, site, prefix + "var", var, True)
                emit(key, index, layer, site, prefix + "count", float(acc.count), False)
                for stat, value in summarize(mean, var).items():
                    emit(key, index, layer, site, prefix + stat, value, False)

        groups: dict[tuple, list[str]] = {}
        for step, mode, layer, site in self._pairs:
            groups.setdefault((step, mode, layer), []).append(site)
        for step, mode, layer in self._weights:
            groups.setdefault((step, mode, layer), [])

        def order(key):
            index = self._index.get(key[2])
            return (key[0], key[1], math.inf if index is None else index,
                    self._order.get(key[2], math.inf), key[2])

        for key in sorted(groups, key=order):
            step, mode, layer = key
            index = self._index.get(layer)
            sites = sorted(set(groups[key]) | ({"weight"} if key in self._weights else set()),
                           key=_SITE_ORDER.get)
            for site in sites:
                if site == "weight":
                    self._emit_weight_and_layer(emit, key, index)
                else:
                    emit_pair(key, index, layer, site, self._pairs[key + (site,)])
        owners = {pname: (i, owner) for i, (pname, _, owner, _) in enumerate(self._params)}

        def param_order(item):
            (step, mode, pname), _ = item
            position, owner = owners[pname]
            index = self._index.get(owner)
            return (step, mode, math.inf if index is None else index, position)

        for (step, mode, pname), norm in sorted(self._grad_norms.items(), key=param_order):
            index = self._index.get(owners[pname][1])
            emit((step, mode), index, pname, "param", "grad_norm", float(norm), False)
        return _blocks_to_frame(blocks)

    def _emit_weight_and_layer(self, emit, key, index) -> None:
        layer = key[2]
        ws = self._weights[key]
        inp = self._pairs.get(key + ("input",))
        z = self._pairs.get(key + ("z",))
        w_sum, w_norm = ws.w_sum.cpu().numpy(), ws.w_norm.cpu().numpy()
        bias = np.zeros_like(w_sum) if ws.bias is None else ws.bias.cpu().numpy()
        emit(key, index, layer, "weight", "w_sum", w_sum, True)
        emit(key, index, layer, "weight", "w_norm", w_norm, True)
        derived: list[tuple[str, object, bool]] = []
        if inp is not None and inp.fwd.count and ws.w_dot_mu.count:
            mu = inp.fwd.mean.cpu().numpy().reshape(ws.groups, -1)  # (groups, cin/g)
            per_group = w_sum.shape[0] // ws.groups
            mu_norm = np.repeat(np.sqrt(ws.taps) * np.linalg.norm(mu, axis=1), per_group)
            gamma = np.repeat(mu.mean(axis=1), per_group)
            dot = ws.w_dot_mu.mean.cpu().numpy()
            with np.errstate(divide="ignore", invalid="ignore"):
                cos = dot / (w_norm * mu_norm)
            emit(key, index, layer, "weight", "mu_norm", mu_norm, True)
            emit(key, index, layer, "weight", "w_dot_mu", dot, True)
            emit(key, index, layer, "weight", "cos_theta", cos, True)
            pred, pred_gamma = dot + bias, gamma * w_sum + bias
            derived += [("mean_pred", pred, True), ("mean_pred_gamma", pred_gamma, True),
                        ("gamma", float(mu.mean()), False)]
            if z is not None and z.fwd.count:
                zm = z.fwd.mean.cpu().numpy()
                derived += [("mean_pred_r2", _r2(zm, pred), False),
                            ("mean_pred_gamma_r2", _r2(zm, pred_gamma), False)]
        if ws.bias is not None:
            emit(key, index, layer, "weight", "bias", bias, True)
        fwd = bwd = None
        if z is not None and inp is not None and z.fwd.count and inp.fwd.count:
            fwd = _div(_pooled(z.fwd), _pooled(inp.fwd))
            derived.append(("fwd_amp", fwd, False))
        if z is not None and inp is not None and z.grad.count and inp.grad.count:
            bwd = _div(_pooled(inp.grad), _pooled(z.grad))
            derived.append(("bwd_amp", bwd, False))
        if fwd is not None and bwd is not None:
            derived.append(("amp_ratio", _div(fwd, bwd), False))
        for stat, value, per_unit in derived:
            emit(key, index, layer, "layer", stat, value, per_unit)


def _pooled(acc: Moments) -> float:
    mean, var = acc.mean.cpu().numpy(), acc.var.cpu().numpy()
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
