"""Hostile and mistaken configs (issue #11): YAML alias bombs, huge offending values, unbounded or float
integers, bad device strings, a config path that is a folder, relative weights paths. Each is one clear
``ConfigError`` line (exit 2 from the CLI) before any work, in bounded time and memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

import gigapath_core as gp
from gigapath_core.config import apply_overrides, load_pipeline_config, load_raw
from gigapath_core.errors import ConfigError
from gigapath_core.pipeline import resolve_device

from faults_helpers import SLIDE, alias_bomb, run_cli, run_cli_rusage, tiler_only, tree

BOMB_MSG = r"refused: the YAML expands to more than 100,000 nodes through aliases \(&anchor / \*alias\)"


@pytest.mark.parametrize("levels", [9, 10, 20])
def test_alias_bombs_are_refused_at_once(levels, tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^{path}: {BOMB_MSG}; see docs/promises\.md \(limits\)$"):
        load_raw(path)
    assert time.perf_counter() - t0 < 1.0


def test_alias_bomb_from_the_cli_exits_2_in_seconds_with_small_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(10))
    before = tree(tmp_path)
    t0 = time.perf_counter()
    code, stderr, peak_kib = run_cli_rusage("run", str(path), "--out", str(tmp_path / "out"), timeout=60)
    elapsed = time.perf_counter() - t0
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"gigapath: error: {path}: refused: the YAML expands to more than 100,000 nodes through aliases "
        f"(&anchor / *alias); see docs/promises.md (limits)"]
    assert elapsed < 30
    assert peak_kib < 1_000_000  # the 9-level bomb took 1.45 GB before the budget (the CLI's imports: ~0.5 GB)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("text, message", [
    ("a: &a [1, *a]\n", "has a recursive alias"),
    ("a: " + "[" * 100 + "]" * 100 + "\n", "nests deeper than 64 levels"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nests too deeply"),
])
def test_recursive_and_deep_yaml_is_refused(text, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: refused: the YAML {message}"):
        load_raw(path)


def test_set_overrides_have_the_same_budget():
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["*a"] * 9) + "]"
    assert len(apply_overrides({}, [f"x={bomb}"])["x"]) == 10  # small: fine
    nested = alias_bomb(7).split("batch_size:\n    ", 1)[1].replace("\n    ", ", ")
    with pytest.raises(ConfigError, match=rf"^--set x: {BOMB_MSG}"):
        apply_overrides({}, ["x={" + nested + "}"])


def test_a_huge_offending_value_is_shown_cut_to_200_characters(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(alias_bomb(5))  # 9**5 = 59,049 scalars: within the budget, far too long to print
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        gp.run(path, out=str(tmp_path / "out"))
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert msg.startswith("tile_encoder.batch_size: Input should be a valid integer (got {'a0': ['lol', ")
    assert len(msg) < 300 and msg.endswith(")")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- bounds
def _tiny(**tile_encoder) -> dict:
    return {**tiler_only(SLIDE), "tile_encoder": {"name": "dinov2-vits14", "weights": "random", **tile_encoder}}


@pytest.mark.parametrize("cfg, message", [
    (_tiny(batch_size=1e23), r"^tile_encoder\.batch_size: Input should be a valid integer \(got 1e\+23\)$"),
    (_tiny(batch_size=8.0), r"^tile_encoder\.batch_size: Input should be a valid integer \(got 8\.0\)$"),
    (_tiny(batch_size="8"), r"^tile_encoder\.batch_size: Input should be a valid integer \(got '8'\)$"),
    (_tiny(batch_size=10**6),
     r"^tile_encoder\.batch_size: Input should be less than or equal to 4096 \(got 1000000\)$"),
    (_tiny(batch_size=True), r"^tile_encoder\.batch_size: Input should be a valid integer \(got True\)$"),
    (_tiny(num_workers=10**4), r"^tile_encoder\.num_workers: Value error, must be <= 256 or 'auto'"),
    (_tiny(num_workers=2.0), r"^tile_encoder\.num_workers"),
    ({**tiler_only(SLIDE), "executor": {"params": {"workers": 1e23}}},
     r"^executor\.params\.workers: Input should be a valid integer \(got 1e\+23\)$"),
    ({**tiler_only(SLIDE), "device": "cuda:abc"},
     r"^device: Value error, expected auto, cpu, cuda, cuda:N \(N a device index\) or mps \(got 'cuda:abc'\)$"),
    ({**tiler_only(SLIDE), "device": "cuda:-1"}, r"^device: Value error, expected auto, cpu, cuda, cuda:N"),
])
def test_bad_values_are_one_line_before_any_work(cfg, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        gp.run(cfg, out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_cuda_index_torch_does_not_have_is_a_config_error():
    import torch

    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=r"^device: 'cuda:99' ") as err:
        resolve_device("cuda:99")
    if n:
        assert f"torch sees {n} CUDA device(s)" in str(err.value)
    else:
        assert "torch sees no CUDA device" in str(err.value)


# ------------------------------------------------------------------------------------------ paths
def test_config_path_that_is_a_folder_is_one_line(tmp_path):
    proc = run_cli("run", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gigapath: error: config path is a folder, not a YAML file: {tmp_path}"]


def test_binary_config_file_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"is not a UTF-8 text file \(a YAML config was expected\)$"):
        load_raw(path)


def test_relative_weights_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "project"
    cfg_dir.mkdir()
    monkeypatch.chdir(tmp_path)  # the working directory is not the config's folder
    raw = {**tiler_only(SLIDE), "tile_encoder": {"name": "dinov2-vits14", "weights": ["w/model.safetensors", "random"]},
           "slide_encoder": {"name": "mean", "params": {"in_dim": 384}, "weights": "hf_hub:org/name"}}
    cfg, _ = load_pipeline_config(raw, cfg_dir, str(tmp_path / "out"))
    assert cfg.tile_encoder.weights == [str(cfg_dir / "w" / "model.safetensors"), "random"]
    assert cfg.slide_encoder.weights == "hf_hub:org/name"
    for kept in ("~/w.safetensors", "$GIGAPATH_WEIGHTS/x.safetensors", "/abs/w.safetensors", "random"):
        raw["tile_encoder"]["weights"] = kept
        assert load_pipeline_config(raw, cfg_dir, str(tmp_path / "out"))[0].tile_encoder.weights == kept


def test_relative_weights_path_in_a_yaml_file_loads_from_beside_it(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    enc = gp.build("tile_encoder", "dinov2_vit", weights="random", model_kwargs={"depth": 1})
    (tmp_path / "project").mkdir()
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()},
              str(tmp_path / "project" / "w.safetensors"))
    (tmp_path / "project" / "c.yaml").write_text(yaml.safe_dump({
        **tiler_only(SLIDE), "tile_encoder": {"name": "dinov2_vit", "weights": "w.safetensors", "num_workers": 0,
                                              "params": {"model_kwargs": {"depth": 1}}}}))
    monkeypatch.chdir(tmp_path)
    raw = load_raw(Path("project/c.yaml"))
    cfg, _ = load_pipeline_config(raw, (tmp_path / "project"), str(tmp_path / "out"))
    loaded = gp.build("tile_encoder", "dinov2_vit", weights=cfg.tile_encoder.weights, model_kwargs={"depth": 1})
    assert loaded.weights_source == str(tmp_path / "project" / "w.safetensors")


def test_an_output_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiler_only(SLIDE)))
    proc = run_cli("run", str(cfg), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gigapath: error: output: {tmp_path / 'out'} exists and is not a folder"]
    assert (tmp_path / "out").read_text() == "not a folder"


def test_cli_turns_any_other_os_error_into_one_line(monkeypatch, capsys):
    from gigapath_core import cli, jobs

    def boom(*a, **k):
        raise PermissionError(13, "Permission denied", "/data/registry.yaml")

    monkeypatch.setattr(jobs, "run", boom)
    assert cli.main(["run", "x.yaml"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gigapath: error: [Errno 13] Permission denied: '/data/registry.yaml' (run with -v for the traceback)"]


def test_registry_files_have_the_same_budget(tmp_path):
    reg = tmp_path / "registry.yaml"
    reg.write_text("presets:\n  x:\n    " + alias_bomb(9).split("batch_size:\n    ", 1)[1].replace("\n    ", "\n    "))
    with pytest.raises(ConfigError, match=rf"^registry: {reg}: {BOMB_MSG}"):
        gp.build("tile_encoder", "x", registry=[reg])
