"""Batch runner: study notebooks × parameter grid → ``runs/<study>/<run-id>/`` → ``collect()``.

A *study* is a notebook ``NN_name.ipynb`` in the notebooks folder whose first ``parameters``-tagged
cell declares typed, commented parameters (``depth: int = 20  # hidden layers``), including
``out_dir: str = "."``. The runner injects ``out_dir`` (and starts the kernel in that folder); the
notebook writes ``results.csv`` and its figures (PNG) there.

Parameters resolve as: notebook defaults < preset < ``-f`` files < ``-p`` values < grid/seeds.
Every name and type is checked against the parameters cell before any kernel starts.

Presets live at ``<notebooks>/presets/<stem>.<preset>.yaml`` (a flat mapping of parameters);
``quick`` is the notebook as committed, so its file may be empty or absent.

Run folder ``runs/<study>/<run-id>/``: the executed notebook ``<stem>.ipynb``, ``results.csv``,
figures, ``params.json`` and ``status.json``. A run is written to
``runs/<study>/.tmp-<run-id>-<pid>`` and renamed when done; ``status.json`` is written last.
*Complete* = the final folder holds ``params.json`` and a ``status.json`` saying ``"ok"``. Failed
runs (``"failed"``, with error and traceback) and anything incomplete are run again by the next
invocation; completed runs are skipped. The run id is ``<grid values>_<hash>``, the hash being a
short SHA-256 of the canonical JSON of all resolved parameters except ``out_dir``.

Kernels run with ``MPLBACKEND=agg`` and ``OMP/MKL/OPENBLAS_NUM_THREADS = max(1, cores // workers)``
(``threads=`` overrides; on Dask, *workers* is the worker's thread count). Executors: a thread
pool locally (each notebook runs in its own kernel process), ``Client.get_executor()`` on Dask;
Dask workers need this package and the kernel installed, not the notebooks or a shared disk: the
notebook travels with the task and the run's files come back with the result.

This module never imports torch (nor the library's models); papermill and friends load lazily.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "StudyError",
    "Study",
    "Parameter",
    "RunResult",
    "discover_studies",
    "select_studies",
    "preset_path",
    "plan_runs",
    "run_studies",
    "iter_runs",
    "collect",
]

STUDY_PATTERN = re.compile(r"^(\d+)_(\w+)\.ipynb$")
RESULTS_FILE = "results.csv"
COLLECTED_FILE = "results.csv"  # written at the top of the runs folder by collect()
PARAMS_FILE = "params.json"
STATUS_FILE = "status.json"
KERNEL_LOG = "kernel.log"
KERNEL_START_RETRIES = 1  # a run that failed before any cell ran (kernel start) is retried once
TMP_PREFIX = ".tmp-"
RUNNER_OWNED = ("out_dir",)
_HASH_LEN = 10
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class StudyError(ValueError):
    """Bad input to the runner (study, parameter, preset, file, grid, option); raised early."""


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that also reads ``1e-3`` as a float (YAML 1.2 style)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _load_yaml_file(path: Path, what: str) -> dict[str, Any]:
    try:
        data = _yaml(Path(path).read_text())
    except OSError as exc:
        raise StudyError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise StudyError(f"{what} {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise StudyError(f"{what} {path} must be a mapping of parameter: value")
    return data


class _Text(str):
    """A value typed on the command line; parsed according to the parameter's declared type."""


# --------------------------------------------------------------------------- types


def _parse_type(type_name: str | None, default: Any) -> tuple:
    """Papermill's ``inferred_type_name`` → a small type spec (unannotated: from the default)."""
    if type_name in (None, "None", ""):
        if isinstance(default, bool):
            return ("bool",)
        for t in (int, float, str, list, dict):
            if isinstance(default, t):
                return (t.__name__,) if t not in (list, dict) else (t.__name__, ("any",))
        return ("any",)
    try:
        node = ast.parse(type_name, mode="eval").body
    except SyntaxError:
        return ("any",)
    return _type_node(node)


