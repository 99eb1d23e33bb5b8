"""The clean_reports job (``gigapath reports clean CONFIG``): cleaned CSV, record with token counts, histogram
plot, summary; LLM then rules against the scripted server, a failure recorded, resume from the cache."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from llm_server import ScriptedChatServer, rules_answer

from gigapath_core.api import build
from gigapath_core.cli import main
from gigapath_core.errors import ConfigError
from gigapath_core.plugins import get_plugin_manager
from gigapath_core.pretrain.data import load_pairs
from gigapath_core.reports.record import summarize, token_counter
from gigapath_plugins.text.llm_cleaner import LLMReportCleaner
from gigapath_plugins.text.report_cleaning import RuleReportCleaner

REPORTS = [
    ("S1", "Patient: Ann Roe\nFINAL DIAGNOSIS:\nColon, biopsy: adenocarcinoma, moderately differentiated.\n"
           "Electronically signed by Jo Park, MD 01/02/2023"),
    ("S2", "MRN: 1234567\nDIAGNOSIS:\nBreast, core biopsy: invasive ductal carcinoma, grade 2. ER positive."),
    ("S3", "Skin, shave biopsy: seborrheic keratosis. Reviewed with Dr. Smith on 03/14/2024. Page 1 of 1"),
]


@pytest.fixture(scope="module", autouse=True)
def registered():
    pm = get_plugin_manager()
    if "llm" not in pm.plugins["report_cleaner"]:
        pm._add("report_cleaner", LLMReportCleaner, "gigapath-plugins")


def write_inputs(tmp_path, cleaners, tokenizer="words"):
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label", "report"])
        for sid, text in REPORTS:
            w.writerow([sid, "x", text])
    cfg = {"job": "clean_reports", "output": "out", "reports": "reports.csv", "cleaners": cleaners,
           "tokenizer": tokenizer}
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "clean.yaml"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rules_record_plot_and_cleaned_csv(tmp_path):
    cfg = write_inputs(tmp_path, [{"name": "rules"}])
    assert main(["reports", "clean", str(cfg)]) == 0
    out = tmp_path / "out"
    rules = RuleReportCleaner()
    record = read_csv(out / "record.csv")
    assert list(record[0]) == ["slide_id", "row", "raw", "cleaned", "tokens_raw", "tokens_cleaned", "status",
                               "reason", "cached"]
    for rec, (sid, raw) in zip(record, REPORTS):
        assert rec["slide_id"] == sid and rec["raw"] == raw and rec["cleaned"] == rules.clean(raw)
        assert int(rec["tokens_raw"]) == len(raw.split()) and int(rec["tokens_cleaned"]) == len(rec["cleaned"].split())
        assert rec["status"] == "ok" and rec["reason"] == ""
    assert record[0]["cleaned"] == "Colon, biopsy: adenocarcinoma, moderately differentiated."
    cleaned = read_csv(out / "reports_cleaned.csv")
    assert [r["report"] for r in cleaned] == [r["cleaned"] for r in record]
    assert [(r["slide_id"], r["label"], r["cleaning_status"]) for r in cleaned] == [
        ("S1", "x", "ok"), ("S2", "x", "ok"), ("S3", "x", "ok")]
    summary = json.loads((out / "summary.json").read_text())
    before = [len(raw.split()) for _, raw in REPORTS]
    assert summary["tokens"]["before"]["median"] == sorted(before)[1]
    assert summary["tokens"]["after"]["total"] == sum(int(r["tokens_cleaned"]) for r in record)
    assert 0 < summary["tokens"]["fraction_of_tokens_removed"] < 1
    png = (out / "token_lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert main(["run", str(cfg), "--out", str(tmp_path / "again")]) == 0  # the same job through `gigapath run`
    assert read_csv(tmp_path / "again" / "record.csv") == record


def test_llm_then_rules_failure_recorded_and_resumed(tmp_path, capsys):
    with ScriptedChatServer(script={"invasive ductal": [400]}) as srv:
        llm = {"name": "llm", "params": {"base_url": srv.base_url, "model": "echo", "backoff_s": 0.01,
                                         "examples": [{"raw": "MRN 1. Benign skin.", "cleaned": "Benign skin."}]}}
        cfg = write_inputs(tmp_path, [llm, {"name": "rules"}])
        capsys.readouterr()
        assert main(["reports", "clean", str(cfg), "--show-prompt"]) == 0
        assert srv.requests == [] and not (tmp_path / "out").exists()  # shown, not sent
        printed = capsys.readouterr().out
        shown = json.loads(printed[printed.index("[\n"):])
        assert [m["role"] for m in shown] == ["system", "user", "assistant", "user"]
        assert shown[1]["content"] == "Pathology report:\nMRN 1. Benign skin." and shown[-1]["content"].endswith(
            "Jo Park, MD 01/02/2023")
        assert main(["reports", "clean", str(cfg)]) == 1  # a report failed: exit code 1
        out = tmp_path / "out"
        rec = read_csv(out / "record.csv")
        assert [r["status"] for r in rec] == ["ok", "failed", "ok"]
        assert rec[1]["reason"].startswith("llm: HTTP 400")
        assert rec[1]["cleaned"] == RuleReportCleaner().clean(REPORTS[1][1])  # uncleaned by the LLM; rules still ran
        assert read_csv(out / "reports_cleaned.csv")[1]["cleaning_status"] == "failed"
        assert any((out / "llm_cache").rglob("*.json"))  # default cache: inside the output folder
        assert json.loads((out / "summary.json").read_text())["cleaner_stats"]["llm"] == {
            "requests": 3, "cache_hits": 0, "failed": 1}
        assert main(["reports", "clean", str(cfg)]) == 0  # re-run: only the failed report is asked again
        assert len(srv.requests) == 4 and srv.requests_for("invasive ductal") == 2
        assert main(["reports", "clean", str(cfg)]) == 0 and len(srv.requests) == 4  # nothing left to ask
        assert [r["cached"] for r in read_csv(out / "record.csv")] == ["1", "1", "1"]


def test_clip_pairs_cleaned_by_the_llm_all_at_once(tmp_path, caplog):
    slides = {sid: {"features": np.zeros((2, 4), np.float32), "coords": np.array([[0, 0], [256, 0]])}
              for sid, _ in REPORTS}
    write_inputs(tmp_path, [])
    with ScriptedChatServer(script={"invasive ductal": [400]}, delay_s=0.1) as srv:
        cleaner = build("report_cleaner", "llm", base_url=srv.base_url, model="echo", cache_dir=None)
        pairs = load_pairs(tmp_path / "reports.csv", slides, cleaner)
        assert srv.max_in_flight == 3  # sent concurrently, not one by one
    assert [p["text"] for p in pairs] == [rules_answer(f"Pathology report:\n{REPORTS[0][1]}"), REPORTS[1][1],
                                          rules_answer(f"Pathology report:\n{REPORTS[2][1]}")]
    assert "1 report(s) could not be cleaned and are used as they are (rows 3): HTTP 400" in caplog.text


def test_bad_config_is_one_clear_error(tmp_path, capsys):
    cfg = write_inputs(tmp_path, [{"name": "llm", "params": {"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                                             "api_key": "sk-x"}}])
    assert main(["reports", "clean", str(cfg)]) == 2
    assert "cleaners[0].params.api_key:" in capsys.readouterr().err
    cfg = write_inputs(tmp_path, [{"name": "llm", "params": {"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                                             "exemplars": "missing.yaml"}}])
    assert main(["reports", "clean", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"cleaners[0].params.exemplars: exemplars file not found: {tmp_path / 'missing.yaml'}" in err
    assert not (tmp_path / "out").exists()  # nothing written before the config is known to be good
    with pytest.raises(ConfigError, match="column"):
        from gigapath_core.reports.exemplars import read_reports

        read_reports(tmp_path / "reports.csv", column="text")


def test_token_counts_with_the_text_encoder_tokenizer():
    count = token_counter("minilm-l6")
    assert count("the tissue shows cells") == 4 and count("") == 0
    assert count("adenocarcinoma " * 400) > 400  # not truncated at the encoder's max_length
    assert summarize([10, 20, 30], [5, 5, 5])["fraction_of_tokens_removed"] == pytest.approx(0.75)


def test_the_shipped_example_config_against_the_test_server(tmp_path):
    """examples/clean_reports.yaml (hand-cleaned exemplars + llm + rules) on examples/data/reports.csv."""
    from pathlib import Path

    from gigapath_core.reports.job import run_clean_reports

    examples = Path(__file__).resolve().parent.parent / "examples"
    raw = yaml.safe_load((examples / "clean_reports.yaml").read_text())
    with ScriptedChatServer() as srv:
        raw["cleaners"][0]["params"]["base_url"] = srv.base_url
        raw["tokenizer"] = "words"
        assert run_clean_reports(raw, examples, str(tmp_path / "out"), {}) == 0
        assert len(srv.requests) == 7 and len(srv.requests[0]["messages"]) == 1 + 2 * 4 + 1  # 4 exemplars
    rec = read_csv(tmp_path / "out" / "record.csv")
    assert [r["slide_id"] for r in rec][:2] == ["CMU-1-Small-Region", "CMU-1-Small-Region"] and len(rec) == 7
    joined = " ".join(r["cleaned"] for r in rec)
    for token in ("Morgan", "Porter", "S24-01873", "2024", "Electronically"):
        assert token not in joined
    assert "Ki-67" in joined and all(r["status"] == "ok" and r["cleaned"] for r in rec)
