"""Assemble ``OUT/report.html``: one static page, no network, no server (inline CSS and JS, images as data:
URIs). Sections appear for what the folder holds: slides of an embed run (sortable, filterable table, failed
first, links to heatmaps), a finetune run's metrics and ROC/PR plots, an ablation's comparison table."""

from __future__ import annotations

import datetime as _dt
import html
import logging
from collections import Counter
from urllib.parse import quote
from pathlib import Path
from typing import Any

from .sections import STAGE_SECONDS, SlideRow, ablation_tables, finetune_tables, heatmap_rows, slide_rows

log = logging.getLogger("gigapath")
REPORT_FILE = "report.html"
#: slide table columns (header text); the test and the page share them
SLIDE_COLUMNS = ["thumbnail", "slide", "status", "reason", "tiles", "reader", "mpp (µm/px)", "weights",
                 "tiling (s)", "tile encoder (s)", "slide encoder (s)", "total (s)", "heatmaps"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:20px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px;margin-bottom:10px}
.counts span{display:inline-block;margin-right:10px;padding:2px 8px;border-radius:10px;font-size:13px}
.note{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;margin:6px 0;font-size:13px}
table{border-collapse:collapse;background:#fff;font-size:12.5px}
th,td{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0;position:sticky;top:0;cursor:pointer;user-select:none}
th.sorted-asc::after{content:" ▲"} th.sorted-desc::after{content:" ▼"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.reason{min-width:180px;max-width:320px;color:#700;font-size:12px;overflow-wrap:anywhere}
td.weights{min-width:140px;max-width:170px;font-size:11.5px;overflow-wrap:break-word} td.slide{min-width:130px;overflow-wrap:anywhere}
td img{display:block;max-width:110px;max-height:110px} td img.big{max-width:260px;max-height:260px}
.st{font-weight:600;padding:1px 6px;border-radius:8px}
.st-ok{background:#e3f4e3;color:#185c18}.st-failed{background:#fde2e2;color:#9b1c1c}
.st-skipped{background:#e6eefb;color:#1c3f8f}.st-pending,.st-locked{background:#eee;color:#555}
.controls{margin:8px 0}.controls input{width:280px;padding:4px}.controls select{padding:4px}
.links a{display:block;white-space:nowrap;font-size:12px} .links img{margin-bottom:4px}
.plots img{max-width:560px;margin-right:12px;border:1px solid #ddd;background:#fff}
.plots.small img{max-width:380px} h2 a{font-size:13px;font-weight:normal;margin-left:8px}
"""

JS = """
function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),
asc=!th.classList.contains('sorted-asc');t.querySelectorAll('th').forEach(h=>h.classList.remove('sorted-asc','sorted-desc'));
th.classList.add(asc?'sorted-asc':'sorted-desc');const b=t.tBodies[0],rows=[...b.rows];
const key=r=>{const c=r.cells[i];const v=c.dataset.sort!==undefined?c.dataset.sort:c.textContent.trim();
const n=parseFloat(v);return v!==''&&!isNaN(n)&&/^-?[0-9.eE+-]+$/.test(v)?[0,n]:[1,v.toLowerCase()]};
rows.sort((a,c)=>{const x=key(a),y=key(c);if(x[0]!==y[0])return x[0]-y[0];return (x[1]<y[1]?-1:x[1]>y[1]?1:0)*(asc?1:-1)});
rows.forEach(r=>b.appendChild(r));}
function filterRows(){const q=document.getElementById('q').value.toLowerCase(),s=document.getElementById('st').value;
let n=0;document.querySelectorAll('#slides tbody tr').forEach(r=>{const ok=(!q||r.textContent.toLowerCase().includes(q))&&
(!s||r.dataset.status===s);r.style.display=ok?'':'none';n+=ok});document.getElementById('shown').textContent=n;}
document.querySelectorAll('th').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _href(relpath: str) -> str:
    """A relative file path as an href attribute value: URL-quoted (a slide id may hold spaces, ``#``, ``%``,
    ``?`` or non-ASCII letters, docs/promises.md), then HTML-escaped."""
    return html.escape(quote(relpath))


def _table(rows: list[list[str]], cls: str = "") -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{_e(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num(v: str) -> str:
    try:
        return f"{float(v):.1f}"
    except (TypeError, ValueError):
        return ""


def _slide_tr(r: SlideRow) -> str:
    thumb = f'<img alt="thumbnail of {_e(r.slide_id)}" src="{r.thumbnail}">' if r.thumbnail else ""
    if thumb and r.thumbnail_href:  # the inline thumbnail opens the full-size PNG beside the report
        thumb = f'<a href="{_href(r.thumbnail_href)}" title="full-size thumbnail.png">{thumb}</a>'
    links = "".join(f'<a href="{_href(href)}">{_e(label)}</a>' for label, href in r.links)
    if r.preview:
        links = (f'<a href="{_href(r.preview[1])}"><img alt="heatmap of {_e(r.slide_id)}" src="{r.preview[0]}"></a>'
                 + links)
    secs = "".join(f'<td class="num" data-sort="{_e(r.seconds.get(k, ""))}">{_num(r.seconds.get(k, ""))}</td>'
                   for k in STAGE_SECONDS)
    reason = r.reason + (f" [{r.error_type}]" if r.error_type else "")
    # a finished slide a re-run skipped keeps its real row; say so beside its status (manifest column this_run)
    run_note = ' <small class="this-run">skipped by the last run</small>' if r.this_run == "skipped" else ""
    return (f'<tr data-status="{_e(r.status)}"><td>{thumb}</td><td class="slide">{_e(r.slide_id)}</td>'
            f'<td data-sort="{_e(r.status)}"><span class="st st-{_e(r.status)}">{_e(r.status)}</span>{run_note}</td>'
            f'<td class="reason">{_e(reason)}</td><td class="num">{_e(r.n_tiles)}</td><td>{_e(r.reader)}</td>'
            f'<td class="num">{_e(r.mpp)}</td><td class="weights">{_e(r.weights)}</td>{secs}'
            f'<td class="links">{links}</td></tr>')


def _slides_section(rows: list[SlideRow]) -> str:
    counts = Counter(r.status for r in rows)
    badges = "".join(f'<span class="st-{_e(s)}">{_e(s)}: {n}</span>' for s, n in sorted(counts.items()))
    options = "".join(f'<option value="{_e(s)}">{_e(s)}</option>' for s in sorted(counts))
    notes = ""
    if any("random" in r.weights for r in rows):
        notes = ('<div class="note">Some models ran with RANDOM weights (not pretrained): the outputs test the '
                 'pipeline, not a foundation model.</div>')
    head = "".join(f"<th>{_e(c)}</th>" for c in SLIDE_COLUMNS)
    body = "".join(_slide_tr(r) for r in rows)
    return (f'<h2>Slides ({len(rows)})</h2><div class="counts">{badges}</div>{notes}'
            '<div class="controls"><input id="q" type="search" placeholder="filter: slide, reason, reader..." '
            'oninput="filterRows()"> <select id="st" onchange="filterRows()"><option value="">every status</option>'
            f'{options}</select> <span id="shown">{len(rows)}</span> shown · click a column header to sort</div>'
            f'<table id="slides"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


HEATMAP_COLUMNS = ["heatmap", "slide", "status", "reason", "tiles", "slide prediction", "files"]


def _heatmaps_section(h: dict) -> str:
    body = []
    for r in h["rows"]:
        img = (f'<a href="{_href(r["preview_href"])}"><img class="big" alt="heatmap of {_e(r["slide_id"])}" '
               f'src="{r["preview"]}"></a>') if r["preview"] else ""
        links = "".join(f'<a href="{_href(href)}">{_e(label)}</a>' for label, href in r["links"])
        body.append(f'<tr data-status="{_e(r["status"])}"><td>{img}</td><td class="slide">{_e(r["slide_id"])}</td>'
                    f'<td><span class="st st-{_e(r["status"])}">{_e(r["status"])}</span></td>'
                    f'<td class="reason">{_e(r["reason"])}</td><td class="num">{_e(r["n_tiles"])}</td>'
                    f'<td>{_e(r["prediction"])}</td><td class="links">{links}</td></tr>')
    head = "".join(f"<th>{_e(c)}</th>" for c in HEATMAP_COLUMNS)
    return (f'<h2>Heatmaps ({len(h["rows"])} slides)</h2><div class="meta">{_e(h["kind"])} model {_e(h["model"])}'
            f' · folds {_e(h["folds"])} · embeddings {_e(h["embeddings"])} · click a picture for full size</div>'
            f'<table id="heatmaps"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _finetune_section(t: dict, title: str = "Fine-tuning", link: str = "", small: bool = False) -> str:
    notes = "".join(f'<div class="note">{_e(n)}</div>' for n in t["notes"])
    plots = "".join(f'<img alt="{_e(n)} curve" src="{u}">' for n, u in t["plots"])
    models = ", ".join(f"{k}={v}" for k, v in t["models"].items() if v not in (None, "", [], 0))
    return (f'<h2>{_e(title)}: {_e(t["title"])}{link}</h2><div class="meta">{_e(t["k"])} folds, {_e(t["n_slides"])} '
            f'slides of {_e(t["n_patients"])} patients (test splits, mean ± s.e.m. over folds) · {_e(models)}</div>'
            f'{notes}{_table(t["results"] or [], "metrics")}<h3>Fold sizes</h3>{_table(t["sizes"])}'
            f'<div class="plots{" small" if small else ""}">{plots}</div>')


def build_page(out_dir: Path) -> str:
    """The HTML text of the report of ``out_dir``."""
    from .. import __version__

    sections = []
    kinds = []
    ab = ablation_tables(out_dir)
    if ab:
        kinds.append("ablation")
        notes = "".join(f'<div class="note">{_e(n)}</div>' for n in ab["notes"])
        sections.append(f'<h2>Ablation (reference: {_e(ab["reference"])})</h2>{notes}'
                        + _table(ab["table"], "metrics")
                        + '<div class="meta">p: one-sided Wilcoxon signed-rank test that the reference beats the '
                          'variant, over the shared folds.</div>')
        for name, t in ab["variants"].items():
            own = (out_dir / name / REPORT_FILE).exists()
            link = f'<a href="{_e(name)}/{REPORT_FILE}">its report</a>' if own else ""
            sections.append(_finetune_section(t, f"Variant {name}", link, small=True))
    hm = heatmap_rows(out_dir)
    if hm:
        kinds.append("heatmap")
        sections.append(_heatmaps_section(hm))
    ft = None if ab else finetune_tables(out_dir)
    if ft:
        kinds.append("finetune")
        sections.append(_finetune_section(ft))
    if (out_dir / "manifest.csv").is_file() or any(out_dir.glob("*/tiles.h5")):
        kinds.append("embed")
        sections.insert(0, _slides_section(slide_rows(out_dir)))
    if not sections:
        sections.append('<p>Nothing to show yet: no manifest.csv, metrics.json, ablation.csv or heatmaps.json in '
                        'this folder.</p>')
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"gigapath {' + '.join(kinds) or 'run'} report: {out_dir.name}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>'
            f'<h1>{_e(title)}</h1><div class="meta">{_e(out_dir)} · written {when} · gigapath {_e(__version__)}'
            f'</div>{"".join(sections)}<script>{JS}</script></body></html>')


def write_run_report(out_dir: str | Path) -> Path:
    """Write ``OUT/report.html`` for an embed, finetune or ablation output folder (atomically); return its path.

    Raises FileNotFoundError if ``out_dir`` is not a folder.
    """
    from ..store import write_bytes

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"not a folder: {out_dir}")
    path = out_dir / REPORT_FILE
    write_bytes(path, build_page(out_dir).encode("utf-8"))
    return path


def try_write_run_report(out_dir: str | Path) -> Path | None:
    """:func:`write_run_report` for the end of a job: a failure is logged as a warning, never raised."""
    try:
        path = write_run_report(out_dir)
    except Exception as err:  # the report must never fail the run it describes
        log.warning("report.html not written: %s: %s", type(err).__name__, err)
        return None
    from ..progress import console

    console.print(f"report -> {path}")
    return path
