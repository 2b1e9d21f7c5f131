"""lcw-analysis: activation shift and Linearly Constrained Weights (Kutsuna, ECML-PKDD 2019).

Public API::

    from lcw_analysis import build_mlp, apply_lcw, lcw_violation   # models and LCW layers
"""

from .models import NORMS, build_mlp, default_gain, make_activation
from .parametrizations import LCW, Centered, Standardized, apply_lcw, lcw_violation

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
]
