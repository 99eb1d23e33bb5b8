"""Rule-based report cleaning (report_cleaner ``rules``): identifying and non-diagnostic text goes, the
diagnosis stays word for word. Expected outputs are written by hand from the rules in the plugin's docstring."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from gigapath_core.api import build
from gigapath_core.kinds import ReportCleaner

REPORT = """SURGICAL PATHOLOGY REPORT
Patient: Jane Q. Doe        MRN: 00482913
DOB: 03/14/1961   Accession No: S23-04417
Ordering Physician: Dr. Alan Grant
St. Mary Medical Center, 1200 Harbor Road, Springfield
Received: 2023-05-02
FINAL DIAGNOSIS:
Skin, left forearm, shave biopsy: Seborrheic keratosis, irritated type. Margins are free of lesion.
Specimen reviewed with Dr. Ellie Sattler on May 3, 2023.
COMMENT: I have personally reviewed the slides and agree with the diagnosis.
Tumor measures 3.5 cm in greatest dimension (block A2 of S23-04417).
Electronically signed by John Hammond, MD on 05/04/2023
Page 1 of 1
"""

EXPECTED = (
    "Skin, left forearm, shave biopsy: Seborrheic keratosis, irritated type. Margins are free of lesion. "
    "Tumor measures 3.5 cm in greatest dimension (block A2 of)."
)

IDENTIFIERS = [
    "Jane",
    "Doe",
    "00482913",
    "1961",
    "S23-04417",
    "Grant",
    "Mary",
    "Harbor",
    "Springfield",
    "2023",
    "Sattler",
    "Hammond",
    "Page",
    "personally",
]


@pytest.fixture(scope="module")
def cleaner() -> ReportCleaner:
    return build("report_cleaner", "rules")


def test_clean_keeps_diagnosis_and_drops_identifiers(cleaner):
    out = cleaner.clean(REPORT)
    assert out == EXPECTED
    for token in IDENTIFIERS:
        assert token not in out, token


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Invasive ductal carcinoma, grade 2. Dictated by Dr. K. Lee 12/01/2022.",
            "Invasive ductal carcinoma, grade 2.",
        ),
        (
            "Lymph node, biopsy: metastatic carcinoma (1/3). MRN 1234567",
            "Lymph node, biopsy: metastatic carcinoma (1/3).",
        ),
        ("Results were communicated to the surgeon. Benign colonic mucosa.", "Benign colonic mucosa."),
        ("Call 555-123-4567 or mail path@hospital.org. Adenocarcinoma of the lung.", "Adenocarcinoma of the lung."),
        ("Seen on 2 January 2021: chronic gastritis.", "Seen on: chronic gastritis."),
        ("", ""),
    ],
)
def test_inline_rules(cleaner, text, expected):
    assert cleaner.clean(text) == expected


def test_drop_sections_and_titles():
    c = build("report_cleaner", "rules", drop_sections=["clinical history"], keep_section_titles=True)
    text = "CLINICAL HISTORY: rule out melanoma.\nDIAGNOSIS: Compound nevus.\nNo atypia."
    assert c.clean(text) == "DIAGNOSIS: Compound nevus. No atypia."
    assert build("report_cleaner", "rules").clean(text) == "rule out melanoma. Compound nevus. No atypia."


def test_extra_patterns_and_bad_params():
    c = build("report_cleaner", "rules", extra_patterns=[r"\bfrozen section\b"])
    assert c.clean("Frozen section diagnosis deferred. Squamous cell carcinoma.") == "Squamous cell carcinoma."
    from gigapath_core.errors import ConfigError

    with pytest.raises(ConfigError, match="report_cleaner.params"):
        build("report_cleaner", "rules", drop_section=["x"])


def test_shipped_reports_are_clean_and_diagnostic(cleaner):
    rows = list(csv.DictReader(open(Path(__file__).parent.parent / "examples" / "data" / "reports.csv")))
    assert len(rows) == 7
    cleaned = [cleaner.clean(r["report"]) for r in rows]
    assert all(cleaned)
    joined = " ".join(cleaned)
    for token in ("Morgan", "Porter", "S24-01873", "2024", "Electronically"):
        assert token not in joined
    assert "Ki-67" in joined and "carcinoma" in joined and "squamous epithelium" in joined


def test_synthetic_corpus_is_cleaned_and_cleaning_is_idempotent(cleaner):
    """examples/data/report_corpus.csv (48 reports with invented headers and footers): no patient name, record
    number or date survives, the diagnosis line does, and cleaning a cleaned report changes nothing (the clean
    job may run the rules after an LLM that already cleaned)."""
    import re

    rows = list(csv.DictReader(open(Path(__file__).parent.parent / "examples" / "data" / "report_corpus.csv")))
    assert len(rows) == 48
    for r in rows:
        out = cleaner.clean(r["report"])
        name = re.search(r"^(?:Patient|Name|Pt Name): (\w+ \w+)", r["report"], re.MULTILINE).group(1)
        diagnosis = next(line for line in r["report"].splitlines() if re.match(r"(Colon|Breast|Skin|Prostate), ", line))
        assert diagnosis in out, r["report_id"]
        assert name.split()[1] not in out and not re.search(r"\d{2}/\d{2}/\d{4}|\d{7,}|Collected|Case", out), out
        assert cleaner.clean(out) == out, r["report_id"]
