"""Training loop: history schema, determinism, divergence, callbacks, recorder protocol, errors."""

from contextlib import contextmanager

import pandas as pd
import pytest
import torch
from torch import nn

from lcw_analysis.data import load_dataset
from lcw_analysis.models import build_mlp
from lcw_analysis.train import COLUMNS, OPTIMIZERS, evaluate, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def small(digits):
    return load_dataset("digits", subset=(200, 100))


def mlp(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"depth": 2, "width": 32, "activation": "relu", **kwargs}
    return build_mlp(64, 10, **kwargs)


def run(data, model=None, **kwargs):
    kwargs = {"epochs": 2, "batch_size": 50, "progress": False, "device": "cpu", **kwargs}
    return train(mlp() if model is None else model, data, **kwargs)


def test_two_layer_relu_mlp_reaches_90_percent_on_digits(digits):
    model = mlp(width=64)
    history = train(model, digits, optimizer="momentum", epochs=5, batch_size=32, progress=False)
    acc = history.query("split == 'test' and metric == 'accuracy'")
    assert acc.value.iloc[0] < 0.3  # epoch 0: before training
    assert acc.value.iloc[-1] >= 0.90
    assert acc.epoch.tolist() == [0, 1, 2, 3, 4, 5]


def test_history_schema(small):
    history = run(small)
    assert list(history.columns) == list(COLUMNS)
    assert history.dtypes["step"] == "int64" and history.dtypes["value"] == "float64"
    assert set(history.split) == {"train", "train_eval", "test"}
    steps = history.query("split == 'train' and metric == 'loss'")
    assert steps.step.tolist() == list(range(8))  # 200 / 50 = 4 steps per epoch, 2 epochs
    assert steps.epoch.tolist() == [1] * 4 + [2] * 4
    evals = history[history.split != "train"]
    assert len(evals) == 3 * 4  # epochs 0, 1, 2 × (train_eval, test) × (loss, accuracy)
    assert evals.groupby("epoch").step.first().tolist() == [0, 4, 8]
    assert set(evals.metric) == {"loss", "accuracy"}
    assert history.elapsed.is_monotonic_increasing and history.elapsed.min() >= 0
    assert history.attrs["diverged_at"] is None and history.attrs["stopped_at"] is None
    assert history.attrs["config"]["optimizer"] == "sgd" and history.attrs["config"]["lr"] == 0.1


def test_evaluation_uses_eval_mode_without_grad_and_restores_the_mode(small):
    model = mlp(norm="bn")
    history = run(small, model, epochs=1)
    assert model.training  # restored
    model.eval()
    direct = evaluate(model, small.x_test, small.y_test)
    last = history.query("split == 'test' and epoch == 1").set_index("metric").value
    assert direct["loss"] == pytest.approx(last["loss"], rel=1e-6)
    assert direct["accuracy"] == pytest.approx(last["accuracy"])
    assert not model.training


def test_same_seed_same_history_different_seed_different(small):
    a = run(small, mlp(0), seed=3, optimizer="momentum", lr=0.05)
    b = run(small, mlp(0), seed=3, optimizer="momentum", lr=0.05)
    c = run(small, mlp(0), seed=4, optimizer="momentum", lr=0.05)
    pd.testing.assert_frame_equal(a.drop(columns="elapsed"), b.drop(columns="elapsed"))
    steps = "split == 'train' and metric == 'loss'"
    assert a.query(steps).value.iloc[0] != c.query(steps).value.iloc[0]  # other shuffling
    assert a.query("epoch == 0").value.tolist() == c.query("epoch == 0").value.tolist()


