"""The few-shot cleaning prompt: instructions, the hand-cleaned exemplar pairs in order, then the report.

The paper shows its prompt as an image (Xu et al. 2024, Supplementary Fig. 9); its exact text is not published
as text and is not in the prov-gigapath repository (prov-gigapath/prov-gigapath has no report-cleaning code).
:data:`DEFAULT_INSTRUCTIONS` follows the Methods description instead: keep what matters for the diagnosis,
drop hospital, physician and patient details, with 4 (raw, cleaned) in-context examples. Override it with
the ``instructions`` parameter of the ``llm`` cleaner.

Chat layout (OpenAI "few-shot" convention)::

    system:    instructions
    user:      user_template(exemplar 1 raw)     assistant: exemplar 1 cleaned
    ...        (every exemplar, in file order)
    user:      user_template(report)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..yaml_load import yaml_error_message

DEFAULT_INSTRUCTIONS = (
    "You clean pathology reports before they are paired with whole-slide images to train a vision-language "
    "model. Rewrite the report keeping only what matters for the diagnosis: specimen and site, diagnosis, "
    "histological type and grade, size and extent, margins, lymph nodes, stage, immunohistochemistry and "
    "molecular results, and diagnostic comments. Remove the names of hospitals, institutions, physicians and "
    "patients, every date, record, accession or specimen number, address, phone number and e-mail, and all "
    "non-diagnostic text (signatures, attestations, disclaimers, billing and communication notes). Do not add, "
    "infer or change findings; keep the pathologist's words. Answer with the cleaned report only, as plain text, "
    "without any preamble. The examples show how."
)
DEFAULT_USER_TEMPLATE = "Pathology report:\n{report}"


@dataclass(frozen=True)
class Exemplar:
    """A (raw, hand-cleaned) report pair used as an in-context example."""

    raw: str
    cleaned: str


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_exemplars(path: str | Path, key_path: str = "exemplars") -> list[Exemplar]:
    """Read the hand-cleaned exemplars file written by ``gigapath reports exemplars`` (YAML, ``exemplars:``
    a list of mappings with ``raw`` and ``cleaned``; other keys are ignored).

    Raises ConfigError (naming the file) if it is missing, not that layout, or an exemplar's ``cleaned`` is
    still empty (not yet cleaned by hand).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(key_path, f"exemplars file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(key_path, yaml_error_message(str(path), err)) from None
    items = data.get("exemplars") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise ConfigError(key_path, f"{path}: expected a non-empty list under 'exemplars:'")
    out, todo = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not str(item.get("raw") or "").strip():
            raise ConfigError(key_path, f"{path}: exemplar {i + 1} has no 'raw' text")
        cleaned = str(item.get("cleaned") or "").strip()
        if not cleaned:
            todo.append(str(i + 1))
        out.append(Exemplar(str(item["raw"]).strip(), cleaned))
    if todo:
        raise ConfigError(
            key_path, f"{path}: exemplar(s) {', '.join(todo)} have an empty 'cleaned:' - clean them by hand first"
        )
    return out


@dataclass(frozen=True)
class Prompt:
    """Instructions + exemplars + the user-message template (``{report}`` is replaced by the report)."""

    instructions: str = DEFAULT_INSTRUCTIONS
    exemplars: tuple[Exemplar, ...] = ()
    user_template: str = DEFAULT_USER_TEMPLATE

    def __post_init__(self):
        if "{report}" not in self.user_template:
            raise ConfigError("user_template", "must contain '{report}'")

    def user(self, report: str) -> str:
        return self.user_template.replace("{report}", report.strip())

    def messages(self, report: str) -> list[dict[str, str]]:
        """The chat messages for one report (see the module docstring for the layout)."""
        msgs = [{"role": "system", "content": self.instructions}]
        for ex in self.exemplars:
            msgs += [{"role": "user", "content": self.user(ex.raw)}, {"role": "assistant", "content": ex.cleaned}]
        return msgs + [{"role": "user", "content": self.user(report)}]

    def fingerprint(self, **settings) -> str:
        """sha256 of everything but the report that shapes the answer (instructions, exemplars in order,
        template, and generation ``settings`` such as temperature/max_tokens); part of the cache key."""
        blob = {
            "instructions": self.instructions,
            "exemplars": [[e.raw, e.cleaned] for e in self.exemplars],
            "user_template": self.user_template,
            "settings": settings,
        }
        return sha256(json.dumps(blob, sort_keys=True, ensure_ascii=False))
