"""The self-contained HTML report page: tables, figures as data URIs, sortable per-case tables."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from wsss_bench.interfaces import Exporter, ReportTable
from wsss_bench.reporting import figures as figs
from wsss_bench.reporting.layout import _tasks_in, _values, gates_of
from wsss_bench.reporting.load import bootstrap_resamples, failed_cells, load_manifests, load_results
from wsss_bench.reporting.quality import QualityIndex, model_quality_table, seeds_table
from wsss_bench.reporting.tables import build_tables, classifier_table, per_case_table

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

_PAGE_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1500px;
color:#1d2329;padding:0 16px}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccd;padding-bottom:3px}
table.wsss{border-collapse:collapse;margin:8px 0 4px;font-size:13px}
table.wsss th,table.wsss td{padding:3px 8px;text-align:center;white-space:nowrap}
table.wsss td:first-child,table.wsss th:first-child{text-align:left}
table.wsss thead tr:first-child th{border-top:2px solid #222}
table.wsss thead tr:last-child th{border-bottom:1px solid #222}
table.wsss tbody tr:last-child td{border-bottom:2px solid #222}
table.wsss tr.rule td{border-top:1px solid #222}
table.wsss th.group{border-bottom:1px solid #888}
table.wsss .ci{display:block;font-size:11px;color:#56606b}
table.wsss td.failed{color:#a4161a;font-size:12px}
table.sortable th{cursor:pointer;user-select:none} table.sortable th:hover{background:#eef}
table.sortable th.asc::after{content:' \\25B2'} table.sortable th.desc::after{content:' \\25BC'}
table.sortable tbody tr:nth-child(even){background:#f6f7f9}
p.footer{font-size:12px;color:#444;max-width:1400px;margin-top:2px}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:13px}
dl.meta dt{font-weight:600} dl.meta dd{margin:0}
figure{margin:14px 0} figure img{max-width:100%;border:1px solid #dde} figcaption{font-size:12px;color:#444}
.note{font-size:13px;color:#555}
"""

# Click a header of a table.sortable to sort by it (numbers numerically, '—' last); a URL
# hash "#sort=<table id>:<column>:<asc|desc>" applies one sort on load (used by the tests).
_PAGE_JS = """
(function(){
function key(td){var v=td.getAttribute('data-value');if(v===null)v=td.textContent;
 var f=parseFloat(v);return isNaN(f)?null:f;}
function sortBy(table,col,dir){var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
 rows.sort(function(a,b){var x=key(a.cells[col]),y=key(b.cells[col]);
  if(x===null&&y===null){var s=a.cells[col].textContent.localeCompare(b.cells[col].textContent);return dir==='asc'?s:-s;}
  if(x===null)return 1; if(y===null)return -1; return dir==='asc'?x-y:y-x;});
 rows.forEach(function(r){body.appendChild(r);});
 var ths=table.tHead.rows[table.tHead.rows.length-1].cells;
 for(var i=0;i<ths.length;i++){ths[i].classList.remove('asc','desc');}
 ths[col].classList.add(dir);}
document.querySelectorAll('table.sortable').forEach(function(table){
 var ths=table.tHead.rows[table.tHead.rows.length-1].cells;
 Array.prototype.forEach.call(ths,function(th,i){th.addEventListener('click',function(){
  sortBy(table,i,th.classList.contains('desc')?'asc':'desc');});});});
var m=/sort=([^:&]+):(\\d+):(asc|desc)/.exec(decodeURIComponent(location.hash||''));
if(m){var t=document.getElementById(m[1]);if(t){sortBy(t,parseInt(m[2],10),m[3]);}}
document.documentElement.setAttribute('data-ready','1');
})();
"""


def _esc(text: Any) -> str:
    import html

    return html.escape(str(text), quote=True)


