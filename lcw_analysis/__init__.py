"""lcw-analysis: activation shift and Linearly Constrained Weights (Kutsuna, ECML-PKDD 2019).

Public API::

    from lcw_analysis import build_mlp, apply_lcw, lcw_violation   # models and LCW layers
"""

from .models import NORMS, build_mlp, default_gain, make_activation
from .parametrizations import LCW, Centered, Standardized, apply_lcw, lcw_violation

# recorder and theory (issue 3)
# data and training (issue 4)
# isort: split
from .data import DATASETS, DataFormatError, Dataset, load_dataset
from .train import evaluate, train

# isort: split
# runner (issue 5)
from .report import build_report
from .runner import StudyError, collect, discover_studies, run_studies

__version__ = "0.1.0"

__all__ = [
    # layers and models
    "LCW",
    "Centered",
    "Standardized",
    "apply_lcw",
    "lcw_violation",
    "build_mlp",
    "default_gain",
    "make_activation",
    "NORMS",
    # recorder and theory
    # data and training
    "Dataset",
    "DataFormatError",
    "DATASETS",
    "load_dataset",
    "train",
    "evaluate",
    # runner
    "run_studies",
    "collect",
    "build_report",
    "discover_studies",
    "StudyError",
]
