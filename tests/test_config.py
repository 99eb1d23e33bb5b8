"""Strict config validation: one-line errors with the key path, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import gigapath_core as gp
from gigapath_core.config import apply_overrides, load_raw
from gigapath_core.errors import ConfigError


def _config(slide: Path, **extra) -> dict:
    cfg = {"inputs": {"slides": [str(slide)]}, "readers": ["openslide"],
           "tile_encoder": {"name": "dinov2-vits14", "weights": "random"}}
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(tilr={"name": "otsu"}), r"^tilr: unknown key; did you mean 'tiler'\?$"),
        (lambda c: c["tile_encoder"].update(nme="x"), r"^tile_encoder\.nme: unknown key; did you mean 'name'\?$"),
        (lambda c: c["tile_encoder"].update(name="vit-huge-typo"),
         r"^tile_encoder\.name: unknown plugin or preset 'vit-huge-typo'; valid choices: .*dinov2-vits14"),
        (lambda c: c["tile_encoder"].update(batch_size="many"),
         r"^tile_encoder\.batch_size: Input should be a valid integer.*'many'"),
        (lambda c: c["tile_encoder"].update(params={"img_size": "big"}),
         r"^tile_encoder\.params\.img_size: Input should be a valid integer"),
        (lambda c: c.update(device="gpu0"), r"^device: Value error, expected auto, cpu, cuda"),
        (lambda c: c["inputs"].update(slides=["/nonexistent/slide.svs"]),
         r"^inputs\.slides\[0\]: slide not found: /nonexistent/slide\.svs$"),
        (lambda c: c["inputs"].update(slides=["/nonexistent/*.svs"]), r"^inputs\.slides\[0\]: no file matches"),
        (lambda c: c.update(readers=["openslide", "bioformats"]),
         r"^readers\[1\]: unknown slide reader 'bioformats'; valid choices: .*openslide"),
        (lambda c: c.update(slide_encoder={"name": "mean"}, tile_encoder=None),
         r"^slide_encoder: needs a tile_encoder stage \(or tile features given with inputs.features\)$"),
    ],
)
def test_bad_configs_fail_before_work_with_key_path(mutate, message, example_slide, tmp_path):
    cfg = _config(example_slide)
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        gp.run(cfg, out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing was written


def test_missing_output_folder(example_slide):
    with pytest.raises(ConfigError, match=r"^output: no output folder"):
        gp.run(_config(example_slide))


def test_dimension_mismatch_between_encoders_is_a_config_error(example_slide, tmp_path):
    cfg = _config(example_slide, slide_encoder={"name": "mean", "params": {"in_dim": 1536}})
    with pytest.raises(ConfigError, match=r"^slide_encoder\.params\.in_dim: 1536 does not match the 384-d embeddings "
                                          r"of the tile encoder 'dinov2-vits14'"):
        gp.run(cfg, out=str(tmp_path))


def test_set_overrides_parse_yaml_values():
    raw = apply_overrides({"tile_encoder": {"name": "x"}}, ["tile_encoder.batch_size=8", "readers=[openslide]",
                                                            "inputs.mpp=0.25", "slide_encoder=null"])
    assert raw == {"tile_encoder": {"name": "x", "batch_size": 8}, "readers": ["openslide"], "inputs": {"mpp": 0.25},
                   "slide_encoder": None}
    with pytest.raises(ConfigError, match=r"^--set: expected key.path=value"):
        apply_overrides({}, ["novalue"])


def test_cli_prints_one_line_error_and_exits_2(example_slide, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_config(example_slide, tiler={"name": "otsu", "params": {"tile_size": "x"}})))
    proc = subprocess.run([sys.executable, "-m", "gigapath_core.cli", "run", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gigapath: error: tiler.params.tile_size: Input should be a valid integer, unable to parse string as an integer"
        " (got 'x')"
    ]


def test_relative_paths_resolve_against_the_config_file(example_slide, tmp_path):
    (tmp_path / "cfg").mkdir()
    link = tmp_path / "cfg" / "slides"
    link.mkdir()
    (link / "a.svs").symlink_to(example_slide)
    path = tmp_path / "cfg" / "c.yaml"
    path.write_text(yaml.safe_dump({**_config(example_slide), "inputs": {"slides": ["slides/*.svs"]}, "output": "out",
                                    "tile_encoder": None}))
    assert gp.run(path) == 0
    assert (tmp_path / "cfg" / "out" / "a" / "tiles.h5").is_file()


def test_loader_workers_auto_is_zero_on_cpu_and_explicit_values_win():
    import os

    import torch

    from gigapath_core.pipeline import loader_workers

    assert loader_workers("auto", torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3
    assert loader_workers("auto", torch.device("cuda")) == max(0, min(8, (os.cpu_count() or 1) - 1))


def test_negative_workers_rejected(example_slide, tmp_path):
    cfg = _config(example_slide)
    cfg["tile_encoder"]["num_workers"] = -1
    with pytest.raises(ConfigError, match=r"^tile_encoder\.num_workers: Value error, must be >= 0 or 'auto'"):
        gp.run(cfg, out=str(tmp_path))


@pytest.mark.parametrize("text, where, problem", [
    ("inputs:\n  slides: [a.svs,\nreaders: x\n", ":4:1", "expected ',' or ']', but got '<stream end>'"),
    ("inputs:\n\tslides: []\n", ":2:1", "found character '\\t' that cannot start any token"),
])
def test_yaml_syntax_errors_name_line_column_and_problem(tmp_path, text, where, problem):
    from gigapath_core.reports.prompt import load_exemplars

    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_raw(path)
    assert str(err.value) == f"{path}{where} is not valid YAML: {problem}"
    with pytest.raises(ConfigError) as err:  # the report-cleaning exemplars file says the same
        load_exemplars(path)
    assert str(err.value).endswith(f"{path}{where} is not valid YAML: {problem}")


def test_a_glob_leaves_out_non_slide_files_with_one_warning(tmp_path, caplog):
    from gigapath_core.config import InputsConfig, collect_slides

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.svs", "b.ome.tif", "README.md", "reports.csv", "notes.TXT", "photo.png"):
        (data / name).write_bytes(b"x")
    (tmp_path / "list.csv").write_text("slide_path\ndata/reports.csv\n")
    inputs = InputsConfig(slides=["data/*", "data/README.md"], manifest="list.csv")
    with caplog.at_level("WARNING", logger="gigapath"):
        slides = collect_slides(inputs, tmp_path)
    # the glob keeps slides and images (pyvips reads them); a named path and a manifest row are never left out
    assert [s.slide_id for s in slides] == ["a", "b", "photo", "README", "reports"]
    assert [r.getMessage() for r in caplog.records] == [
        "inputs.slides[0]: left out 3 file(s) that are not slides (.csv, .md, .txt): README.md, notes.TXT, reports.csv"]
    with pytest.raises(ConfigError, match=r"^inputs\.slides\[0\]: no slide file matches '\*\.md' \(looked in .*data\); "
                                          r"left out 1 file\(s\) that are not slides \(\.md\): README\.md$"):
        collect_slides(InputsConfig(slides=["data/*.md"]), tmp_path)


@pytest.mark.parametrize("override, message", [
    ("tiler.params.min_occupancy=2", "tiler.params.min_occupancy: Input should be less than or equal to 1 (got 2)"),
    ("tile_encoder.batch_size=sixteen", "tile_encoder.batch_size: Input should be a valid integer (got 'sixteen')"),
])
def test_out_of_range_values_are_shown_in_the_message(example_slide, tmp_path, override, message):
    from gigapath_core.validate import validate

    with pytest.raises(ConfigError) as err:
        validate(_config(example_slide, tiler={"name": "otsu"}), out=str(tmp_path / "out"), sets=[override])
    assert str(err.value) == message