def html_page(sections: Sequence[tuple[str, Sequence[Any]]], exporter: Exporter, *, title: str,
              meta: Sequence[tuple[str, str]] = ()) -> str:
    """One self-contained HTML document: no external resource, figures inlined as data URIs.

    ``sections`` = [(heading, items)]; an item is a ReportTable (rendered by ``exporter``'s
    ``fragment``), ``("figure", caption, png_bytes)``, ``("sortable", table_id, ReportTable)`` or
    ``("note", text)``.
    """
    import base64

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
             'img-src data:; style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">',
             f"<title>{_esc(title)}</title>", f"<style>{_PAGE_CSS}</style></head><body>",
             f"<h1>{_esc(title)}</h1>"]
    if meta:
        parts.append('<dl class="meta">' + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in meta) + "</dl>")
    for heading, items in sections:
        parts.append(f"<h2>{_esc(heading)}</h2>")
        for item in items:
            if isinstance(item, ReportTable):
                parts.append(exporter.fragment(item))
            elif item[0] == "figure":
                data = base64.b64encode(item[2]).decode("ascii")
                parts.append(f'<figure><img alt="{_esc(item[1])}" src="data:image/png;base64,{data}">'
                             f"<figcaption>{_esc(item[1])}</figcaption></figure>")
            elif item[0] == "sortable":
                parts.append(exporter.fragment(item[2], table_id=item[1], sortable=True))
            elif item[0] == "note":
                parts.append(f'<p class="note">{_esc(item[1])}</p>')
            elif item[0] == "links":  # (label, href) pairs: the method pages of the project's docs
                parts.append("<ul>" + "".join(f'<li><a href="{_esc(href)}">{_esc(label)}</a></li>'
                                              for label, href in item[1]) + "</ul>")
            else:  # pragma: no cover - programming error
                raise ValueError(f"unknown page item {item[0]!r}")
    parts.append(f"<script>{_PAGE_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def run_meta(df: "pd.DataFrame", manifests: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Facts about the runs for the page header: runs, profile, seeds, data, tasks, methods."""
    meta = [("runs", ", ".join(m.get("_run_dir", "") for m in manifests) or ", ".join(_values(df, "run_dir"))),
            ("profile", ", ".join(_values(df, "profile")) or "unspecified"),
            ("seeds", ", ".join(_values(df, "seed")) or "unspecified"),
            ("data", ", ".join(_values(df, "data")) or "unspecified"),
            ("tasks", ", ".join(_tasks_in(df))), ("methods", str(df["method"].nunique()))]
    for m in manifests[:1]:
        if m.get("command"):
            meta.append(("command", str(m["command"])))
        env = m.get("environment") or {}
        if isinstance(env, Mapping) and env.get("git_sha"):
            meta.append(("git", str(env["git_sha"])))
        if isinstance(env, Mapping) and env:
            pk = env.get("packages") or {}
            versions = [f"wsss-bench {env.get('harness_version', '?')}", f"Python {env.get('python', '?')}",
                        *(f"{k} {pk[k]}" for k in ("torch", "numpy", "scipy", "monai", "timm") if k in pk)]
            meta.append(("versions", ", ".join(versions)))
            device = [str(env.get("device") or "?")]
            if env.get("cpu_model"):
                device.append(f"{env['cpu_model']} ({env.get('cpu_count', '?')} cores, {env.get('torch_threads', '?')} torch threads)")
            if env.get("cuda"):
                device.append(f"CUDA {env['cuda']}")
            meta.append(("device", "; ".join(device)))
    if not any(k == "versions" for k, _ in meta):
        meta += [("versions", "not recorded by the run"), ("device", "not recorded by the run")]
    secs = [float(m["wall_seconds"]) for m in manifests if isinstance(m.get("wall_seconds"), (int, float))]
    if secs:
        total = sum(secs)
        meta.append(("run time", f"{total / 60:.1f} min" if total >= 90 else f"{total:.1f} s"))
    return meta


#: one line per negative gate: what its numbers mean (docs/protocol.md section 7)
GATE_LINES = {
    "label": "gate=label: predictions are emptied on slices whose image label is negative, so every negative "
             "slice scores 1 for every method (the all-slice mean includes those free ones; compare the "
             "positive-slice columns for segmentation quality).",
    "classifier": "gate=classifier: predictions are emptied where the task's CAM classifier gives p(positive) "
                  "< 0.5, what a deployed model could do (the classifier's AUC, sensitivity and specificity are "
                  "in the Negative gate table).",
    "none": "gate=none: raw predictions; a negative slice scores 1 only when its prediction is empty.",
}


def run_warnings(manifests: Sequence[Mapping[str, Any]]) -> list[str]:
    """The warnings of the runs, one line each: those the manifests recorded, and AME-CAM
    polarity ties found in the per-cell records (runs made before warnings were recorded)."""
    from wsss_bench.running.rundir import cell_manifests

    lines: list[str] = []
    for m in manifests:
        for w in m.get("warnings") or []:
            where = " ".join(str(w[k]) for k in ("task", "method", "unit") if w.get(k))
            lines.append(f"{where}: {w.get('message', '')}" if where else str(w.get("message", "")))
        if not m.get("_run_dir"):
            continue
        for rec in cell_manifests(m["_run_dir"]):
            pol = (rec.get("records") or {}).get("amecam/polarity") or {}
            if pol.get("tied"):
                task = (rec.get("cell") or {}).get("task", "?")
                lines.append(f"{task}: AME-CAM's deletion test could not choose the polarity (drop+ "
                             f"{pol.get('drop_plus', float('nan')):.4f}, drop- {pol.get('drop_minus', float('nan')):.4f}); "
                             "s = +1 was used, so its maps may be close to uninformative")
    return list(dict.fromkeys(lines))


def method_links(df: "pd.DataFrame") -> list[tuple[str, str]]:
    """(plugin, link to its page in docs/methods/) for every map source and refiner in ``df``."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs" / "methods"
    pages = {"gradcam": "gradcam", "gradcampp": "gradcampp", "scorecam": "scorecam", "layercam": "layercam",
             "seam": "seam", "amecam": "amecam", "cdm": "diffusion", "mg": "diffusion", "dig": "dig",
             "cldf": "cldf", "fsl": "fsl", "threshold": "conventions"}
    names: list[str] = []
    for col in ("cam", "refiner"):
        if col in df.columns:
            for value in map(str, df[col].dropna().unique()):
                names += [re.split(r"\[", part, maxsplit=1)[0] for part in value.split("+") if part]
    out = []
    for name in dict.fromkeys(n for n in names if n in pages):
        page = docs / f"{pages[name]}.md"
        out.append((f"{name}: docs/methods/{pages[name]}.md", page.as_uri() if page.is_file() else f"docs/methods/{pages[name]}.md"))
    return out


def html_report(source: Any, exporter: Exporter, *, table: str = "summary", gate: str | None = "all",
                with_paper: bool = False, per_volume: bool = False, resamples: int | None = None,
                reference: str | None = None, figures: bool = True, metrics: Any = None,
                empty_distance: str = "undefined", labels: Sequence[str] = (), cache_dir: Any = None) -> str:
    """The whole HTML page of one or more runs: tables with CIs and quality marks, the model
    quality and training-split pseudo-mask tables, classifier gate, failed cells, the figures
    (embedded PNG), and the sortable per-case Dice table."""
    from wsss_bench.reporting.load import load_runs

    df, manifests = load_runs(source, labels)
    failed = failed_cells(manifests)
    r = bootstrap_resamples(df, manifests) if resamples is None else resamples
    gates = gates_of(df, gate)
    quality = QualityIndex.of(manifests)
    tables = build_tables(df, table, gate, with_paper=with_paper, per_volume=per_volume, resamples=r,
                          reference=reference, failed=failed, metrics=metrics, empty_distance=empty_distance,
                          quality=quality, quality_table=False)
    sections: list[tuple[str, list]] = [("Results", [*[("note", GATE_LINES[g]) for g in gates if g in GATE_LINES],
                                                     *tables])]
    warned = run_warnings(manifests)
    sections.insert(0, ("Warnings of the run", [("note", w) for w in warned] or [("note", "none recorded")]))
    mq = model_quality_table(quality, df) if table != "quality" else None
    if mq is not None:
        sections.append(("Model quality", [mq]))
    if quality and table != "seeds":
        sections.append(("Pseudo-mask quality (training split)", [seeds_table(quality, df)]))
    clf = classifier_table(df)
    if clf is not None:
        sections.append(("Negative gate", [clf]))
    if figures:
        items: list = []
        made, skipped = figs.build_figures(df, manifests, gate=gates[0], cache_dir=cache_dir)
        for fig in made:
            items.append(("figure", fig.caption, fig.png()))
            fig.close()
        items += [("note", why) for why in skipped]
        sections.append(("Figures", items))
    per_case = [("sortable", f"per-case-{t}", per_case_table(df, gates[0], per_volume=per_volume, task=t))
                for t in _tasks_in(df)]
    sections.append((f"Per case (gate={gates[0]}; click a header to sort)", per_case))
    links = method_links(df)
    if links:
        sections.append(("Methods (their pages in the project's docs)", [("links", links)]))
    return html_page(sections, exporter, title="wsss-bench report", meta=run_meta(df, manifests))
