"""lcw-analysis: activation shift and Linearly Constrained Weights (Kutsuna, ECML-PKDD 2019).

Public API (imported lazily, so ``lcw-analysis list`` and the runner do not load torch)::

    la.build_mlp(...), la.apply_lcw(model), la.lcw_violation(model)    # LCW layers and models
    with la.Recorder(model) as rec: ...; rec.frame()                   # hooks -> tidy DataFrame
    la.probe(model, x, y), la.theory.asymmetry_factor("sigmoid", 1.0)  # measure / predict
    la.load_dataset("mnist1d"), la.train(model, data)                  # data and training
    la.run_studies("all"), la.collect(), la.build_report()             # batch runs of notebooks
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    # layers and models
    "LCW": "parametrizations",
    "Centered": "parametrizations",
    "Standardized": "parametrizations",
    "apply_lcw": "parametrizations",
    "lcw_violation": "parametrizations",
    "build_mlp": "models",
    "default_gain": "models",
    "make_activation": "models",
    "NORMS": "models",
    # recorder and theory
    "Recorder": "recorder",
    "probe": "recorder",
    "theory": None,
    # data and training
    "Dataset": "data",
    "DataFormatError": "data",
    "DATASETS": "data",
    "load_dataset": "data",
    "train": "train",
    "evaluate": "train",
    # batch runs
    "run_studies": "runner",
    "collect": "runner",
    "discover_studies": "runner",
    "StudyError": "runner",
    "build_report": "report",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lcw_analysis' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = import_module(f".{name}" if module is None else f".{module}", __name__)
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
