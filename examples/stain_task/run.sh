#!/usr/bin/env bash
# The stain example end to end (CPU, a few minutes): embed -> pseudo-slides -> 5-fold fine-tuning -> ablation ->
# heatmaps of the fold ensemble over the three whole slides (see docs/looking_at_results.md).
# Outputs go to out/stain_task/ at the repository root. Re-running resumes: finished steps and folds are reused.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# the README's venv (.venv at the repository root) if there is one, else whatever is on PATH
if [[ -z "${GIGAPATH:-}" && -x "$root/.venv/bin/gigapath" ]]; then GIGAPATH="$root/.venv/bin/gigapath"; PYTHON="${PYTHON:-$root/.venv/bin/python}"; fi
gigapath="${GIGAPATH:-gigapath}"
python="${PYTHON:-python3}"
if ! command -v "$gigapath" >/dev/null; then
  echo "run.sh: no 'gigapath' command: install as the README says (python3 -m venv .venv && .venv/bin/pip install -e . -e ./plugins)," \
       "activate it (source .venv/bin/activate) or set GIGAPATH=/path/to/gigapath" >&2
  exit 2
fi
"$gigapath" run "$here/embed.yaml"
"$python" "$here/make_pseudo_slides.py" "$root/out/stain_task/embed" "$root/out/stain_task/pseudo"
"$gigapath" run "$here/finetune.yaml"
"$gigapath" run "$here/ablation.yaml"
"$gigapath" heatmap "$root/out/stain_task/embed" --model "$root/out/stain_task/finetune" --out "$root/out/stain_task/heatmaps"
