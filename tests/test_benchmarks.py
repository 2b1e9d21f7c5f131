"""Smoke tests: every benchmark runs at --quick sizes and prints the expected tables.

No timing is asserted (timings depend on the machine); only the shape of the output and the
invariants that do not depend on time (the recorder's accumulator memory is flat in samples).
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, first_cells: list[str]) -> list[str]:
    """The lines of ``text`` that start a table row with one of ``first_cells``."""
    return [line for line in text.splitlines() if line.split("  ")[0].strip() in first_cells]


def check_header(out: str) -> None:
    assert "machine :" in out and "logical cores" in out
    assert "torch 2." in out and "intra-op" in out
    assert "QUICK MODE" in out


def test_layer_cost_quick(capsys):
    bench = load("layer_cost")
    summary = bench.main(["--quick", "--reps", "2"])
    out = capsys.readouterr().out
    check_header(out)
    variants = ["plain", "lcw", "lcw [cached]", "lcw-simple", "centered", "ws", "wn", "bn",
                "lcw+bn", "lcw [op-by-op]"]
    # two MLP widths and one conv stack, each a table with every variant
    assert out.count("-- MLP depth 3 width") == 2 and out.count("-- conv3x3 x2") == 1
    rows = table_rows(out, variants)
    assert len(rows) == 3 * len(variants)
    for row in rows:
        if row.startswith(("lcw  ", "lcw [cached]")):
            assert ("PASS" in row) or ("MISS" in row)
    assert len(summary) == 3
    for row in summary:
        assert row["LCW ≤ target"] in ("PASS", "MISS") and row["LCW < BN"] in ("PASS", "MISS")
        assert row["lcw"] > 0 and row["bn"] > 0
    assert "layer_cost summary" in out


def test_recorder_overhead_quick(capsys):
    bench = load("recorder_overhead")
    result = bench.main(["--quick", "--reps", "2"])
    out = capsys.readouterr().out
    check_header(out)
    assert [r["recording"] for r in result["time"]] == [
        "no recorder", "every step", "every 10 steps"]
    assert all(r["status"] in ("PASS", "MISS") for r in result["time"][1:])
    memory = result["memory"]
    assert [r["samples"] for r in memory] == [100, 1000]
    # not a timing: the streaming accumulators hold the same bytes for 10x the samples
    assert memory[0]["accumulator bytes"] == memory[1]["accumulator bytes"] > 0
    assert memory[1]["keep-all z bytes"] == 10 * memory[0]["keep-all z bytes"]
    assert all(r["flat"] == "PASS" for r in memory)


def test_helmert_kernel_quick(capsys):
    bench = load("helmert_kernel")
    rows = bench.main(["--quick", "--reps", "2"])
    out = capsys.readouterr().out
    check_header(out)
    assert [r["weight"] for r in rows] == ["8x8", "32x32"]
    assert len(table_rows(out, ["8x8", "32x32"])) == 2


def test_studies_walltime_quick_runs_nothing(capsys):
    bench = load("studies_walltime")
    row = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "make studies" in out and "not running it" in out
    assert row["seconds"] == "not run"


@pytest.mark.parametrize("only", [["helmert_kernel", "studies_walltime"]])
def test_run_all_quick(only):
    done = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--reps", "2", "--only", *only],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in only:
        assert f"######## {name} ########" in done.stdout
        assert f"######## {name}: exit 0" in done.stdout
