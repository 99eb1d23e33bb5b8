"""`gigapath validate`, every config error in one report with "did you mean", quiet third-party logs (issue #12
item 4)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gigapath_core.config import load_pipeline_config
from gigapath_core.errors import ConfigError, ConfigErrors
from gigapath_core.validate import validate

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    env = {**os.environ, "GIGAPATH_PROGRESS": "0", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "gigapath_core.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_validate_quickstart_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = _cli("validate", str(ROOT / "examples" / "quickstart.yaml"), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan == {"job": "embed", "output": str(out), "inputs": "1 slide (first: CMU-1-Small-Region)",
                    "stages": ["tiler otsu", "tile_encoder dinov2-vits14 (weights: random)",
                               "slide_encoder prov-gigapath {in_chans: 384} (weights: random)"]}
    assert not out.exists()  # nothing written
    assert list(tmp_path.iterdir()) == []


def test_validate_reports_every_error_with_did_you_mean(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("input: {slides: [a.svs]}\ntile_encoder: {name: dinov2-vits14, batchsize: 3}\n"
                   "device: gpu\n")
    proc = _cli("validate", str(cfg), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines == ["gigapath: error: device: Value error, expected auto, cpu, cuda, cuda:N (N a device index) or "
                     "mps (got 'gpu')",
                     "gigapath: error: tile_encoder.batchsize: unknown key; did you mean 'batch_size'?",
                     "gigapath: error: input: unknown key; did you mean 'inputs'?"]  # 'inputs: Field required' folded
    assert not (tmp_path / "out").exists()


def test_stage_errors_are_collected_and_names_get_suggestions(example_slide, tmp_path):
    raw = {"inputs": {"slides": [str(example_slide)]}, "readers": ["openslid"],
           "tiler": {"name": "otsu", "params": {"tile_sise": 256}},
           "tile_encoder": {"name": "dinov2-vits41", "weights": "random"}}
    with pytest.raises(ConfigErrors) as info:
        load_pipeline_config(raw, tmp_path, str(tmp_path / "out"))
    msgs = [str(e) for e in info.value.errors]
    assert len(msgs) == 3
    assert msgs[0].startswith("readers[0]: unknown slide reader 'openslid'") and msgs[0].endswith(
        "did you mean 'openslide'?")
    assert msgs[1].startswith("tiler.params.tile_sise: unknown parameter for tiler 'otsu'") and msgs[1].endswith(
        "did you mean 'tile_size'?")
    assert msgs[2].startswith("tile_encoder.name: unknown plugin or preset 'dinov2-vits41'") and msgs[2].endswith(
        "did you mean 'dinov2-vits14'?")


def test_unknown_job_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"^job: unknown job 'finetun'; valid choices: .*did you mean 'finetune'\?$"):
        validate({"job": "finetun"})


def test_save_tile_png_needs_a_tile_encoder(example_slide, tmp_path):
    raw = {"inputs": {"slides": [str(example_slide)]}, "save_tile_png": True}
    with pytest.raises(ConfigError, match=r"^save_tile_png: writes the tiles the tile encoder reads"):
        load_pipeline_config(raw, tmp_path, str(tmp_path / "out"))


def test_validate_other_jobs(tmp_path):
    from test_finetune import make_cohort

    make_cohort(tmp_path, n_patients=5)  # 9 slides, the largest of each patient's used
    raw = {"job": "finetune", "data": {"embeddings": [str(tmp_path / "emb")], "labels": str(tmp_path / "labels.csv"),
                                       "task": "binary", "label_columns": ["label"]},
           "folds": {"k": 2}, "model": {"slide_encoder": None, "head": {"name": "abmil"}}}
    plan = validate(raw, out=str(tmp_path / "ft"))
    assert plan["job"] == "finetune" and plan["inputs"].startswith(
        f"9 labelled rows in {tmp_path / 'labels.csv'} (5 slides used); embeddings")
    assert plan["stages"] == ["head abmil", "2 folds"] and not (tmp_path / "ft").exists()
    # 5 folds of 3 + 2 patients cannot be stratified: the run's error (it was a traceback), not "config OK"
    with pytest.raises(ConfigError, match=r"^folds.k: 5 label-stratified parts need at least 5 slides"):
        validate({**raw, "folds": {"k": 5}}, out=str(tmp_path / "ft"))
    # labelled slides without tile embeddings: the run's own error, not "config OK"
    (tmp_path / "labels.csv").write_text("slide_id,patient_id,label\na,p1,neg\nb,p2,pos\n")
    with pytest.raises(ConfigError, match=r"^data.embeddings: no tile features of a "):
        validate(raw, out=str(tmp_path / "ft"))


def test_cli_logging_silences_pyvips_info():
    from gigapath_core.cli import _setup_logging

    _setup_logging(False)
    assert logging.getLogger("pyvips").getEffectiveLevel() == logging.WARNING


def test_tiatoolbox_reader_opens_without_resource_warning(example_slide):
    pytest.importorskip("tiatoolbox")
    code = ("from gigapath_plugins.readers.tiatoolbox import TiatoolboxWSI as W; "
            f"w = W({str(example_slide)!r}); print(w.level_dimensions[0])")
    proc = subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", code],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ResourceWarning" not in proc.stderr and proc.stdout.strip() == "(2220, 2967)"


@pytest.mark.parametrize("sub", ["", "sub"])
def test_an_output_path_through_a_file_is_refused_by_validate_as_by_run(tmp_path, sub):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out = afile / sub if sub else afile
    proc = _cli("validate", str(ROOT / "examples" / "quickstart.yaml"), "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"gigapath: error: output: {afile} exists and is not a folder"
    assert afile.read_text() == "not a folder"


@pytest.mark.parametrize("verbose", [False, True])
def test_library_log_lines_stay_off_the_console_unless_verbose(verbose):
    code = ("import logging, sys; from gigapath_core.cli import _setup_logging; _setup_logging(sys.argv[1] == '1'); "
            "logging.getLogger('tifffile').error('<tifffile.TiffPages @1275950> invalid page offset 1474362'); "
            "logging.getLogger('pyvips').warning('VIPS: bad number, line 1, column 3'); "
            "logging.getLogger('gigapath_core.pipeline').warning('slide x failed: truncated')")
    env = {**os.environ, "GIGAPATH_PROGRESS": "0", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", code, "1" if verbose else "0"], capture_output=True, text=True,
                          env=env, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "WARNING  slide x failed: truncated" in out  # the project's own lines are untouched
    if verbose:  # labelled with the library, demoted to DEBUG
        assert "DEBUG    tifffile: <tifffile.TiffPages @1275950> invalid page offset 1474362" in out
        assert "DEBUG    pyvips: VIPS: bad number, line 1, column 3" in out
        assert "ERROR" not in out
    else:
        assert "invalid page offset" not in out and "bad number" not in out


@pytest.mark.parametrize("argv, verbose", [
    (["validate", "x.yaml", "-v"], True),
    (["validate", "x.yaml", "--verbose"], True),
    (["-v", "validate", "x.yaml"], True),  # before the command still works, and is not reset by the subcommand
    (["validate", "x.yaml"], False),
    (["reports", "clean", "x.yaml", "-v"], True),  # a nested command too
    (["doctor", "-v"], True),
])
def test_verbose_is_accepted_after_the_command(argv, verbose):
    from gigapath_core.cli import _parse

    assert _parse(argv).verbose is verbose


def test_set_with_a_space_instead_of_equals_says_the_form(capsys):
    from gigapath_core.cli import _parse

    with pytest.raises(SystemExit) as exit_:
        _parse(["validate", "x.yaml", "--set", "tiler.params.min_occupancy", "0.2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "gigapath: error: unrecognized arguments: 0.2 (--set takes KEY.PATH=VALUE in one word: "
        "--set tiler.params.min_occupancy=0.2, not --set tiler.params.min_occupancy 0.2)")


def test_pool_workers_keep_library_log_lines_off_the_console():
    code = ("import logging; from gigapath_core.executors.local import _init_worker; import os; "
            "_init_worker(1, os.getppid()); "
            "logging.getLogger('tifffile').error('invalid page offset 1474362'); "
            "logging.getLogger('gigapath').warning('own line')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["own line"]  # Python's last-resort handler still prints our own lines