def _type_node(node: ast.AST) -> tuple:
    if isinstance(node, ast.Constant) and node.value is None:
        return ("none",)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "int" forward ref
        return _parse_type(node.value, None)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return ("union", (_type_node(node.left), _type_node(node.right)))
    name = _dotted(node.value if isinstance(node, ast.Subscript) else node)
    base = name.rsplit(".", 1)[-1]
    if isinstance(node, ast.Subscript):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base in ("list", "List", "Sequence", "set", "Set"):
            return ("list", _type_node(args[0]))
        if base in ("tuple", "Tuple"):
            elems = [a for a in args if not (isinstance(a, ast.Constant) and a.value is ...)]
            inner = _type_node(elems[0]) if len(elems) == 1 else ("any",)
            return ("list", inner)
        if base in ("dict", "Dict", "Mapping"):
            return ("dict", _type_node(args[1]) if len(args) == 2 else ("any",))
        if base == "Optional":
            return ("union", (_type_node(args[0]), ("none",)))
        if base == "Union":
            return ("union", tuple(_type_node(a) for a in args))
        if base == "Literal":
            try:
                return ("literal", tuple(ast.literal_eval(a) for a in args))
            except ValueError:
                return ("any",)
        return ("any",)
    if base in ("int", "float", "str", "bool"):
        return (base,)
    if base in ("list", "List", "tuple", "Tuple", "Sequence", "set", "Set"):
        return ("list", ("any",))
    if base in ("dict", "Dict", "Mapping"):
        return ("dict", ("any",))
    if base in ("None", "NoneType"):
        return ("none",)
    return ("any",)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _type_str(spec: tuple) -> str:
    kind = spec[0]
    if kind in ("list", "dict"):
        return f"{kind}[{_type_str(spec[1])}]" if spec[1] != ("any",) else kind
    if kind == "union":
        return " | ".join(_type_str(s) for s in spec[1])
    if kind == "literal":
        return "one of " + ", ".join(repr(v) for v in spec[1])
    return {"none": "None"}.get(kind, kind)


class _Mismatch(Exception):
    pass


def _is_stringy(spec: tuple) -> bool:
    kind = spec[0]
    if kind == "str":
        return True
    if kind == "literal":
        return all(isinstance(v, str) for v in spec[1])
    if kind == "union":
        return all(_is_stringy(s) or s == ("none",) for s in spec[1])
    return False


def _coerce(value: Any, spec: tuple) -> Any:
    """Check/convert one value against a type spec; raise _Mismatch when it does not fit."""
    kind = spec[0]
    if isinstance(value, _Text):
        raw = str(value)
        nullable = spec[0] == "union" and ("none",) in spec[1]
        if _is_stringy(spec) and not (nullable and raw.strip().lower() in ("null", "none", "~")):
            quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
            return _coerce(_yaml(raw) if quoted else raw, spec)
        try:
            parsed = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise _Mismatch from None
        if isinstance(parsed, str) and parsed.lower() == "none":
            parsed = None
        return _coerce(parsed, spec)
    if kind == "any":
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise _Mismatch from None
        return value
    if kind == "none":
        if value is None:
            return None
        raise _Mismatch
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if kind == "int":
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if kind == "float":
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        raise _Mismatch
    if kind == "str":
        if isinstance(value, str):
            return str(value)
        raise _Mismatch
    if kind == "list":
        if isinstance(value, (list, tuple)):
            return [_coerce(v, spec[1]) for v in value]
        raise _Mismatch
    if kind == "dict":
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: _coerce(v, spec[1]) for k, v in value.items()}
        raise _Mismatch
    if kind == "literal":
        for option in spec[1]:
            if type(option) is type(value) and option == value:
                return value
        raise _Mismatch
    if kind == "union":
        options = sorted(spec[1], key=lambda s: s[0] != "none")  # None first, then declared order
        for option in options:
            try:
                return _coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    raise _Mismatch


# --------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class Parameter:
    """One entry of a study's parameters cell."""

    name: str
    type_name: str
    default: Any  # the literal value; the source text when it is an expression
    help: str = ""
    evaluated: bool = True
    spec: tuple = field(default=("any",), repr=False, compare=False)

    def coerce(self, value: Any, source: str = "") -> Any:
        """Check ``value`` against the declared type; StudyError naming the parameter if not."""
        try:
            return _coerce(value, self.spec)
        except _Mismatch:
            where = f" (from {source})" if source else ""
            shown = str(value) if isinstance(value, _Text) else repr(value)
            raise StudyError(
                f"parameter {self.name!r}{where}: expected {_type_str(self.spec)}, got {shown}"
            ) from None


