"""Rule-based pathology report cleaning before slide–report alignment (Xu et al. 2024, Methods: slide-level
vision-language alignment).

The paper cleaned its 17,383 reports with a large language model (4 in-context examples), removing hospital,
clinician and patient names and non-diagnostic text. This plugin is the offline default: regular-expression
rules that drop

- header/footer lines about people, places and the paperwork (patient, physician, hospital, address,
  accession, MRN, signature, page numbers...) and report titles,
- sentences naming an institution or a street address (hospital, medical center, clinic, 12 Main Street...),
- non-diagnostic boilerplate sentences (attestations, disclaimers, "see comment"...),
- inline dates, record/accession numbers, phone numbers and titled names (``Dr. Smith``, ``Jane Doe, MD``),

and keeps the diagnostic sentences in their order. An LLM cleaner is another ``report_cleaner`` plugin
with the same one-method interface ``clean(report: str) -> str`` (see docs/pretraining.md).
"""

from __future__ import annotations

import re

from pydantic import Field

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, ReportCleaner

_MONTHS = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|jun(?:e)?|jul(?:y)?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)

#: a whole line is dropped when it starts with one of these field labels (case-insensitive)
HEADER_FIELDS = (
    "patient",
    "name",
    "pt name",
    "mrn",
    "medical record",
    "record no",
    "dob",
    "date of birth",
    "age/sex",
    "sex",
    "accession",
    "case no",
    "case number",
    "case #",
    "specimen id",
    "lab no",
    "physician",
    "ordering",
    "referring",
    "requesting",
    "attending",
    "surgeon",
    "pathologist",
    "resident",
    "fellow",
    "clinician",
    "copy to",
    "cc",
    "hospital",
    "institution",
    "facility",
    "medical center",
    "clinic",
    "location",
    "address",
    "phone",
    "tel",
    "fax",
    "email",
    "received",
    "collected",
    "reported",
    "date",
    "report date",
    "signed",
    "electronically signed",
    "verified by",
    "dictated by",
    "transcribed by",
    "cpt",
    "icd",
    "billing",
    "page",
    "account",
    "room",
    "bed",
    "ward",
    "insurance",
    "ssn",
)

#: sentences dropped wherever they occur (non-diagnostic boilerplate; case-insensitive regular expressions)
BOILERPLATE = (
    r"\bi\s+(?:have\s+)?(?:personally\s+)?(?:reviewed|examined|attest)\b",
    r"\belectronically\s+signed\b",
    r"\b(?:dictated|transcribed|signed|verified|grossed|prepared)\s+by\b",
    r"\bthis\s+(?:test|assay)\s+was\s+(?:developed|performed)\b",
    r"\bnot\s+(?:been\s+)?(?:cleared|approved)\s+by\s+the\s+(?:u\.?s\.?\s+)?fda\b",
    r"\bclia\b",
    r"\bsee\s+(?:comment|note)\s+below\b",
    r"\b(?:results?|findings?)\s+(?:were\s+)?(?:communicated|called|discussed)\s+(?:to|with)\b",
    r"\bthank\s+you\s+for\s+(?:this|the)\s+referral\b",
    r"\bpage\s+\d+\s+of\s+\d+\b",
    r"\bend\s+of\s+report\b",
    r"\bconfidential\b",
    r"\b(?:reviewed|discussed|shown)\s+(?:with|to)\s+(?:dr\b|the\s+(?:clinician|surgeon|physician|team))",
    r"\b(?:intradepartmental|departmental)\s+consultation\b",
)

#: inline patterns replaced by nothing
_DATE = re.compile(
    r"\b(?:\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}|\d{4}-\d{1,2}-\d{1,2}|"
    + _MONTHS
    + r"\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}|"
    r"\d{1,2}(?:st|nd|rd|th)?\s+" + _MONTHS + r"\.?,?\s+\d{4})\b",
    re.IGNORECASE,
)
_RECORD = re.compile(
    r"\b(?:(?:mrn|accession|acc|case|specimen|record|lab|slide|block)\s*(?:no\.?|number|#|id)?\s*[:#]?\s*)"
    r"[A-Z]{0,4}-?\d[\dA-Z-]{3,}\b|\b[A-Z]{1,3}\d{2}-\d{3,7}\b|\b\d{6,}\b",
    re.IGNORECASE,
)
_PHONE = re.compile(r"(?:\+?\d{1,2}[\s.-]?)?\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}\b")
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b")
_TITLED_NAME = re.compile(r"\b(?i:dr|mr|mrs|ms|prof)\.?\s+(?:[A-Z][a-zA-Z'-]*\.?\s*){1,3}")
_NAME_DEGREE = re.compile(
    r"\b(?:[A-Z][a-zA-Z'-]+\.?\s+){1,3}[A-Z][a-zA-Z'-]+,?\s+(?:MD|M\.D\.|DO|PhD|FRCPath|FCAP)\b\.?"
)
_HEADER = re.compile(
    # a field ending in '#' ('case #') has no word boundary after it
    r"^\s*(?:" + "|".join(re.escape(f) for f in HEADER_FIELDS) + r")(?:\b|(?<=#))[\w .'/()-]{0,25}[:#]",
    re.IGNORECASE,
)
_TITLE = re.compile(r"^\s*(?:[A-Za-z]+\s+){0,3}(?:pathology|cytology|consultation|autopsy)\s+report\s*$", re.IGNORECASE)
_LOCATION = re.compile(
    r"\b(?:hospital|medical\s+cent(?:er|re)|clinic|health\s+system|university|institute|laborator(?:y|ies))\b|"
    r"\b\d{1,5}\s+(?:[A-Z][a-z]+\s+){1,3}(?:road|rd|street|st|avenue|ave|boulevard|blvd|drive|lane|ln|way|suite)\b",
    re.IGNORECASE,
)
_SECTION = re.compile(r"^\s*([A-Za-z][A-Za-z /&-]{1,40}):\s*(.*)$")


