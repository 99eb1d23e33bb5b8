"""OUT/report.html: one self-contained page per run; the test parses it with the stdlib html.parser: a row per
slide, failed slides first, the columns, inline images only, links to heatmaps that exist; finetune and ablation
folders get their metric tables and ROC/PR plots."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from gigapath_core.report import REPORT_FILE, write_run_report
from gigapath_core.report.page import SLIDE_COLUMNS
from gigapath_core.store import MANIFEST_FIELDS, write_h5, write_json, write_png


class Page(HTMLParser):
    """Tables (id -> header texts, rows of (attributes, cell texts)), every img src and a href."""

    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self.links, self.scripts = [], [], [], 0
        self._cell = None
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"id": a.get("id"), "head": [], "rows": []})
        elif tag == "tr":
            self._row = (a, [])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag in ("script", "link") and (a.get("src") or a.get("href")):
            self.scripts += 1  # external resources

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell).strip()
            (self.tables[-1]["head"] if tag == "th" else self._row[1]).append(text)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row[1]:
                self.tables[-1]["rows"].append(self._row)
            self._row = None


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def make_embed_folder(out: Path, n_ok: int = 3) -> Path:
    """An embed output folder as the embed job leaves it: manifest (ok rows, then one failed and one skipped),
    thumbnails, tiles.h5 with mpp; heatmaps for slide s0 in a sibling folder."""
    rows = []
    for i in range(n_ok):
        sid = f"s{i}"
        write_png(out / sid / "thumbnail.png", np.full((300, 200, 3), 40 * i, np.uint8))
        write_h5(out / sid / "tiles.h5", {"coords": np.zeros((2, 2), np.int64)},
                 {"source_mpp_x": 0.2271, "source_mpp_y": 0.2271})
        rows.append({"slide_id": sid, "slide_path": f"/x/{sid}.svs", "status": "ok", "n_tiles": 10 * (i + 1),
                     "reader": "openslide", "weights": "tile_encoder=random", "seconds_tiling": 1.5,
                     "seconds_tile_encoder": 12.25, "seconds_total": 14.0 + i})
    rows.insert(1, {"slide_id": "bad", "slide_path": "/x/bad.svs", "status": "failed",
                    "reason": "/x/bad.svs: cannot open <slide> & friends", "error_type": "SlideOpenError"})
    rows.append({"slide_id": "old", "status": "skipped", "reason": "done by an earlier run", "n_tiles": 3})  # pre-#12
    rows.append({"slide_id": "again", "status": "ok", "n_tiles": 4, "seconds_total": 9.0, "this_run": "skipped"})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    maps = out.parent / "maps"
    write_png(maps / "s0" / "heatmap_attention.png", np.zeros((4, 4, 3), np.uint8))
    (maps / "s0" / "tiles.geojson").write_text("{}")
    write_json(maps / "heatmaps.json", {"embeddings": str(out), "slides": {"s0": {"status": "ok"}}})
    return out


def test_embed_report_rows_failed_first_columns_and_links(tmp_path):
    out = make_embed_folder(tmp_path / "embed")
    path = write_run_report(out)
    assert path == out / REPORT_FILE
    page = parse(path)
    (table,) = [t for t in page.tables if t["id"] == "slides"]
    assert table["head"] == SLIDE_COLUMNS
    ids = [cells[1] for _, cells in table["rows"]]
    assert ids == ["bad", "s0", "s1", "s2", "old", "again"]  # failed first, then manifest order
    status = [a["data-status"] for a, _ in table["rows"]]
    assert status == ["failed", "ok", "ok", "ok", "skipped", "ok"]
    by_id = {cells[1]: dict(zip(SLIDE_COLUMNS, cells)) for _, cells in table["rows"]}
    # a slide the last run skipped keeps its real status and timings, with a note (manifest column this_run)
    assert by_id["again"]["status"] == "ok skipped by the last run" and by_id["again"]["total (s)"] == "9.0"
    assert by_id["s0"]["status"] == "ok"
    assert by_id["bad"]["reason"] == "/x/bad.svs: cannot open <slide> & friends [SlideOpenError]"  # escaped
    assert by_id["s1"]["tiles"] == "20" and by_id["s1"]["mpp (µm/px)"] == "0.2271"
    assert by_id["s1"]["tile encoder (s)"] == "12.2" and by_id["s2"]["total (s)"] == "16.0"
    assert by_id["s0"]["heatmaps"] == "map: attentionQuPath GeoJSON"  # a preview image, then the links
    assert "../maps/s0/heatmap_attention.png" in page.links and "../maps/s0/tiles.geojson" in page.links
    for href in page.links:
        assert (out / unquote(href)).exists()
    # self-contained: every image inline, no external script/style, a thumbnail per slide that has one
    assert len(page.imgs) == 4 and all(src.startswith("data:image/jpeg;base64,") for src in page.imgs)
    assert page.scripts == 0 and "http://" not in path.read_text() and "https://" not in path.read_text()
    assert "RANDOM weights" in path.read_text()
    assert path.stat().st_size < 100_000


def test_thumbnails_link_to_the_full_size_png(tmp_path):
    """Each inline thumbnail is a link to OUT/<slide_id>/thumbnail.png, relative and URL-quoted (a slide id may
    hold spaces, '#' or non-ASCII letters); a slide without a thumbnail has neither."""
    out = make_embed_folder(tmp_path / "embed")
    odd = "case 7 #2 é"
    write_png(out / odd / "thumbnail.png", np.full((30, 20, 3), 9, np.uint8))
    with open(out / "manifest.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, extrasaction="ignore").writerow({"slide_id": odd, "status": "ok"})
    text = write_run_report(out).read_text(encoding="utf-8")
    thumbs = re.findall(r'<td><a href="([^"]+)" title="full-size thumbnail\.png"><img alt="thumbnail of ([^"]+)" '
                        r'src="data:image/jpeg;base64,', text)
    assert thumbs == [("s0/thumbnail.png", "s0"), ("s1/thumbnail.png", "s1"), ("s2/thumbnail.png", "s2"),
                      ("case%207%20%232%20%C3%A9/thumbnail.png", odd)]
    for href, sid in thumbs:
        assert (out / unquote(href)) == out / sid / "thumbnail.png" and (out / unquote(href)).is_file()
    assert text.count('alt="thumbnail of') == 4  # 'bad', 'old' and 'again' have no thumbnail.png


def test_report_without_manifest_and_cli(tmp_path, capsys):
    from gigapath_core.cli import main

    out = make_embed_folder(tmp_path / "embed")
    (out / "manifest.csv").unlink()
    write_json(out / "s1" / "status.json", {"slide_id": "s1", "status": "ok", "n_tiles": 7})
    write_json(out / "bad" / "status.json", {"slide_id": "bad", "status": "failed", "reason": "broken"})
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / REPORT_FILE)
    rows = [t for t in parse(out / REPORT_FILE).tables if t["id"] == "slides"][0]["rows"]
    assert [c[1] for _, c in rows] == ["bad", "s1"]


@pytest.fixture(scope="module")
def finetune_out(tmp_path_factory):
    import gigapath_core as gp
    from test_finetune import config, make_cohort

    root = tmp_path_factory.mktemp("ft")
    make_cohort(root, n_patients=6, dim=4)
    gp.run(config(root, **{"folds.k": 2, "train.epochs": 1}))
    return root / "out"


def test_finetune_job_writes_its_report(finetune_out):
    page = parse(finetune_out / REPORT_FILE)  # written by the job itself
    metrics = json.loads((finetune_out / "metrics.json").read_text())
    table = page.tables[0]
    assert table["head"][:2] == ["metric", "mean ± s.e.m."] and "fold_1" in table["head"]
    auroc = [cells for _, cells in table["rows"] if cells[0] == "auroc"][0]
    assert float(auroc[table["head"].index("fold_0")]) == pytest.approx(metrics["summary"]["auroc"]["folds"][0],
                                                                        abs=1e-6)
    assert len(page.imgs) == 2 and all(s.startswith("data:image/png;base64,") for s in page.imgs)  # ROC, PR
    assert [t["head"] for t in page.tables][1] == ["fold", "train", "val", "test"]


def test_ablation_report_embeds_each_variant(finetune_out, tmp_path):
    ab = tmp_path / "ablation"
    ab.mkdir()
    (ab / "ref").symlink_to(finetune_out, target_is_directory=True)
    (ab / "ablation.csv").write_text("variant,auroc,p auroc\nref,0.700 ± 0.100,ref\nother,0.600 ± 0.050,0.25\n")
    write_json(ab / "ablation.json", {"reference": "ref", "notes": ["a note"]})
    page = parse(write_run_report(ab))
    assert page.tables[0]["head"] == ["variant", "auroc", "p auroc"]
    assert [c for _, c in page.tables[0]["rows"]] == [["ref", "0.700 ± 0.100", "ref"],
                                                      ["other", "0.600 ± 0.050", "0.25"]]
    assert "ref/report.html" in page.links and len(page.imgs) == 2  # the one variant with outputs


def test_heatmap_folder_report(tmp_path):
    """A heatmap output folder's page: a row per slide, failed first, preview, prediction, links."""
    maps = tmp_path / "maps"
    write_png(maps / "s0" / "heatmap_IHC.png", np.zeros((40, 30, 3), np.uint8))
    write_png(maps / "s0" / "heatmap_attention.png", np.zeros((40, 30, 3), np.uint8))
    (maps / "s0" / "tiles.geojson").write_text("{}")
    write_h5(maps / "s0" / "scores.h5", {"coords": np.zeros((5, 2), np.int64)},
             {"class_names": json.dumps(["IHC"]), "slide_scores": json.dumps([0.7])})
    write_json(maps / "heatmaps.json", {"embeddings": "/x", "model": "/m", "kind": "finetune", "folds": "all",
                                        "slides": {"s0": {"status": "ok", "files": ["scores.h5", "tiles.geojson",
                                                                                     "heatmap_IHC.png",
                                                                                     "heatmap_attention.png"]},
                                                   "s1": {"status": "failed", "reason": "no tile_embeddings.h5",
                                                          "files": []}}})
    page = parse(write_run_report(maps))
    (table,) = [t for t in page.tables if t["id"] == "heatmaps"]
    assert [c[1] for _, c in table["rows"]] == ["s1", "s0"]
    s0 = dict(zip(table["head"], table["rows"][1][1]))
    assert s0["tiles"] == "5" and s0["slide prediction"] == "IHC 0.70"
    assert page.links[:5] == ["s0/heatmap_attention.png", "s0/heatmap_attention.png", "s0/heatmap_IHC.png",
                              "s0/tiles.geojson", "s0/scores.h5"]  # preview, then attention first
