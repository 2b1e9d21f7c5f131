"""The ``lcw-analysis`` command line: list, run (in a subprocess), collect, report, errors."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from lcw_analysis import runner
from lcw_analysis.cli import main

PARAMS = """\
n: int = 2  # number of rows
scale: float = 1.5  # multiplier
activation: str = "relu"  # nonlinearity
seed: int = 0  # random seed
out_dir: str = "."  # output folder"""

BODY = """\
import os
with open(os.path.join(out_dir, "results.csv"), "w") as f:
    f.write("i,value\\n" + "".join(f"{i},{i * scale + seed}\\n" for i in range(n)))
with open(os.path.join(out_dir, "tiny.png"), "wb") as f:
    f.write(b"\\x89PNG\\r\\n\\x1a\\n")
"""


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "notebooks"
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(PARAMS)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(BODY)]
    nbformat.write(nb, folder / "01_toy.ipynb")
    (folder / "presets").mkdir()
    (folder / "presets" / "01_toy.full.yaml").write_text("n: 50\n")
    return folder


@pytest.fixture
def no_kernel(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel was started")

    monkeypatch.setattr(papermill, "execute_notebook", forbidden)
    monkeypatch.setattr(runner, "_execute", forbidden)


def test_list_shows_parameters_with_types_defaults_and_help(notebooks, capsys):
    assert main(["list", "--notebooks", str(notebooks)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("01_toy  (")
    lines = [line.split() for line in text.splitlines()]
    assert ["n:", "int", "=", "2", "number", "of", "rows"] in lines
    assert ["scale:", "float", "=", "1.5", "multiplier"] in lines
    assert ["activation:", "str", "=", "'relu'", "nonlinearity"] in lines
    assert "set by the runner" in text
    assert "presets: full, quick (defaults)" in text


@pytest.mark.parametrize("argv, message", [
    (["run", "nope"], "unknown study 'nope'; studies: 01_toy"),
    (["run", "toy", "-p", "depth=3"], "unknown parameter 'depth' for study 01_toy; valid: n,"),
    (["run", "toy", "-p", "n=two"], "parameter 'n' (from -p): expected int, got two"),
    (["run", "toy", "--grid", "n=1,x"], "parameter 'n' (from --grid): expected int, got x"),
    (["run", "toy", "--grid", "n"], "--grid 'n': expected key=value"),
    (["run", "toy", "--preset", "paper"], "presets/01_toy.paper.yaml"),
    (["run", "toy", "-f", "/nonexistent/p.yaml"], "cannot read parameters file"),
    (["run", "toy", "--workers", "0"], "--workers: expected an integer >= 1, got 0"),
])
def test_bad_input_exits_2_before_any_kernel(notebooks, tmp_path, capsys, no_kernel, argv,
                                             message):
    argv = argv + ["--notebooks", str(notebooks), "--out", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lcw-analysis run: error: ") and message in err
    assert not (tmp_path / "runs").exists()


def test_dry_run_lists_planned_runs(notebooks, tmp_path, capsys, no_kernel):
    argv = ["run", "01", "--grid", "n=1,2", "--seeds", "2", "--preset", "full", "--dry-run",
            "--notebooks", str(notebooks), "--out", str(tmp_path)]
    assert main(argv) == 0
    planned = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [p[0] for p in planned] == ["planned"] * 4
    assert planned[0][1].startswith("01_toy/n=1_seed=0_")


def test_console_script_runs_a_study_then_collect_and_report(notebooks, tmp_path, capsys):
    script = Path(sys.executable).with_name("lcw-analysis")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lcw_analysis.cli"]
    out = tmp_path / "runs"
    argv = ["run", "toy", "-p", "n=3", "-p", "activation=tanh", "--out", str(out),
            "--notebooks", str(notebooks)]
    proc = subprocess.run(command + argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    finished = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert len(finished) == 1 and finished[0].startswith("[    ok] 01_toy/")
    (run_dir,) = [p for p in (out / "01_toy").iterdir()]
    assert {"01_toy.ipynb", "params.json", "status.json", "results.csv", "tiny.png"} <= {
        p.name for p in run_dir.iterdir()}
    again = subprocess.run(command + argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to run, 1 already complete" in again.stderr

    assert main(["collect", "--out", str(out), "--csv", str(tmp_path / "all.csv")]) == 0
    assert "3 rows from 1 runs" in capsys.readouterr().out
    assert (out / "results.csv").read_text() == (tmp_path / "all.csv").read_text()
    assert main(["report", "--out", str(out)]) == 0
    index = out / "report" / "index.html"
    assert str(index) in capsys.readouterr().out
    assert f"01_toy/{run_dir.name}.html" in index.read_text()


def test_failed_run_gives_exit_status_1(notebooks, tmp_path, capsys):
    argv = ["run", "toy", "-p", "n=-1", "-p", "scale=1e-3", "--quiet",
            "--notebooks", str(notebooks), "--out", str(tmp_path)]
    # range(-1) is empty: this run succeeds; a notebook that raises fails instead
    assert main(argv) == 0
    bad = notebooks.parent / "bad"
    bad.mkdir()
    nb = nbformat.read(notebooks / "01_toy.ipynb", 4)
    nb.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('boom')"))
    nbformat.write(nb, bad / "01_toy.ipynb")
    assert main(["run", "all", "--notebooks", str(bad), "--out", str(tmp_path / "b")]) == 1
    assert "[failed] 01_toy/" in capsys.readouterr().err