@dataclass
class Study:
    """A study notebook ``NN_name.ipynb``."""

    stem: str
    name: str
    number: str
    path: Path
    _parameters: dict[str, Parameter] | None = field(default=None, repr=False)

    @property
    def parameters(self) -> dict[str, Parameter]:
        """The parameters cell (via ``papermill.inspect_notebook``), read once."""
        if self._parameters is None:
            self._parameters = _inspect(self.path)
        return self._parameters

    def presets(self) -> list[str]:
        """Names of the preset files present for this study."""
        folder = self.path.parent / "presets"
        names = {p.name[len(self.stem) + 1 : -5] for p in folder.glob(f"{self.stem}.*.yaml")}
        return sorted(names | {"quick"})


def _inspect(path: Path) -> dict[str, Parameter]:
    import logging

    import nbformat
    import papermill as pm

    logger = logging.getLogger("papermill")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "no cell tagged parameters" is our error to report
    try:
        nb = nbformat.read(path, as_version=4)
        if not nb.metadata.get("kernelspec", {}).get("name"):  # parse the cell as Python
            nb.metadata["kernelspec"] = {
                "name": "python3",
                "display_name": "Python 3",
                "language": "python",
            }
        raw = pm.inspect_notebook(nb)
    except Exception as exc:  # unreadable notebook
        raise StudyError(f"cannot read the parameters of {path}: {exc}") from None
    finally:
        logger.setLevel(level)
    params = {}
    for name, info in raw.items():
        source = info.get("default") or "None"
        try:
            default, evaluated = ast.literal_eval(source), True
        except (ValueError, SyntaxError):
            default, evaluated = source, False
        type_name = info.get("inferred_type_name") or "None"
        spec = _parse_type(type_name, default if evaluated else None)
        shown = type_name if type_name != "None" else _type_str(spec)
        params[name] = Parameter(name, shown, default, info.get("help") or "", evaluated, spec)
    return params


def _default_notebooks_dir() -> Path:
    here = Path.cwd() / "notebooks"
    if here.is_dir() and any(STUDY_PATTERN.match(p.name) for p in here.iterdir()):
        return here
    repo = Path(__file__).resolve().parents[1] / "notebooks"
    return repo if repo.is_dir() else here


def discover_studies(notebooks_dir: str | os.PathLike | None = None) -> dict[str, Study]:
    """Studies ``NN_name.ipynb`` in ``notebooks_dir`` (default ``./notebooks``, else the repo's)."""
    folder = Path(notebooks_dir) if notebooks_dir is not None else _default_notebooks_dir()
    hint = "" if notebooks_dir is not None else " (pass --notebooks DIR / notebooks_dir=)"
    if not folder.is_dir():
        raise StudyError(f"notebooks folder {folder} does not exist{hint}")
    studies = {}
    for path in sorted(folder.iterdir()):
        match = STUDY_PATTERN.match(path.name)
        if match and path.is_file():
            stem = path.name[: -len(".ipynb")]
            studies[stem] = Study(stem, match.group(2), match.group(1), path.resolve())
    if not studies:
        raise StudyError(f"no study notebooks (NN_name.ipynb) in {folder}{hint}")
    return studies


def select_studies(
    names: str | list[str] | tuple[str, ...], studies: dict[str, Study]
) -> list[Study]:
    """Resolve ``"all"``, full stems, names (``activation_shift``) or numbers (``01``)."""
    names = [names] if isinstance(names, str) else list(names)
    if not studies:
        raise StudyError("no study notebooks (NN_name.ipynb) found")
    chosen: list[Study] = []
    for wanted in names:
        if wanted == "all":
            found = list(studies.values())
        else:
            found = [
                s
                for s in studies.values()
                if wanted in (s.stem, s.name, s.number)
                or (wanted.isdigit() and int(wanted) == int(s.number))
            ]
        if not found:
            raise StudyError(f"unknown study {wanted!r}; studies: {', '.join(studies)} (or 'all')")
        if len(found) > 1 and wanted != "all":
            raise StudyError(f"study {wanted!r} is ambiguous: {', '.join(s.stem for s in found)}")
        chosen += [s for s in found if s not in chosen]
    return chosen


def preset_path(study: Study, preset: str) -> Path:
    """Where the preset file of a study lives: ``<notebooks>/presets/<stem>.<preset>.yaml``."""
    return study.path.parent / "presets" / f"{study.stem}.{preset}.yaml"


