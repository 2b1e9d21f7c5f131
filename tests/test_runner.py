"""Runner: strict parameters, run folders, resume, failures, interrupted runs, parallel, Dask."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest

from lcw_analysis import report, runner
from lcw_analysis.runner import (
    StudyError,
    collect,
    discover_studies,
    parse_assignments,
    parse_grid,
    plan_runs,
    run_studies,
    select_studies,
)

PARAMS = """\
n: int = 2  # number of rows
scale: float = 1.5  # multiplier
label: str = "x"  # a label
flag: bool = False  # a flag
vals: list[int] = [1, 2]  # some values
seed: int = 0  # random seed
out_dir: str = "."  # output folder"""

BODY = """\
import os
import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
if os.environ.get("TOY_CRASH_AT") == str(n):
    os.kill(os.getpid(), 9)  # the kernel dies mid-run
rows = [
    dict(i=i, value=i * scale + seed + sum(vals), omp=os.environ.get("OMP_NUM_THREADS"),
         backend=matplotlib.get_backend())
    for i in range(n)
]
pd.DataFrame(rows).to_csv(os.path.join(out_dir, "results.csv"), index=False)
fig, ax = plt.subplots(figsize=(1, 1))
ax.plot(range(n))
fig.savefig(os.path.join(out_dir, "curve.png"), dpi=20)
"""


def write_study(folder: Path, stem: str = "01_toy", params: str = PARAMS, body: str = BODY):
    """A tiny study notebook: tagged parameters cell, then a cell writing results + a PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {stem}"), cell, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, folder / f"{stem}.ipynb")
    return folder / f"{stem}.ipynb"


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nb") / "notebooks"
    write_study(folder)
    write_study(folder, "02_other", 'width: int = 4  # layer width\nout_dir: str = "."',
                'open(f"{out_dir}/results.csv", "w").write(f"width\\n{width}\\n")')
    return folder


@pytest.fixture
def spy(monkeypatch):
    """Count papermill executions (the runner calls papermill.execute_notebook at run time)."""
    calls = []
    real = papermill.execute_notebook

    def counting(*args, **kwargs):
        calls.append(kwargs.get("parameters"))
        return real(*args, **kwargs)

    monkeypatch.setattr(papermill, "execute_notebook", counting)
    return calls


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if any notebook would be executed."""
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a kernel was started")

    monkeypatch.setattr(papermill, "execute_notebook", forbidden)
    monkeypatch.setattr(runner, "_execute", forbidden)
    return calls


@pytest.fixture(scope="module")
def sweep(notebooks, tmp_path_factory):
    """A serial sweep n = -1 (fails), 1, 2 — shared, read-only, by several tests."""
    out = tmp_path_factory.mktemp("runs") / "runs"
    results = run_studies("toy", grid={"n": [-1, 1, 2]}, out=out, notebooks_dir=notebooks,
                          quiet=True)
    return out, results


# --------------------------------------------------------------------------- discovery, params


def test_studies_are_discovered_and_addressed_by_stem_name_or_number(notebooks):
    studies = discover_studies(notebooks)
    assert list(studies) == ["01_toy", "02_other"]
    for wanted in ("01_toy", "toy", "01", "1"):
        assert [s.stem for s in select_studies(wanted, studies)] == ["01_toy"]
    assert [s.stem for s in select_studies("all", studies)] == ["01_toy", "02_other"]
    with pytest.raises(StudyError, match=r"unknown study 'nope'; studies: 01_toy, 02_other"):
        select_studies("nope", studies)


def test_parameters_cell_types_defaults_and_help(notebooks):
    params = discover_studies(notebooks)["01_toy"].parameters
    assert list(params) == ["n", "scale", "label", "flag", "vals", "seed", "out_dir"]
    assert (params["n"].type_name, params["n"].default, params["n"].help) == (
        "int", 2, "number of rows")
    assert params["vals"].type_name == "list[int]" and params["vals"].default == [1, 2]
    assert params["label"].default == "x"


