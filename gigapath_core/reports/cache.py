"""On-disk cache of cleaned reports: one small JSON file per (report, prompt, model).

Layout: ``<root>/<model>/<prompt sha256[:16]>/<report sha256[:2]>/<report sha256>.json`` holding
``{"cleaned", "model", "prompt_sha256", "report_sha256", "created"}``. Files are written atomically
(:func:`gigapath_core.store.write_json`), so a run killed at any moment leaves only complete entries: the next
run re-uses them and asks only for the rest; a re-run asks for nothing. Only successful answers are cached.
The cache holds cleaned text only (no raw report); keep it where the reports may be kept anyway.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..store import write_json


class CleanCache:
    def __init__(self, root: str | Path, model: str, prompt_sha256: str):
        safe_model = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "model"
        self.prompt_sha256 = prompt_sha256
        self.model = model
        self.folder = Path(root).expanduser() / safe_model / prompt_sha256[:16]

    def path(self, report_sha256: str) -> Path:
        return self.folder / report_sha256[:2] / f"{report_sha256}.json"

    def get(self, report_sha256: str) -> str | None:
        """The cached cleaned text, or None (absent or unreadable: asked again)."""
        try:
            obj = json.loads(self.path(report_sha256).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if obj.get("prompt_sha256") != self.prompt_sha256 or obj.get("model") != self.model:
            return None
        return obj.get("cleaned")

    def put(self, report_sha256: str, cleaned: str) -> None:
        write_json(
            self.path(report_sha256),
            {
                "cleaned": cleaned,
                "model": self.model,
                "prompt_sha256": self.prompt_sha256,
                "report_sha256": report_sha256,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
