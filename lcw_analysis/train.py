"""Mini-batch training that returns a tidy history: ``train(model, data, ...) -> DataFrame``.

History columns ``step, epoch, split, metric, value, elapsed``:

- ``split="train", metric="loss"``: the mini-batch loss of every optimizer step (train mode),
  measured before that step's update; ``step`` counts the updates already applied (from 0).
- ``split="train_eval"`` and ``split="test"``, metrics ``loss`` and ``accuracy``: the full training
  and test sets evaluated in eval mode (BN uses running statistics) without grad, before training
  (``epoch=0, step=0``) and after every epoch (``step`` = updates so far).
- ``split="train", metric="diverged"``: written once when a training loss is NaN/inf; ``value`` is
  the step. Training then ends without an exception.

``elapsed`` is wall-clock seconds since ``train`` started. ``history.attrs`` holds ``diverged_at``
and ``stopped_at`` (step or ``None``) and the run's ``config``.

Recorder protocol (see :mod:`lcw_analysis.recorder`): ``recorder.begin_step(step)`` is called
before each training forward pass and every evaluation runs inside ``with recorder.paused():``.
The caller creates and enters the recorder.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from .data import Dataset

__all__ = ["OPTIMIZERS", "LOSSES", "SPLITS", "COLUMNS", "train", "evaluate"]

OPTIMIZERS = ("sgd", "momentum", "adam")
LOSSES = ("cross_entropy",)
SPLITS = ("train", "train_eval", "test")
COLUMNS = ("step", "epoch", "split", "metric", "value", "elapsed")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.01, "adam": 1e-3}

Callback = Callable[[str, dict], object]


def _resolve_device(device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device or 'auto'") from err


def _split_data(data) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)`` from a Dataset or a 2-/4-tuple of tensors."""
    if isinstance(data, Dataset):
        parts = (data.x_train, data.y_train, data.x_test, data.y_test)
    elif isinstance(data, tuple | list) and len(data) in (2, 4):
        parts = tuple(data) + (None, None) * (len(data) == 2)
    else:
        raise TypeError(
            "data must be a lcw_analysis.Dataset or a tuple (x_train, y_train[, x_test, y_test]) "
            f"of tensors, got {type(data).__name__}"
        )
    for i, (x, y) in enumerate((parts[:2], parts[2:])):
        split = ("train", "test")[i]
        if x is None and y is None and i == 1:
            continue
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"x_{split} and y_{split} must be torch tensors")
        if not x.is_floating_point():
            raise TypeError(f"x_{split} must be a floating-point tensor, got {x.dtype}")
        if y.dtype != torch.int64 or y.ndim != 1:
            raise TypeError(f"y_{split} must be a 1-D int64 tensor, got {y.dtype} {tuple(y.shape)}")
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x_{split} has {len(x)} samples but y_{split} has {len(y)}")
    if parts[2] is not None and parts[0].shape[1:] != parts[2].shape[1:]:
        raise ValueError(
            f"x_train inputs are {tuple(parts[0].shape[1:])} but x_test inputs are "
            f"{tuple(parts[2].shape[1:])}"
        )
    return parts