@pytest.mark.parametrize("type_name, default, value, expected", [
    ("int", 0, "3", 3),
    ("int", 0, "1e2", 100),
    ("float", 0.0, "1e-3", 0.001),
    ("float", 0.0, "2", 2.0),
    ("str", "", "007", "007"),
    ("str", "", "'yes'", "yes"),
    ("str", "", "none", "none"),  # e.g. norm="none"
    ("str | None", "", "none", None),
    ("Literal['none', 'lcw']", "none", "none", "none"),
    ("bool", False, "yes", True),
    ("bool", False, "false", False),
    ("list[int]", [], "[1, 2]", [1, 2]),
    ("list[float]", [], "[1, 2.5]", [1.0, 2.5]),
    ("int | None", None, "none", None),
    ("Optional[int]", None, "4", 4),
    ("Literal['relu', 'tanh']", "relu", "tanh", "tanh"),
    ("None", 3, "5", 5),  # unannotated: type from the default
])
def test_command_line_values_are_parsed_by_declared_type(type_name, default, value, expected):
    spec = runner._parse_type(type_name, default)
    got = runner._coerce(runner._Text(value), spec)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("type_name, value", [
    ("int", "abc"), ("int", "1.5"), ("int", "true"), ("float", "x"), ("bool", "1"),
    ("list[int]", "[1, a]"), ("list[int]", "3"), ("bool", "none"),
    ("Literal['relu', 'tanh']", "gelu"),
])
def test_wrong_types_are_rejected(type_name, value):
    with pytest.raises(runner._Mismatch):
        runner._coerce(runner._Text(value), runner._parse_type(type_name, None))


def test_unknown_parameter_error_lists_valid_names_before_any_kernel(notebooks, tmp_path,
                                                                     no_kernel):
    with pytest.raises(StudyError) as err:
        run_studies("toy", {"depth": 3}, out=tmp_path, notebooks_dir=notebooks)
    assert "unknown parameter 'depth' for study 01_toy" in str(err.value)
    assert "valid: n, scale, label, flag, vals, seed" in str(err.value)
    assert no_kernel == [] and not any(tmp_path.iterdir())


@pytest.mark.parametrize("params, message", [
    ({"n": runner._Text("abc")}, r"parameter 'n' \(from -p\): expected int, got abc"),
    ({"n": "3"}, r"parameter 'n' \(from -p\): expected int, got '3'"),
    ({"flag": 1}, r"parameter 'flag' \(from -p\): expected bool, got 1"),
    ({"vals": [1, "a"]}, r"parameter 'vals' \(from -p\): expected list\[int\]"),
    ({"out_dir": "/tmp"}, r"'out_dir' is set by the runner"),
])
def test_wrong_type_error_before_any_kernel(notebooks, tmp_path, no_kernel, params, message):
    with pytest.raises(StudyError, match=message):
        run_studies("toy", params, out=tmp_path, notebooks_dir=notebooks)
    assert no_kernel == []


