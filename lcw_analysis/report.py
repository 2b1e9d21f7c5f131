"""Static HTML report of a runs folder: ``<out>/report/index.html``.

The index lists every run (status, time, the parameters that were set) with a link to its page and
shows the head of the collected table (``<out>/results.csv``, rebuilt by ``collect``). A run page
shows its parameters, error and traceback when it failed, its figures (PNG, linked in place from
the run folder, so keep ``report/`` beside the study folders) and a link to the executed notebook
rendered by nbconvert (``lab`` template, CSS inline, no CDN scripts). Opens without a network.
"""

from __future__ import annotations

import html
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from .runner import COLLECTED_FILE, collect, iter_runs

__all__ = ["build_report"]

REPORT_DIR = "report"
_SUMMARY_ROWS = 200
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.ok { color: #1a7f37; font-weight: 600; } .failed { color: #cf222e; font-weight: 600; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }
figure { display: inline-block; margin: 0.5em; }
figure img { max-width: 32em; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; } code { font-size: 0.95em; }
.thumbs img { max-height: 5em; margin-right: 0.3em; border: 1px solid #ddd; }
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def _esc(value) -> str:
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    return html.escape(str(value))


def _url(path: str) -> str:
    return quote(path, safe="/=+,")


def _link(path: str, text: str) -> str:
    return f"<a href='{_url(path)}'>{html.escape(text)}</a>"


def _figures(run_dir: Path) -> list[str]:
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*.png"))


def _notebook_html(notebook: Path, target: Path) -> bool:
    """Render an executed notebook with nbconvert; skip when the HTML is newer. True if written."""
    if not notebook.is_file():
        return False
    if target.is_file() and target.stat().st_mtime >= notebook.stat().st_mtime:
        return True
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    for trait in (
        "mathjax_url",
        "require_js_url",
        "jquery_url",
        "mermaid_js_url",
        "mermaid_layout_elk_js_url",
        "widget_renderer_url",
    ):
        if exporter.has_trait(trait):
            setattr(exporter, trait, "")  # no CDN scripts: the page must open offline
    try:
        body, _ = exporter.from_notebook_node(nbformat.read(notebook, as_version=4))
    except Exception as exc:  # noqa: BLE001 - a broken notebook must not break the report
        body = _page(notebook.name, f"<p>Could not render {_esc(notebook)}: {_esc(exc)}</p>")
    body = re.sub(r"<script[^>]*\ssrc=[\"']{2}[^>]*>\s*</script>", "", body)
    target.write_text(body, encoding="utf-8")
    return True


def _run_page(run: dict, out: Path, page_dir: Path) -> tuple[str, str]:
    """Write the run's page (and notebook HTML); return (page href, thumbnails html)."""
    run_dir: Path = run["path"]
    stem, run_id = run["study"], run["run_id"]
    up = f"../../{stem}/{run_id}/"  # from report/<study>/ back to the run folder
    nb_name = run.get("executed_notebook") or f"{stem}.ipynb"
    has_nb = _notebook_html(run_dir / nb_name, page_dir / f"{run_id}.notebook.html")
    figures = _figures(run_dir)
    status = run.get("status", "?")
    parts = [
        f"<p>{_link('../index.html', '← all runs')}</p>",
        f"<h1>{_esc(stem)} / {_esc(run_id)}</h1>",
        f"<p>Status: <span class='{_esc(status)}'>{_esc(status)}</span>"
        f" · {_esc(run.get('duration_s', '-'))} s · finished {_esc(run.get('finished', '-'))}"
        f" · host {_esc(run.get('host', '-'))}</p>",
    ]
    links = []
    if has_nb:
        links.append(_link(f"{run_id}.notebook.html", "executed notebook (HTML)"))
        links.append(_link(up + nb_name, nb_name))
    if (run_dir / "results.csv").is_file():
        links.append(_link(up + "results.csv", "results.csv"))
    links.append(_link(up, "run folder"))
    parts.append("<p>" + " · ".join(links) + "</p>")
    if run.get("error"):
        parts.append(f"<h2>Error</h2><p><code>{_esc(run['error'])}</code></p>")
        parts.append(f"<pre>{_esc(run.get('traceback') or '')}</pre>")
    params = run.get("parameters") or {}
    set_ = run.get("set") or {}
    rows = "".join(
        f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td><td>{'set' if k in set_ else 'default'}</td></tr>"
        for k, v in params.items()
    )
    parts.append(
        f"<h2>Parameters</h2><table><tr><th>name</th><th>value</th><th></th></tr>{rows}</table>"
    )
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [
            f"<figure><a href='{_url(up + f)}'><img src='{_url(up + f)}' alt='{_esc(f)}'></a>"
            f"<figcaption>{_esc(f)}</figcaption></figure>"
            for f in figures
        ]
    (page_dir / f"{run_id}.html").write_text(
        _page(f"{stem} / {run_id}", "\n".join(parts)), encoding="utf-8"
    )
    thumbs = "".join(
        f"<img src='{_url(f'../{stem}/{run_id}/{f}')}' alt='{_esc(f)}'>" for f in figures[:4]
    )
    return f"{stem}/{run_id}.html", thumbs


def build_report(out: str | os.PathLike = "runs") -> Path:
    """Build ``<out>/report/index.html`` (works with zero runs); returns its path."""
    out = Path(out)
    report = out / REPORT_DIR
    report.mkdir(parents=True, exist_ok=True)
    runs = iter_runs(out)
    table = collect(out, write=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<h1>lcw-analysis runs</h1><p>{_esc(out.resolve())} · built {stamp}</p>"]
    if not runs:
        parts.append(
            "<p><strong>No runs yet.</strong> Start some with "
            "<code>lcw-analysis run STUDY</code>, then rebuild this report.</p>"
        )
    else:
        n_ok = sum(r.get("status") == "ok" for r in runs)
        parts.append(
            f"<p>{len(runs)} runs: {n_ok} ok, {len(runs) - n_ok} failed · "
            f"{_link('../' + COLLECTED_FILE, 'all results (CSV)')}</p>"
        )
    for stem in sorted({r["study"] for r in runs}):
        page_dir = report / stem
        page_dir.mkdir(exist_ok=True)
        rows = []
        for run in (r for r in runs if r["study"] == stem):
            href, thumbs = _run_page(run, out, page_dir)
            status = run.get("status", "?")
            set_ = ", ".join(f"{k}={_esc(v)}" for k, v in (run.get("set") or {}).items())
            rows.append(
                f"<tr><td>{_link(href, run['run_id'])}</td>"
                f"<td class='{_esc(status)}'>{_esc(status)}</td>"
                f"<td>{_esc(run.get('duration_s', '-'))}</td><td>{_esc(run.get('finished', ''))}"
                f"</td><td>{set_ or 'defaults'}</td><td>{_esc(run.get('error') or '')}</td>"
                f"<td class='thumbs'>{thumbs}</td></tr>"
            )
        parts.append(
            f"<h2>{_esc(stem)}</h2><table><tr><th>run</th><th>status</th><th>seconds</th>"
            "<th>finished</th><th>parameters set</th><th>error</th><th>figures</th></tr>"
            + "".join(rows)
            + "</table>"
        )
    if runs:
        shown = table.head(_SUMMARY_ROWS)
        note = (
            f" (first {_SUMMARY_ROWS} of {len(table)} rows)" if len(table) > _SUMMARY_ROWS else ""
        )
        parts.append(
            f"<h2>Summary table{note}</h2>" + shown.to_html(index=False, na_rep="", border=0)
        )
    current = {f"{r['study']}/{r['run_id']}" for r in runs}
    for page in report.glob("*/*.html"):  # pages of runs that are gone
        suffix = ".notebook.html" if page.name.endswith(".notebook.html") else ".html"
        if f"{page.parent.name}/{page.name[: -len(suffix)]}" not in current:
            page.unlink()
    index = report / "index.html"
    index.write_text(_page("lcw-analysis runs", "\n".join(parts)), encoding="utf-8")
    return index