class RuleReportCleaner(ReportCleaner):
    """Rule-based report cleaning: drops names, dates, record numbers, location lines and boilerplate."""

    name = "rules"

    class Params(PluginParams):
        drop_sections: list[str] = Field(
            default_factory=list, description="section titles whose whole text is dropped (e.g. 'clinical history')"
        )
        extra_patterns: list[str] = Field(
            default_factory=list, description="more regular expressions; a sentence matching one is dropped"
        )
        keep_section_titles: bool = Field(False, description="keep 'FINAL DIAGNOSIS:'-style titles in the text")
        lowercase: bool = Field(False, description="lower-case the output")

    def __init__(self, drop_sections=(), extra_patterns=(), keep_section_titles=False, lowercase=False):
        self.drop_sections = {s.strip().lower() for s in drop_sections}
        self.boilerplate = [re.compile(p, re.IGNORECASE) for p in (*BOILERPLATE, *extra_patterns)]
        self.keep_section_titles, self.lowercase = keep_section_titles, lowercase

    @staticmethod
    def _is_header(line: str) -> bool:
        """A field line about people, places or paperwork (``Ordering physician: ...``) or a report title."""
        return bool(_HEADER.match(line) or _TITLE.match(line))

    def clean(self, report: str) -> str:
        """Raw report (any line layout) -> cleaned diagnostic text: one line, sentences in order.

        Returns "" when nothing diagnostic is left.
        """
        kept: list[str] = []
        dropping = False
        for line in str(report).replace("\r", "\n").split("\n"):
            if not line.strip():
                continue
            if self._is_header(line):
                continue
            m = _SECTION.match(line)
            bare = line.strip().rstrip(":").lower()
            if m and (m.group(1).isupper() or m.group(1).strip().lower() in _KNOWN_SECTIONS | self.drop_sections):
                title, line = m.group(1).strip(), m.group(2)
                dropping = title.lower() in self.drop_sections
                if self.keep_section_titles and not dropping and line.strip():
                    line = f"{title}: {line}"
            elif bare in _KNOWN_SECTIONS | self.drop_sections:
                dropping = bare in self.drop_sections
                continue
            if dropping or not line.strip():
                continue
            kept.append(line.strip())
        sentences = [
            s
            for line in kept
            for s in _split_sentences(line)
            if not _LOCATION.search(s) and not any(p.search(s) for p in self.boilerplate)
        ]
        out = []
        for s in sentences:
            for pat in (_EMAIL, _NAME_DEGREE, _TITLED_NAME, _DATE, _PHONE, _RECORD):
                s = pat.sub(" ", s)
            s = re.sub(r"\(\s*\)", " ", s)
            s = re.sub(r"\(\s+", "(", re.sub(r"\s+\)", ")", s))
            s = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s{2,}", " ", s)).strip()
            s = re.sub(r"^[,;:.\s]+|(?<=[,;:])[,;:]+", "", s).strip()
            if re.search(r"[A-Za-z]{2,}", s):
                out.append(s)
        text = " ".join(out)
        return text.lower() if self.lowercase else text


_KNOWN_SECTIONS = {
    "diagnosis",
    "final diagnosis",
    "pathologic diagnosis",
    "microscopic description",
    "microscopic",
    "gross description",
    "gross",
    "comment",
    "comments",
    "note",
    "clinical history",
    "clinical information",
    "specimen",
    "specimens",
    "synoptic report",
    "addendum",
    "immunohistochemistry",
    "ancillary studies",
}


def _split_sentences(text: str) -> list[str]:
    """Split on sentence ends (. ! ?) followed by a space and a capital letter or digit; keeps 'Dr.'-style
    abbreviations, initials (A. Morgan) and decimals (3.5 cm) intact."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(])", text)
    out: list[str] = []
    for p in parts:
        if out and (
            re.search(r"\b(?:Dr|Mr|Mrs|Ms|Prof|St|No|vs|approx|e\.g|i\.e)\.$", out[-1], re.IGNORECASE)
            or re.search(r"(?:^|\s)[A-Z]\.$", out[-1])
        ):
            out[-1] = f"{out[-1]} {p}"
        else:
            out.append(p)
    return [p.strip() for p in out if p.strip()]


@hookimpl
def gigapath_report_cleaners():
    return [RuleReportCleaner]