def test_bad_input_errors_name_what_was_expected(notebooks, tmp_path, no_kernel):
    def fails(message, *args, **kwargs):
        with pytest.raises(StudyError, match=message):
            run_studies(*args, out=tmp_path, notebooks_dir=notebooks, **kwargs)

    fails(r"unknown study 'nope'", "nope")
    fails(r"preset 'full' for study 01_toy: expected the file .*presets/01_toy\.full\.yaml",
          "toy", preset="full")
    fails(r"cannot read parameters file .*missing\.yaml", "toy",
          params_files=[tmp_path / "missing.yaml"])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    fails(r"list\.yaml must be a mapping", "toy", params_files=[tmp_path / "list.yaml"])
    (tmp_path / "bad.yaml").write_text("n: [1\n")
    fails(r"bad\.yaml is not valid YAML", "toy", params_files=[tmp_path / "bad.yaml"])
    (tmp_path / "typo.yaml").write_text("nn: 3\n")
    fails(r"typo\.yaml: unknown parameter 'nn'", "toy", params_files=[tmp_path / "typo.yaml"])
    fails(r"--workers: expected an integer >= 1, got 0", "toy", workers=0)
    fails(r"--seeds: study 02_other has no 'seed' parameter", "other", seeds=2)
    fails(r"grid 'n': expected a non-empty list", "toy", grid={"n": []})
    fails(r"--grid: unknown parameter 'm'", "toy", grid={"m": [1]})
    fails(r"--kernel: no Jupyter kernel 'nope'", "toy", kernel_name="nope")
    fails(r"unknown parameter 'depth': no selected study \(01_toy, 02_other\)", "all",
          {"depth": 1})
    for bad in (["n"], ["=3"], ["n=1,,2"], ["n=[1,2"]):
        with pytest.raises(StudyError, match="--grid"):
            parse_grid(bad)
    with pytest.raises(StudyError, match=r"-p 'n': expected key=value"):
        parse_assignments(["n"])
    assert no_kernel == []


def test_study_without_out_dir_is_refused(tmp_path, no_kernel):
    write_study(tmp_path, "01_bare", "n: int = 1", "print(n)")
    with pytest.raises(StudyError, match=r"01_bare .* has no 'out_dir' parameter"):
        run_studies("bare", out=tmp_path / "runs", notebooks_dir=tmp_path)


def test_precedence_defaults_preset_file_p_grid(notebooks, tmp_path):
    presets = tmp_path / "notebooks"
    shutil.copytree(notebooks, presets)
    (presets / "presets").mkdir()
    (presets / "presets" / "01_toy.full.yaml").write_text("n: 5\nscale: 2.0\nlabel: preset\n")
    (presets / "presets" / "01_toy.quick.yaml").write_text("")
    (tmp_path / "p.yaml").write_text("scale: 3.0\nlabel: file\nvals: [7]\n")
    plans = plan_runs("toy", parse_assignments(["label=cli", "seed=9"]),
                      params_files=[tmp_path / "p.yaml"], preset="full",
                      grid=parse_grid(["seed=1,2"]), notebooks_dir=presets)
    assert [p.parameters for p in plans] == [
        {"n": 5, "scale": 3.0, "label": "cli", "flag": False, "vals": [7], "seed": s}
        for s in (1, 2)
    ]
    assert plans[0].sources["n"].startswith("preset file")
    assert plans[0].sources["seed"] == "--grid"
    quick = plan_runs("toy", preset="quick", notebooks_dir=presets)
    assert quick[0].digest == plan_runs("toy", notebooks_dir=notebooks)[0].digest


def test_run_ids_are_readable_and_derived_from_parameters(notebooks):
    a = plan_runs("toy", grid={"n": [1, 2]}, seeds=2, notebooks_dir=notebooks)
    assert [p.run_id.rsplit("_", 1)[0] for p in a] == [
        "n=1_seed=0", "n=1_seed=1", "n=2_seed=0", "n=2_seed=1"]
    b = plan_runs("toy", {"n": 1}, seeds=2, notebooks_dir=notebooks)
    assert a[0].digest == b[0].digest  # same resolved parameters, same hash
    assert len({p.digest for p in a}) == 4
    single = plan_runs("toy", notebooks_dir=notebooks)[0]
    assert single.run_id == single.digest and len(single.digest) == 10
    # multi-study: a key applies to the studies that declare it
    both = plan_runs("all", {"width": 8}, notebooks_dir=notebooks)
    assert [p.parameters.get("width") for p in both] == [None, 8]


# --------------------------------------------------------------------------- execution