def _make_optimizer(optimizer, params, lr, momentum, weight_decay) -> torch.optim.Optimizer:
    if callable(optimizer):
        if lr is not None or momentum is not None or weight_decay:
            raise ValueError(
                "lr, momentum and weight_decay belong inside an optimizer factory; "
                "leave them unset when optimizer is a callable"
            )
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer"
            )
        return opt
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if momentum is None:
        momentum = 0.9 if optimizer == "momentum" else 0.0
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _check_args(optimizer, lr, epochs, batch_size, weight_decay, momentum, seed, loss, callbacks):
    if not callable(optimizer) and optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer={optimizer!r} is not known; expected one of {OPTIMIZERS} "
            "or a callable params -> torch.optim.Optimizer"
        )
    number = isinstance(lr, int | float) and not isinstance(lr, bool)
    if lr is not None and not (number and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    for param, value in (("epochs", epochs), ("batch_size", batch_size), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{param} must be an integer, got {value!r}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (isinstance(weight_decay, int | float) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if momentum is not None:
        if optimizer == "adam":
            raise ValueError("momentum applies to 'sgd' and 'momentum', not 'adam'")
        if not (isinstance(momentum, int | float) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not known; expected one of {LOSSES} or a callable")
    for cb in callbacks:
        if not callable(cb):
            raise TypeError(f"callbacks must be callables (event, state) -> None | 'stop': {cb!r}")


def _loss_fn(loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return nn.functional.cross_entropy if loss == "cross_entropy" else loss


def _check_forward(model, x, y, loss_fn, device) -> None:
    """Run the model on two training inputs (eval mode, no grad) and fail with a clear error."""
    probe = x[:2].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = model(probe)
            except Exception as err:
                raise ValueError(
                    f"the model cannot process the data: inputs of shape {tuple(probe.shape)} "
                    f"(one input is {tuple(probe.shape[1:])}) failed with "
                    f"{type(err).__name__}: {err}"
                ) from err
            classes = int(y.max()) + 1
            if loss_fn is nn.functional.cross_entropy and (
                out.ndim != 2 or out.shape[0] != len(probe) or out.shape[1] < classes
            ):
                raise ValueError(
                    f"the model maps inputs {tuple(probe.shape)} to outputs {tuple(out.shape)}; "
                    f"cross-entropy needs (batch, classes) with at least {classes} classes"
                )
            try:
                loss_fn(out, y[:2].to(device))
            except Exception as err:
                raise ValueError(
                    f"the loss fails on model outputs {tuple(out.shape)} and targets "
                    f"{tuple(y[:2].shape)}: {type(err).__name__}: {err}"
                ) from err
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str | Callable = "cross_entropy",
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Mean loss and accuracy over ``(x, y)`` in eval mode without grad (the mode is restored).

    Accuracy (argmax of ``(N, classes)`` outputs) is ``nan`` for other output shapes.
    """
    loss_fn = _loss_fn(loss)
    was_training = model.training
    model.eval()
    total, correct, has_acc = 0.0, 0, True
    try:
        for start in range(0, len(y), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            out = model(xb)
            total += float(loss_fn(out, yb)) * len(yb)
            if out.ndim == 2 and out.shape[0] == len(yb):
                correct += int((out.argmax(dim=1) == yb).sum())
            else:
                has_acc = False
    finally:
        model.train(was_training)
    n = len(y)
    return {"loss": total / n, "accuracy": correct / n if has_acc else math.nan}


def train(
    model: nn.Module,
    data: Dataset | tuple,
    *,
    optimizer: str | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = "sgd",
    lr: float | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    momentum: float | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
    recorder=None,
    callbacks: Iterable[Callback] = (),
    progress: bool = True,
    eval_batch_size: int = 1024,
) -> pd.DataFrame:
    """Train ``model`` on ``data`` and return the tidy history (see the module docstring).

    - ``data``: a :class:`~lcw_analysis.data.Dataset` or ``(x_train, y_train[, x_test, y_test])``.
    - ``optimizer``: ``"sgd"``, ``"momentum"`` (SGD with ``momentum=0.9`` unless given) or
      ``"adam"``, or a factory ``params -> torch.optim.Optimizer`` that owns its hyperparameters.
      ``lr`` defaults to 0.1 / 0.01 / 1e-3 respectively. ``weight_decay`` is the optimizer's L2
      term (on the free parameters, e.g. LCW's ``v``).
    - ``seed`` drives only the shuffling (a dedicated ``torch.Generator``); the caller seeds the
      model's initialization. Same seed and model → identical history on CPU (except
      ``elapsed``). Models with dropout also draw from torch's global RNG.
    - ``device``: ``"auto"`` picks CUDA when present; the model is moved there in place.
    - ``loss``: ``"cross_entropy"`` or a callable ``(outputs, targets) -> mean loss``.
    - ``recorder``: an entered recorder; see the module docstring for the protocol.
    - ``callbacks``: ``callback(event, state)`` with ``event`` in ``"step"`` (after each update)
      and ``"epoch"`` (after each evaluation, including epoch 0). ``state`` keys: ``event``,
      ``model``, ``optimizer``, ``step`` (updates so far), ``epoch``, ``loss`` (the last
      mini-batch loss or ``None``), ``metrics`` (``{split: {metric: value}}`` at ``"epoch"``,
      else ``None``), ``elapsed``. Returning ``"stop"`` ends training (after a final evaluation
      when stopped mid-epoch); any other value but ``None`` is an error.
    - A trailing mini-batch of a single sample is skipped (BN cannot train on it).
    """
    callbacks = list(callbacks) if not callable(callbacks) else [callbacks]
    _check_args(optimizer, lr, epochs, batch_size, weight_decay, momentum, seed, loss, callbacks)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be an integer >= 1, got {eval_batch_size!r}")
    if recorder is not None and not (
        callable(getattr(recorder, "begin_step", None))
        and callable(getattr(recorder, "paused", None))
    ):
        raise TypeError("recorder must provide begin_step(step) and paused() (a Recorder)")
    x_train, y_train, x_test, y_test = _split_data(data)
    dev = _resolve_device(device)
    loss_fn = _loss_fn(loss)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = _make_optimizer(optimizer, params, lr, momentum, weight_decay)

    def paused():
        return recorder.paused() if recorder is not None else nullcontext()

    with paused():
        _check_forward(model, x_train, y_train, loss_fn, dev)

    x_train, y_train = x_train.to(dev), y_train.to(dev)
    n = len(y_train)
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(batches) > 1 and batches[-1][1] - batches[-1][0] == 1:
        batches.pop()
    generator = torch.Generator().manual_seed(seed)
    start_time = time.perf_counter()
    rows: list[tuple] = []
    state = {"step": 0, "epoch": 0, "loss": None}
    diverged_at = stopped_at = None

    def elapsed() -> float:
        return time.perf_counter() - start_time

    def notify(event: str, metrics=None) -> bool:
        info = dict(
            event=event, model=model, optimizer=opt, metrics=metrics, elapsed=elapsed(), **state
        )
        stop = False
        for cb in callbacks:
            answer = cb(event, info)
            if answer is not None and answer != "stop":
                raise ValueError(f"callback {cb!r} returned {answer!r}; expected None or 'stop'")
            stop = stop or answer == "stop"
        return stop

    def evaluation() -> bool:
        metrics = {}
        with paused():
            splits = [("train_eval", x_train, y_train), ("test", x_test, y_test)]
            for split, x, y in splits:
                if x is None:
                    continue
                metrics[split] = evaluate(model, x, y, loss_fn, eval_batch_size, dev)
                for metric, value in metrics[split].items():
                    rows.append((state["step"], state["epoch"], split, metric, value, elapsed()))
        return notify("epoch", metrics)

    quiet = not progress or bool(os.environ.get("CI"))
    bar = tqdm(total=epochs * len(batches), disable=quiet, desc="train", leave=False)
    was_training = model.training
    try:
        stop = evaluation()
        if stop:
            stopped_at = 0
        for epoch in range(1, epochs + 1):
            if stop:
                break
            state["epoch"] = epoch
            model.train()
            order = torch.randperm(n, generator=generator).to(dev)
            for a, b in batches:
                idx = order[a:b]
                if recorder is not None:
                    recorder.begin_step(state["step"])
                out = model(x_train[idx])
                batch_loss = loss_fn(out, y_train[idx])
                value = batch_loss.item()
                rows.append((state["step"], epoch, "train", "loss", value, elapsed()))
                if not math.isfinite(value):
                    diverged_at = state["step"]
                    rows.append((diverged_at, epoch, "train", "diverged", diverged_at, elapsed()))
                    break
                opt.zero_grad(set_to_none=True)
                batch_loss.backward()
                opt.step()
                state["step"] += 1
                state["loss"] = value
                bar.update()
                if not quiet and state["step"] % 10 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{value:.4g}", refresh=False)
                if notify("step"):
                    stop = True
                    stopped_at = state["step"]
                    break
            if diverged_at is not None:
                break
            if stop:
                evaluation()
                break
            if evaluation():
                stop, stopped_at = True, state["step"]
    finally:
        bar.close()
        model.train(was_training)

    history = pd.DataFrame(rows, columns=list(COLUMNS))
    history = history.astype({"step": "int64", "epoch": "int64", "value": "float64"})
    history.attrs["diverged_at"] = diverged_at
    history.attrs["stopped_at"] = stopped_at
    history.attrs["config"] = {
        "optimizer": optimizer if isinstance(optimizer, str) else repr(optimizer),
        "lr": opt.param_groups[0].get("lr"),
        "epochs": epochs,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "momentum": opt.param_groups[0].get("momentum"),
        "seed": seed,
        "device": str(dev),
    }
    return history
