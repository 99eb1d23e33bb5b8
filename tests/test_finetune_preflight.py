"""The finetune/ablation pre-flight: a config error found from the config and the data files writes nothing,
``gigapath validate`` reports exactly what ``gigapath run`` reports, and the console names folds as the
folders do (fold_0 ...)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import gigapath_core as gp
from gigapath_core.cli import main
from gigapath_core.errors import ConfigError
from gigapath_core.validate import validate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune import config, make_cohort  # noqa: E402

# the two mistakes of the stain example, as `--set` words, and the one line each gives
MISTAKES = [
    ("model.head.params.num_classes=3",
     "gigapath: error: model.head.params.num_classes: 3 does not match the task's number of outputs (1); leave it "
     "out to fill it in automatically"),
    ("data.label_columns=grade",
     "gigapath: error: data.label_columns: {labels} has no column 'grade' (has slide_id, patient_id, label)"),
    ("model.head={name: linear}",
     "gigapath: error: model: the model cannot run on {slide}: the linear head needs a slide embedding (B, D): "
     "configure a slide encoder"),
]


def _tiny(root: Path) -> Path:
    """4 patients, 7 slides of 8-d tiles; a 2-fold, 1-epoch finetune config written to root/ft.yaml."""
    make_cohort(root, n_patients=4)
    cfg = config(root, **{"folds.k": 2, "train.epochs": 1})
    (root / "ft.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    return root / "ft.yaml"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Console lines unwrapped (rich wraps at 80 columns when not on a terminal)."""
    from gigapath_core.progress import console

    monkeypatch.setattr(console, "_width", 400)


def _cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    """``gigapath ARGV`` in this process: exit code, stderr lines, stdout."""
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.err.splitlines(), cap.out


def _errors(lines: list[str]) -> list[str]:
    return [x for x in lines if x.startswith("gigapath:")]


def _first_train_slide(root: Path) -> str:
    from gigapath_core.finetune.config import load_finetune_config
    from gigapath_core.finetune.preflight import check_finetune

    checked = check_finetune(load_finetune_config(config(root, **{"folds.k": 2}), root))
    return checked.splits.folds[0]["train"][0]


def _line(line: str, root: Path) -> str:
    return line.format(labels=root / "labels.csv", slide=_first_train_slide(root) if "{slide}" in line else "")


@pytest.mark.parametrize("mistake, line", MISTAKES, ids=["num_classes", "label_column", "linear_head"])
def test_a_config_error_writes_nothing_and_the_fixed_config_then_runs_there(tmp_path, capsys, mistake, line):
    cfg = _tiny(tmp_path)
    out = tmp_path / "out"
    line = _line(line, tmp_path)
    code, err, _ = _cli(capsys, "run", str(cfg), "--set", mistake)
    assert (code, _errors(err)) == (2, [line])
    assert not out.exists()  # no folder, no config.yaml, splits.csv or fold_0/fingerprint.txt
    # the mistake removed, the same output folder is used (it was refused before: "holds a run with a different
    # config or different folds")
    code, err, _ = _cli(capsys, "run", str(cfg))
    assert code == 0, err
    assert sorted(p.name for p in out.glob("fold_*/status.json")) == ["status.json"] * 2
    assert json.loads((out / "metrics.json").read_text())["k"] == 2


@pytest.mark.parametrize("mistake, line", MISTAKES, ids=["num_classes", "label_column", "linear_head"])
def test_validate_reports_the_error_run_reports_with_exit_2(tmp_path, capsys, mistake, line):
    cfg = _tiny(tmp_path)
    line = _line(line, tmp_path)
    code, err, printed = _cli(capsys, "validate", str(cfg), "--set", mistake)
    assert (code, _errors(err), printed) == (2, [line], "")  # no "config OK"
    assert not (tmp_path / "out").exists()
    code, err, _ = _cli(capsys, "run", str(cfg), "--set", mistake)
    assert (code, _errors(err)) == (2, [line])  # the same line from run


def test_a_fold_folder_holding_only_a_fingerprint_does_not_lock_the_output(tmp_path):
    """A fold folder left by a run that stopped before training (no checkpoint, no status.json) is trained anew;
    one holding another config's training is still refused."""
    _tiny(tmp_path)
    out = tmp_path / "out"
    (out / "fold_0").mkdir(parents=True)
    (out / "fold_0" / "fingerprint.txt").write_text("0123456789abcdef-000000000000-000000000000\n")
    assert gp.run(config(tmp_path, **{"folds.k": 2, "train.epochs": 1})) == 0
    fingerprint = json.loads((out / "fold_0" / "status.json").read_text())["fingerprint"]
    assert (out / "fold_0" / "fingerprint.txt").read_text() == fingerprint + "\n"
    with pytest.raises(ConfigError, match=r"^output: .*fold_0 holds a run with a different config"):
        gp.run(config(tmp_path, **{"folds.k": 2, "train.epochs": 2}))
    assert (out / "fold_0" / "fingerprint.txt").read_text() == fingerprint + "\n"  # untouched


def test_the_console_names_folds_as_their_folders(tmp_path, capsys):
    cfg = _tiny(tmp_path)
    out = tmp_path / "out"
    code, err, _ = _cli(capsys, "run", str(cfg))
    assert code == 0, err
    sizes = json.loads((out / "metrics.json").read_text())["folds"]
    said = [x for x in err if x.startswith("fold_")]
    assert said == [f"fold_{f} ({f + 1} of 2): {sizes[f]['n_train']} train, 0 val, {sizes[f]['n_test']} test slides"
                    for f in range(2)]
    assert sorted(p.name for p in out.glob("fold_*")) == ["fold_0", "fold_1"]
    assert "7 slides of 4 patients, task binary ['neg', 'pos'], 2 folds (fold_0 .. fold_1)" in err
    code, err, _ = _cli(capsys, "run", str(cfg))  # a re-run reuses both, named the same way
    assert code == 0, err
    assert [x for x in err if x.startswith("fold_")] == [
        f"fold_{f} ({f + 1} of 2): done by an earlier run, reusing {out / f'fold_{f}' / 'predictions.csv'}"
        for f in range(2)]
    assert not [x for x in err if re.search(r"\bfold \d", x)]
    assert validate(str(cfg))["stages"][-1] == "2 folds (2 done by an earlier run)"


def test_ablation_variants_pass_the_preflight_before_anything_is_written(tmp_path):
    _tiny(tmp_path)
    base = config(tmp_path, **{"folds.k": 2, "train.epochs": 1})
    del base["output"]
    raw = {"job": "ablation", "base": base, "output": str(tmp_path / "abl"), "metrics": ["auroc"],
           "variants": {"ok": {}, "bad": {"model.head.params": {"num_classes": 3}}}}
    want = ("variants.bad: model.head.params.num_classes: 3 does not match the task's number of outputs (1); leave "
            "it out to fill it in automatically")
    with pytest.raises(ConfigError) as by_validate:
        validate(raw)
    with pytest.raises(ConfigError) as by_run:
        gp.run(raw)
    assert str(by_validate.value) == str(by_run.value) == want
    assert not (tmp_path / "abl").exists()  # the "ok" variant did not run first