# --------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    study: Study
    run_id: str
    digest: str
    parameters: dict[str, Any]  # fully resolved, without out_dir
    injected: dict[str, Any]  # what papermill injects (explicitly set), without out_dir
    grid: dict[str, Any]
    sources: dict[str, str]


@dataclass
class RunResult:
    """Outcome of one planned run: status is ok, failed, skipped (already complete) or planned."""

    study: str
    run_id: str
    status: str
    path: Path
    parameters: dict[str, Any]
    duration_s: float | None = None
    error: str | None = None


def _split_assignment(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or not key.isidentifier():
        raise StudyError(f"{option} {item!r}: expected key=value")
    return key, value


def _split_values(text: str) -> list[str]:
    """Split ``v1,v2`` at top-level commas (brackets and quotes group)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    if quote or depth:
        raise ValueError("unbalanced brackets or quotes")
    return [p.strip() for p in parts]


def parse_assignments(items: list[str] | None) -> dict[str, _Text]:
    """``["depth=20", ...]`` (``-p``) → ``{"depth": "20"}``, values parsed later per type."""
    out = {}
    for item in items or []:
        key, value = _split_assignment(item, "-p")
        out[key] = _Text(value.strip())
    return out


def parse_grid(items: list[str] | None) -> dict[str, list[_Text]]:
    """``["depth=10,20", "lr=[0.1,0.2],[0.3]"]`` (``--grid``) → ``{"depth": ["10", "20"], ...}``."""
    grid: dict[str, list[_Text]] = {}
    for item in items or []:
        key, text = _split_assignment(item, "--grid")
        try:
            values = _split_values(text)
        except ValueError as exc:
            raise StudyError(f"--grid {item!r}: {exc}") from None
        if not text.strip() or any(v == "" for v in values):
            raise StudyError(f"--grid {item!r}: expected key=v1,v2,... with no empty value")
        if key in grid:
            raise StudyError(f"--grid {key!r} given twice")
        grid[key] = [_Text(v) for v in values]
    return grid


def _digest(params: dict[str, Any]) -> str:
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def _slug(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    text = re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")
    return text[:24] or "x"


def _run_id(grid_values: dict[str, Any], digest: str) -> str:
    prefix = "_".join(f"{k}={_slug(v)}" for k, v in grid_values.items())
    return f"{prefix[:80]}_{digest}" if prefix else digest


def _check_names(keys, studies: list[Study], what: str) -> None:
    for key in keys:
        if key in RUNNER_OWNED:
            raise StudyError(f"{what}: {key!r} is set by the runner (the run folder)")
        if not any(key in s.parameters for s in studies):
            if len(studies) == 1:
                valid = ", ".join(p for p in studies[0].parameters if p not in RUNNER_OWNED)
                raise StudyError(
                    f"{what}: unknown parameter {key!r} for study {studies[0].stem}; "
                    f"valid: {valid or '(none)'}"
                )
            raise StudyError(
                f"{what}: unknown parameter {key!r}: no selected study "
                f"({', '.join(s.stem for s in studies)}) declares it"
            )


def plan_runs(
    studies: str | list[str] = "all",
    params: dict[str, Any] | None = None,
    *,
    params_files: list[str | os.PathLike] | tuple = (),
    preset: str | None = None,
    grid: dict[str, list[Any]] | None = None,
    seeds: int | None = None,
    notebooks_dir: str | os.PathLike | None = None,
) -> list[_Plan]:
    """Resolve and check every run's parameters (no kernel starts); see ``run_studies``."""
    selected = select_studies(studies, discover_studies(notebooks_dir))
    params = dict(params or {})
    grid = {k: list(v) for k, v in (grid or {}).items()}
    for study in selected:
        if "out_dir" not in study.parameters:
            found = ", ".join(study.parameters) or "no tagged parameters cell"
            raise StudyError(
                f"study {study.stem} ({study.path}) has no 'out_dir' parameter in a cell tagged "
                f"'parameters' (found: {found})"
            )
    files = []
    for path in params_files or ():
        files.append((str(path), _load_yaml_file(Path(path), "parameters file")))
    for path, data in files:
        _check_names(data, selected, f"parameters file {path}")
    _check_names(params, selected, "-p")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise StudyError(f"grid {key!r}: expected a non-empty list of values")
    _check_names(grid, selected, "--grid")
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise StudyError(f"--seeds: expected a positive integer, got {seeds!r}")
        if "seed" in grid:
            raise StudyError("--seeds and a grid over 'seed' cannot be combined")
        lacking = [s.stem for s in selected if "seed" not in s.parameters]
        if lacking:
            raise StudyError(f"--seeds: study {', '.join(lacking)} has no 'seed' parameter")
        grid["seed"] = list(range(seeds))

    plans: list[_Plan] = []
    for study in selected:
        decl = study.parameters
        layers: list[tuple[str, dict[str, Any]]] = []
        if preset is not None:
            path = preset_path(study, preset)
            if path.is_file():
                data = _load_yaml_file(path, f"preset {preset!r}")
                _check_names(data, [study], f"preset file {path}")
                layers.append((f"preset file {path}", data))
            elif preset != "quick":
                raise StudyError(
                    f"preset {preset!r} for study {study.stem}: expected the file {path}"
                )
        layers += [(f"parameters file {p}", d) for p, d in files]
        layers.append(("-p", params))
        base: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for source, data in layers:
            for key, value in data.items():
                if key in decl:
                    base[key] = decl[key].coerce(value, source)
                    sources[key] = source
        axes = [
            (k, [decl[k].coerce(v, "--grid") for v in vs]) for k, vs in grid.items() if k in decl
        ]
        seen = set()
        for combo in itertools.product(*[values for _, values in axes]):
            point = dict(zip([k for k, _ in axes], combo, strict=True))
            injected = {**base, **point}
            resolved = {n: p.default for n, p in decl.items() if n not in RUNNER_OWNED} | injected
            digest = _digest(resolved)
            if digest in seen:
                continue
            seen.add(digest)
            srcs = {**sources, **{k: "--grid" for k in point}}
            plans.append(
                _Plan(study, _run_id(point, digest), digest, resolved, injected, point, srcs)
            )
    return plans


# --------------------------------------------------------------------------- execution


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _kernel_env(threads: int) -> dict[str, str]:
    n = str(max(1, int(threads)))
    return {
        "MPLBACKEND": "agg",
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }


def _kernel_manager_class(env: dict[str, str], cwd: str, log_path: str):
    """An AsyncKernelManager that starts its kernel in ``cwd`` with ``env`` added to the
    environment and the kernel process's own stdout/stderr appended to ``log_path``.

    (papermill's ``cwd=`` changes the whole process's directory, unsafe with threads.)
    """
    from jupyter_client.manager import AsyncKernelManager

    class _RunKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kw["env"] = {**(kw.get("env") or os.environ), **env}
            kw["cwd"] = cwd
            with open(log_path, "ab") as log:
                kw["stdout"] = kw["stderr"] = log
                result = await super()._async_launch_kernel(kernel_cmd, **kw)
            _LIVE_KERNELS.add(self)
            return result

    return _RunKernelManager


_LIVE_KERNELS: weakref.WeakSet = weakref.WeakSet()


def _kill_kernels() -> None:
    """Kill the kernels this process started that are still running (on interrupt)."""
    for km in list(_LIVE_KERNELS):
        pid = getattr(getattr(km, "provisioner", None), "pid", None)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _worker_threads() -> int:
    try:
        from distributed import get_worker

        return max(1, _cores() // max(1, get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _execute(task: dict[str, Any]) -> dict[str, Any]:
    """Run one notebook (on any worker); never raises. Returns status and, if asked, the files."""
    started, t0 = _now(), time.perf_counter()
    workdir = task.get("workdir")
    transfer = workdir is None
    if transfer:
        workdir = tempfile.mkdtemp(prefix="lcw-run-")
    outcome: dict[str, Any] = {"status": "ok", "error": None, "traceback": None, "attempts": 0}
    for attempt in range(1 + KERNEL_START_RETRIES):
        outcome.update(status="ok", error=None, traceback=None, attempts=attempt + 1)
        try:
            _in_fresh_thread(_papermill, task, workdir)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the sweep
            outcome["status"] = "failed"
            if hasattr(exc, "ename") and hasattr(exc, "evalue"):
                outcome["error"] = f"{exc.ename}: {exc.evalue}"
                outcome["traceback"] = _ANSI.sub("", "\n".join(getattr(exc, "traceback", []) or []))
                break  # a cell raised: the notebook's own failure, never retried
            outcome["error"] = f"{type(exc).__name__}: {exc}"
            outcome["traceback"] = traceback.format_exc()
            time.sleep(1.0)  # no cell ran (kernel start or transport failure): try once more
            continue
        break
    outcome.update(
        started=started,
        finished=_now(),
        duration_s=round(time.perf_counter() - t0, 3),
        host=socket.gethostname(),
    )
    if transfer:
        files = {}
        for path in sorted(Path(workdir).rglob("*")):
            if path.is_file():
                files[path.relative_to(workdir).as_posix()] = path.read_bytes()
        outcome["files"] = files
        shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def _in_fresh_thread(fn, *args) -> None:
    """Call ``fn(*args)`` in a new thread and wait: papermill's synchronous wrappers then start
    from a thread without an event loop, whatever the executor's thread carries (an in-process
    Dask worker's threads can see an already running loop)."""
    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"lcw-run-{os.getpid()}-{id(box)}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]


def _papermill(task: dict[str, Any], workdir: str) -> None:
    import nbformat
    import papermill as pm

    if "notebook_text" in task:
        source = nbformat.reads(task["notebook_text"], 4)
    else:
        source = task["notebook"]
    threads = task.get("threads") or _worker_threads()
    pm.execute_notebook(
        source,
        os.path.join(workdir, task["output_name"]),
        parameters={**task["parameters"], "out_dir": "."},
        kernel_name=task["kernel_name"],
        language="python",  # studies are Python notebooks (kernelspec metadata optional)
        progress_bar=False,
        log_output=False,
        execution_timeout=task.get("timeout"),
        kernel_manager_class=_kernel_manager_class(
            _kernel_env(threads), workdir, os.path.join(workdir, KERNEL_LOG)
        ),
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(study_dir: Path) -> None:
    """Remove temp folders left by invocations that are no longer running."""
    if not study_dir.is_dir():
        return
    for path in study_dir.glob(TMP_PREFIX + "*"):
        match = re.search(r"-(\d+)(?:\.old)?$", path.name)
        pid = int(match.group(1)) if match else None
        if pid is None or (pid != os.getpid() and not _pid_alive(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _existing(study_dir: Path, digest: str) -> list[Path]:
    if not study_dir.is_dir():
        return []
    return sorted(
        p
        for p in study_dir.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and (p.name == digest or p.name.endswith("_" + digest))
    )


def _is_complete(run_dir: Path) -> bool:
    status = _read_json(run_dir / STATUS_FILE)
    return bool(status) and status.get("status") == "ok" and (run_dir / PARAMS_FILE).is_file()


def _finalize(plan: _Plan, stage: Path, outcome: dict[str, Any], meta: dict) -> Path:
    """Write params.json then status.json into the staged folder, and rename it into place."""
    stage.mkdir(parents=True, exist_ok=True)
    for rel, data in (outcome.pop("files", None) or {}).items():
        target = stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (stage / PARAMS_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    status = {
        k: outcome.get(k)
        for k in ("status", "error", "traceback", "started", "finished", "duration_s", "host")
    }
    (stage / STATUS_FILE).write_text(json.dumps(status, indent=2) + "\n")
    study_dir = stage.parent
    final = study_dir / plan.run_id
    for old in _existing(study_dir, plan.digest):
        trash = study_dir / f"{TMP_PREFIX}{old.name}-{os.getpid()}.old"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(stage, final)
    return final


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def run_studies(
    studies: str | list[str] = "all",
    params: dict[str, Any] | None = None,
    *,
    params_files: list[str | os.PathLike] | tuple = (),
    preset: str | None = None,
    grid: dict[str, list[Any]] | None = None,
    seeds: int | None = None,
    workers: int = 1,
    scheduler: Any = None,
    out: str | os.PathLike = "runs",
    notebooks_dir: str | os.PathLike | None = None,
    kernel_name: str = "python3",
    threads: int | None = None,
    timeout: float | None = None,
    force: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
) -> list[RunResult]:
    """Run studies × grid with papermill into ``out/<study>/<run-id>/``; skip completed runs.

    ``studies``: ``"all"``, a stem, name or number, or a list of them. ``params``: values by name
    (Python values, or strings parsed per declared type when they come from the command line).
    ``params_files``: YAML mappings. ``preset``: ``quick``/``full``/... file beside the notebooks.
    ``grid``: ``{name: [values]}`` (Cartesian product); ``seeds=N`` adds ``seed = 0..N-1``.
    ``workers``: local concurrency; ``scheduler``: a Dask address or ``distributed.Client``.
    ``threads``: BLAS/OpenMP threads per kernel (default ``max(1, cores // workers)``).
    All input is checked before any kernel starts (``StudyError``). Failed runs are recorded and
    do not stop the others. Returns one ``RunResult`` per planned run.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise StudyError(f"--workers: expected an integer >= 1, got {workers!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise StudyError(f"--threads: expected an integer >= 1, got {threads!r}")
    if timeout is not None and timeout <= 0:
        raise StudyError(f"--timeout: expected seconds > 0, got {timeout!r}")
    plans = plan_runs(
        studies,
        params,
        params_files=params_files,
        preset=preset,
        grid=grid,
        seeds=seeds,
        notebooks_dir=notebooks_dir,
    )
    if scheduler is None:
        _check_kernel(kernel_name)
    out = Path(out).resolve()
    results: list[RunResult] = []
    todo: list[_Plan] = []
    for plan in plans:
        study_dir = out / plan.study.stem
        done = [p for p in _existing(study_dir, plan.digest) if _is_complete(p)]
        if done and not force:
            results.append(
                RunResult(plan.study.stem, done[0].name, "skipped", done[0], plan.parameters)
            )
        elif dry_run:
            results.append(
                RunResult(
                    plan.study.stem,
                    plan.run_id,
                    "planned",
                    study_dir / plan.run_id,
                    plan.parameters,
                )
            )
        else:
            todo.append(plan)
    if dry_run or not todo:
        skipped = sum(r.status == "skipped" for r in results)
        what = f"{len(results) - skipped} to run" if dry_run else "nothing to run"
        _say(quiet, f"{what}, {skipped} already complete -> {out}")
        return results

    for stem in {p.study.stem for p in todo}:
        (out / stem).mkdir(parents=True, exist_ok=True)
        _clean_stale(out / stem)
    transfer = scheduler is not None
    per_kernel = threads or (None if transfer else max(1, _cores() // workers))
    client, own_client = None, False
    if transfer:
        client, own_client = _dask_client(scheduler)
        executor = client.get_executor(pure=False)
    else:
        import papermill  # noqa: F401 - import once before the threads start

        executor = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lcw-run")
    _say(
        quiet,
        f"running {len(todo)} notebook(s), {len(plans) - len(todo)} already complete -> {out}",
    )
    futures: dict[cf.Future, tuple[_Plan, Path]] = {}
    try:
        for plan in todo:
            stage = out / plan.study.stem / f"{TMP_PREFIX}{plan.run_id}-{os.getpid()}"
            shutil.rmtree(stage, ignore_errors=True)
            task = {
                "study": plan.study.stem,
                "run_id": plan.run_id,
                "output_name": plan.study.path.name,
                "parameters": plan.injected,
                "kernel_name": kernel_name,
                "threads": per_kernel,
                "timeout": timeout,
            }
            if transfer:
                task["notebook_text"] = plan.study.path.read_text()
                task["workdir"] = None
            else:
                stage.mkdir(parents=True)
                task["notebook"] = str(plan.study.path)
                task["workdir"] = str(stage)
            futures[executor.submit(_execute, task)] = (plan, stage)
        for future in cf.as_completed(futures):
            plan, stage = futures[future]
            try:
                outcome = future.result()
            except BaseException as exc:  # noqa: BLE001 - e.g. a Dask worker died
                if isinstance(exc, KeyboardInterrupt):
                    raise
                outcome = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(),
                    "finished": _now(),
                }
            meta = {
                "study": plan.study.stem,
                "run_id": plan.run_id,
                "notebook": str(plan.study.path),
                "executed_notebook": plan.study.path.name,
                "parameters": plan.parameters,
                "set": plan.injected,
                "sources": plan.sources,
                "grid": plan.grid,
                "preset": preset,
                "kernel_name": kernel_name,
                "threads_per_kernel": per_kernel,
            }
            final = _finalize(plan, stage, outcome, meta)
            result = RunResult(
                plan.study.stem,
                plan.run_id,
                outcome["status"],
                final,
                plan.parameters,
                outcome.get("duration_s"),
                outcome.get("error"),
            )
            results.append(result)
            took = f"{result.duration_s:.1f} s" if result.duration_s is not None else "-"
            tail = f"  {result.error}" if result.error else ""
            _say(quiet, f"[{result.status:>6}] {plan.study.stem}/{plan.run_id}  ({took}){tail}")
    except BaseException:
        for future in futures:
            future.cancel()
        if not transfer:
            _kill_kernels()  # their runs stay unfinished (temp folders) and rerun next time
        interrupted = True
        raise
    else:
        interrupted = False
    finally:
        if transfer:
            executor.shutdown(wait=not interrupted)
        else:
            executor.shutdown(wait=not interrupted, cancel_futures=True)
        if own_client:
            client.close()
    rank = {(p.study.stem, p.digest): i for i, p in enumerate(plans)}
    results.sort(key=lambda r: rank[(r.study, r.run_id[-_HASH_LEN:])])
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped")}
    _say(
        quiet,
        f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} already "
        f"complete -> {out}",
    )
    return results


def _check_kernel(kernel_name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        names = ", ".join(sorted(KernelSpecManager().find_kernel_specs()))
        raise StudyError(
            f"--kernel: no Jupyter kernel {kernel_name!r}; installed: {names}"
        ) from None


def _dask_client(scheduler: Any):
    if isinstance(scheduler, (str, os.PathLike)):
        try:
            from distributed import Client
        except ImportError:  # pragma: no cover - a declared dependency
            raise StudyError("--scheduler needs the 'distributed' package") from None
        try:
            return Client(str(scheduler), timeout="20s"), True
        except OSError as exc:
            raise StudyError(f"--scheduler: cannot reach {scheduler}: {exc}") from None
    if not hasattr(scheduler, "get_executor"):
        raise StudyError("scheduler must be an address or a distributed.Client")
    return scheduler, False


# --------------------------------------------------------------------------- results


def iter_runs(out: str | os.PathLike = "runs") -> list[dict[str, Any]]:
    """Finished runs (ok or failed) under ``out``: params.json merged with status.json + path."""
    out = Path(out)
    runs = []
    if not out.is_dir():
        return runs
    for study_dir in sorted(
        p for p in out.iterdir() if p.is_dir() and STUDY_PATTERN.match(p.name + ".ipynb")
    ):
        for run_dir in sorted(
            p for p in study_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            meta, status = _read_json(run_dir / PARAMS_FILE), _read_json(run_dir / STATUS_FILE)
            if meta is None or status is None:
                continue  # incomplete: not a run (it will be rerun)
            runs.append(
                {**meta, **status, "study": study_dir.name, "run_id": run_dir.name, "path": run_dir}
            )
    return runs


def collect(out: str | os.PathLike = "runs", *, write: bool = True):
    """One tidy table: every run's ``results.csv`` rows + study, run_id, status + parameters.

    Failed runs (and ok runs without a results file) contribute one row without results.
    Written to ``<out>/results.csv`` unless ``write=False``. Returns a pandas DataFrame.
    """
    import pandas as pd

    frames = []
    param_names: list[str] = []
    for run in iter_runs(out):
        params = run.get("parameters") or {}
        param_names += [n for n in params if n not in param_names]
        results_path = run["path"] / RESULTS_FILE
        frame = None
        if run.get("status") == "ok" and results_path.is_file():
            try:
                frame = pd.read_csv(results_path)
            except (pd.errors.EmptyDataError, pd.errors.ParserError):
                frame = None
        if frame is None or frame.empty:
            frame = pd.DataFrame(index=[0])
        for name, value in params.items():
            if name not in frame.columns:
                frame[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
        frame.insert(0, "status", run.get("status"))
        frame.insert(0, "run_id", run["run_id"])
        frame.insert(0, "study", run["study"])
        frame["run_error"] = run.get("error")
        frames.append(frame)
    if frames:
        table = pd.concat(frames, ignore_index=True, sort=False)
    else:
        table = pd.DataFrame(columns=["study", "run_id", "status", "run_error"])
    first = ["study", "run_id", "status"] + [n for n in param_names if n in table.columns]
    table = table[first + [c for c in table.columns if c not in first]]
    if write:
        Path(out).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(out) / COLLECTED_FILE, index=False)
    return table
