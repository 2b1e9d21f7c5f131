"""The public API is small, explicit and loads lazily."""

import subprocess
import sys

import pytest

import lcw_analysis as la


@pytest.mark.parametrize("name", la.__all__)
def test_every_export_resolves(name):
    assert getattr(la, name) is not None


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        la.nope  # noqa: B018


def test_runner_import_does_not_load_torch():
    code = ("import sys, lcw_analysis, lcw_analysis.runner, lcw_analysis.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