def test_sweep_writes_run_folders_and_isolates_the_failure(sweep):
    out, results = sweep
    assert [r.status for r in results] == ["failed", "ok", "ok"]
    failed = results[0]
    assert "ValueError: n must be >= 0, got -1" in failed.error
    status = json.loads((failed.path / "status.json").read_text())
    assert status["status"] == "failed" and "ValueError" in status["traceback"]
    for r in results[1:]:
        files = {p.name for p in r.path.iterdir()}
        assert {"01_toy.ipynb", "params.json", "status.json", "results.csv", "curve.png"} <= files
        meta = json.loads((r.path / "params.json").read_text())
        assert meta["parameters"]["n"] == r.parameters["n"] and meta["set"] == {
            "n": r.parameters["n"]}
        frame = pd.read_csv(r.path / "results.csv")
        assert len(frame) == r.parameters["n"]
        assert (frame["backend"].str.lower() == "agg").all()
        executed = nbformat.read(r.path / "01_toy.ipynb", 4)
        injected = [c for c in executed.cells
                    if "injected-parameters" in c.metadata.get("tags", [])]
        assert "out_dir = \".\"" in injected[0].source
    assert not [p for p in (out / "01_toy").iterdir() if p.name.startswith(".")]


def test_collect_builds_one_tidy_table(sweep):
    out, results = sweep
    table = collect(out)
    assert (out / "results.csv").is_file()
    assert list(table.columns[:3]) == ["study", "run_id", "status"]
    assert {"n", "scale", "label", "flag", "vals", "seed", "i", "value"} <= set(table.columns)
    assert sorted(table["status"]) == ["failed", "ok", "ok", "ok"]  # 1 + 2 result rows + failed
    assert table.loc[table.status == "failed", "run_error"].str.contains("ValueError").all()
    assert set(table["run_id"]) == {r.run_id for r in results}
    assert pd.read_csv(out / "results.csv").shape == table.shape


def test_resume_skips_completed_runs_and_retries_failed(sweep, notebooks, tmp_path, spy):
    out = tmp_path / "runs"
    shutil.copytree(sweep[0], out)
    again = run_studies("toy", grid={"n": [-1, 1, 2]}, out=out, notebooks_dir=notebooks,
                        quiet=True)
    assert [r.status for r in again] == ["failed", "skipped", "skipped"]
    assert [p["n"] for p in spy] == [-1]  # only the failed run was executed again
    spy.clear()
    assert [r.status for r in run_studies("toy", grid={"n": [1, 2]}, out=out,
                                          notebooks_dir=notebooks, quiet=True)] == [
        "skipped", "skipped"]
    assert spy == []


def test_interrupted_runs_are_not_complete_and_are_rerun(notebooks, tmp_path, spy, monkeypatch):
    out = tmp_path / "runs"
    grid = {"n": [1, 2]}
    monkeypatch.setenv("TOY_CRASH_AT", "2")  # the kernel of n=2 is killed mid-run
    first = run_studies("toy", grid=grid, out=out, notebooks_dir=notebooks, quiet=True)
    assert [r.status for r in first] == ["ok", "failed"]
    assert "Dead" in first[1].error or "died" in first[1].error.lower()
    monkeypatch.delenv("TOY_CRASH_AT")
    # leftovers of an invocation that died: a temp folder, and a folder without the marker
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = out / "01_toy" / f".tmp-{first[0].run_id}-{proc.pid}"
    stale.mkdir()
    (stale / "params.json").write_text("{}")
    (first[0].path / "status.json").unlink()
    spy.clear()
    second = run_studies("toy", grid=grid, out=out, notebooks_dir=notebooks, quiet=True)
    assert [r.status for r in second] == ["ok", "ok"]
    assert sorted(p["n"] for p in spy) == [1, 2]
    assert not stale.exists()
    assert sorted(p.name for p in (out / "01_toy").iterdir()) == sorted(r.run_id for r in second)