def test_training_does_not_touch_the_global_rng(small):
    model = mlp(0)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    run(small, model, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_a_deep_plain_relu_net_blowing_up_is_a_result_not_a_crash(small):
    model = mlp(depth=10, width=64)
    history = run(small, model, lr=1e3, epochs=5)
    at = history.attrs["diverged_at"]
    assert at is not None
    last = history.iloc[-1]
    assert last.metric == "diverged" and last.value == at and last.split == "train"
    steps = history.query("split == 'train' and metric == 'loss'")
    assert steps.step.max() == at and not torch.isfinite(torch.tensor(steps.value.iloc[-1]))
    assert (history.metric == "diverged").sum() == 1


def test_divergence_at_an_exact_step_stops_without_evaluating(small):
    training_calls = []

    def loss(out, y):
        value = nn.functional.cross_entropy(out, y)
        if torch.is_grad_enabled():  # not the shape check or an evaluation
            training_calls.append(1)
            if len(training_calls) == 6:
                return value * float("nan")
        return value

    history = run(small, loss=loss, epochs=3)
    assert history.attrs["diverged_at"] == 5
    assert history.step.max() == 5 and history.epoch.max() == 2
    assert history.query("split == 'test'").epoch.max() == 1


def test_callbacks_see_steps_and_epochs(small):
    seen = []

    def callback(event, state):
        seen.append((event, state["step"], state["epoch"]))
        assert {"model", "optimizer", "loss", "metrics", "elapsed", "event"} <= set(state)
        if event == "epoch":
            assert set(state["metrics"]) == {"train_eval", "test"}
            assert set(state["metrics"]["test"]) == {"loss", "accuracy"}
        else:
            assert state["metrics"] is None and isinstance(state["loss"], float)

    run(small, callbacks=[callback])
    assert seen[0] == ("epoch", 0, 0)
    assert [s for e, s, _ in seen if e == "step"] == list(range(1, 9))
    assert [(s, ep) for e, s, ep in seen if e == "epoch"] == [(0, 0), (4, 1), (8, 2)]


def test_a_callback_can_stop_training(small):
    def stop_at_5(event, state):
        return "stop" if event == "step" and state["step"] == 5 else None

    history = run(small, callbacks=[stop_at_5], epochs=10)
    assert history.attrs["stopped_at"] == 5
    assert history.query("split == 'train' and metric == 'loss'").step.max() == 4
    final = history.query("split == 'test'")
    assert final.step.max() == 5 and final.epoch.max() == 2  # final evaluation, mid-epoch 2

    def stop_after_epoch_1(event, state):
        return "stop" if event == "epoch" and state["epoch"] == 1 else None

    history = run(small, callbacks=stop_after_epoch_1, epochs=10)  # a single callable is fine
    assert history.attrs["stopped_at"] == 4 and history.epoch.max() == 1

    with pytest.raises(ValueError, match="expected None or 'stop'"):
        run(small, callbacks=[lambda event, state: "Stop"])


class FakeRecorder:
    """Records the protocol calls and whether each forward pass ran paused."""

    def __init__(self, model):
        self.log, self.is_paused = [], False
        model.register_forward_pre_hook(self._forward)

    def _forward(self, module, args):
        self.log.append(("forward", self.is_paused, module.training))

    def begin_step(self, step):
        assert not self.is_paused
        self.log.append(("begin", step))

    @contextmanager
    def paused(self):
        self.is_paused = True
        self.log.append(("pause",))
        try:
            yield
        finally:
            self.is_paused = False
            self.log.append(("resume",))


def test_recorder_protocol(small):
    model = mlp()
    rec = FakeRecorder(model)
    run(small, model, recorder=rec)
    begins = [e[1] for e in rec.log if e[0] == "begin"]
    assert begins == list(range(8))
    forwards = [(i, e) for i, e in enumerate(rec.log) if e[0] == "forward"]
    for i, (_, paused, training) in forwards:
        if training:  # a training step: right after its begin_step, never paused
            assert not paused and rec.log[i - 1][0] == "begin"
        else:  # shape check and evaluations: always paused
            assert paused
    assert sum(1 for _, e in forwards if e[2]) == 8
    assert sum(1 for e in rec.log if e[0] == "pause") == 1 + 3  # shape check + epochs 0, 1, 2


def test_with_the_real_recorder(small):
    recorder_module = pytest.importorskip("lcw_analysis.recorder")
    Recorder = getattr(recorder_module, "Recorder", None)
    if Recorder is None:
        pytest.skip("lcw_analysis.recorder has no Recorder yet")
    model = mlp()
    try:
        rec_cm = Recorder(model, every=2)
    except TypeError as err:  # the recorder's API may still change
        pytest.skip(f"Recorder(model, every=2) is not supported: {err}")
    with rec_cm as rec:
        history = run(small, model, recorder=rec)
    assert history.attrs["diverged_at"] is None
    frame = rec.frame() if callable(getattr(rec, "frame", None)) else None
    if isinstance(frame, pd.DataFrame) and "step" in frame.columns:
        assert set(frame.step) == {0, 2, 4, 6}  # training steps on its schedule, no evaluations
        if "mode" in frame.columns:
            assert set(frame["mode"]) == {"train"}


def test_optimizers_by_name_and_factory(small):
    for name in OPTIMIZERS:
        history = run(small, optimizer=name, epochs=1)
        assert history.attrs["diverged_at"] is None
    assert run(small, optimizer="momentum", epochs=0).attrs["config"]["momentum"] == 0.9
    history = run(small, optimizer=lambda p: torch.optim.SGD(p, lr=0.05), epochs=1)
    assert history.attrs["config"]["lr"] == 0.05
    assert run(small, optimizer=torch.optim.RMSprop, epochs=1).attrs["diverged_at"] is None


def test_zero_epochs_and_tuple_data(small):
    history = run(small, epochs=0)
    assert len(history) == 4 and set(history.epoch) == {0}
    history = run((small.x_train, small.y_train), epochs=1)
    assert set(history.split) == {"train", "train_eval"}


def test_a_trailing_single_sample_batch_is_skipped_for_batch_norm(small):
    data = (small.x_train[:33], small.y_train[:33])
    history = run(data, mlp(norm="bn"), batch_size=32, epochs=2)
    assert history.query("split == 'train'").step.tolist() == [0, 1]


def test_progress_bar_is_quiet_under_ci(small, capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    run(small, epochs=1, progress=True)
    assert "train" in capsys.readouterr().err
    monkeypatch.setenv("CI", "true")
    run(small, epochs=1, progress=True)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"optimizer": "rmsprop"}, ValueError, r"expected one of \('sgd', 'momentum', 'adam'\)"),
        ({"lr": 0}, ValueError, "lr must be a finite number > 0"),
        ({"lr": -1.0}, ValueError, "lr must be"),
        ({"epochs": -1}, ValueError, "epochs must be >= 0"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"optimizer": "adam", "momentum": 0.9}, ValueError, "momentum applies to"),
        ({"optimizer": torch.optim.SGD, "lr": 0.1}, ValueError, "inside an optimizer factory"),
        ({"optimizer": lambda p: 42}, TypeError, "not a torch.optim.Optimizer"),
        ({"loss": "hinge"}, ValueError, "loss='hinge' is not known"),
        ({"callbacks": [42]}, TypeError, "callbacks must be callables"),
        ({"recorder": object()}, TypeError, "begin_step"),
        ({"device": "warp-drive"}, ValueError, "not a torch device"),
    ],
)
def test_bad_arguments_fail_before_any_work(small, kwargs, error, match):
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        run(small, model, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bad_data_fails_with_a_clear_error(small):
    with pytest.raises(TypeError, match="Dataset or a tuple"):
        run("digits")
    with pytest.raises(TypeError, match="y_train must be a 1-D int64"):
        run((small.x_train, small.y_train.float()))
    with pytest.raises(ValueError, match="200 samples but y_train has 10"):
        run((small.x_train, small.y_train[:10]))
    mnist1d_sized = build_mlp(40, 10, depth=1, width=8)
    with pytest.raises(ValueError, match=r"inputs of shape \(2, 64\)"):
        run(small, mnist1d_sized)
    with pytest.raises(ValueError, match="at least 10 classes"):
        run(small, build_mlp(64, 3, depth=1, width=8))
