"""The run report page: ``OUT/report.html``, one static self-contained page (inline CSS/JS, images as data: URIs)
for an embed, finetune or ablation output folder (issue #13.3). :func:`write_run_report` writes it;
:func:`try_write_run_report` is what the jobs call at their end (a report problem never fails a job)."""

from .page import REPORT_FILE, try_write_run_report, write_run_report

__all__ = ["REPORT_FILE", "write_run_report", "try_write_run_report"]