def test_two_workers_give_the_same_results_as_serial(sweep, notebooks, tmp_path):
    out = tmp_path / "runs"
    results = run_studies("toy", grid={"n": [-1, 1, 2]}, workers=2, out=out,
                          notebooks_dir=notebooks, quiet=True)
    assert [(r.run_id, r.status) for r in results] == [(r.run_id, r.status) for r in sweep[1]]
    serial, parallel = collect(sweep[0], write=False), collect(out, write=False)
    assert set(serial.omp.dropna().astype(int)) == {max(1, runner._cores())}
    assert set(parallel.omp.dropna().astype(int)) == {max(1, runner._cores() // 2)}
    drop = ["omp", "run_error"]
    pd.testing.assert_frame_equal(serial.drop(columns=drop), parallel.drop(columns=drop))


def test_sweep_on_a_dask_local_cluster(notebooks, tmp_path, spy):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        # an address, as --scheduler gives it: the runner connects its own client
        results = run_studies("toy", grid={"n": [1, 2]}, scheduler=cluster.scheduler_address,
                              out=tmp_path, notebooks_dir=notebooks, quiet=True)
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    assert len(spy) == 2
    table = collect(tmp_path)
    assert sorted(table["n"]) == [1, 2, 2] and (table["status"] == "ok").all()
    for r in results:
        assert (r.path / "curve.png").is_file() and (r.path / "01_toy.ipynb").is_file()
    assert not [p for p in (tmp_path / "01_toy").iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- report


def test_report_links_every_run(sweep):
    out, results = sweep
    (out / "report" / "01_toy").mkdir(parents=True, exist_ok=True)
    orphan = out / "report" / "01_toy" / "gone_0123456789.html"
    orphan.write_text("a run that no longer exists")
    index = report.build_report(out)
    assert not orphan.exists()
    assert index == out / "report" / "index.html"
    text = index.read_text()
    assert "Summary table" in text and "3 runs: 2 ok, 1 failed" in text
    for r in results:
        page = out / "report" / "01_toy" / f"{r.run_id}.html"
        assert f"href='01_toy/{r.run_id}.html'" in text and page.is_file()
        body = page.read_text()
        assert f"href='{r.run_id}.notebook.html'" in body
        notebook_html = (page.parent / f"{r.run_id}.notebook.html").read_text()
        assert "<script src=\"http" not in notebook_html and "cdnjs" not in notebook_html
        if r.status == "ok":
            assert f"src='../../01_toy/{r.run_id}/curve.png'" in body
        else:
            assert "ValueError: n must be &gt;= 0" in body and "<pre>" in body


def test_report_with_zero_runs(tmp_path):
    index = report.build_report(tmp_path / "runs")
    assert "No runs yet" in index.read_text()
    assert collect(tmp_path / "runs").empty


def test_runner_module_does_not_import_torch():
    code = ("import sys, importlib.util as u; spec = u.spec_from_file_location('r', "
            f"{str(Path(runner.__file__))!r}); m = u.module_from_spec(spec); "
            "sys.modules['r'] = m; spec.loader.exec_module(m); "
            "print('torch' in sys.modules, 'papermill' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.stdout.split() == ["False", "False"]


def test_kernel_start_failure_is_retried_once_but_cell_errors_are_not(monkeypatch, tmp_path):
    calls = []

    def flaky(task, workdir):
        calls.append(workdir)
        if len(calls) == 1:
            raise RuntimeError("Kernel didn't respond in 60 seconds")

    monkeypatch.setattr(runner, "_papermill", flaky)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    task = {"workdir": str(tmp_path), "notebook": "x.ipynb"}
    outcome = runner._execute(task)
    assert outcome["status"] == "ok" and outcome["attempts"] == 2 and len(calls) == 2

    class CellError(Exception):
        ename, evalue, traceback = "ValueError", "bad n", ["ValueError: bad n"]

    def cell_fails(task, workdir):
        calls.append(workdir)
        raise CellError()

    calls.clear()
    monkeypatch.setattr(runner, "_papermill", cell_fails)
    outcome = runner._execute(task)
    assert outcome["status"] == "failed" and outcome["error"] == "ValueError: bad n"
    assert outcome["attempts"] == 1 and len(calls) == 1
