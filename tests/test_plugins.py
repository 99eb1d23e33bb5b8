"""Plugin loading through entry points: bundled plugins, a third-party package, broken and duplicate plugins."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import gigapath_core as gp
from gigapath_core.errors import ConfigError, PluginNotFoundError
from gigapath_core.plugins import PluginManager, PluginWarning, reset

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = {("slide_reader", "openslide"), ("tiler", "otsu"), ("tile_encoder", "dinov2_vit"), ("slide_encoder", "mean")}


def test_bundled_plugins_come_from_the_plugins_distribution():
    rows = {(r["kind"], r["name"]): r for r in gp.list_plugins()}
    for key in BUNDLED:
        assert key in rows, key
        assert rows[key]["package"] == "gigapath-plugins"
        assert rows[key]["class"].startswith("gigapath_plugins.")


def test_core_never_imports_bundled_plugins_by_name():
    import re

    pattern = re.compile(r"^\s*(from|import)\s+gigapath_plugins|import_module\([\"']gigapath_plugins", re.M)
    offenders = [p for p in (ROOT / "gigapath_core").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_cli_plugins_json_lists_kind_and_package():
    out = subprocess.run([sys.executable, "-m", "gigapath_core.cli", "plugins", "--json"], capture_output=True,
                         text=True, check=True).stdout
    rows = json.loads(out)
    assert {(r["kind"], r["name"]) for r in rows} >= BUNDLED
    assert all(set(r) >= {"kind", "name", "package", "class"} for r in rows)


def _fake_distribution(root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    dist = root / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    eps = "[gigapath]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (dist / "entry_points.txt").write_text(eps)
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))


def test_broken_and_duplicate_plugins_warn_and_do_not_break_others(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "broken-gp-plugin", {"broken": "broken_gp_mod"},
                       {"broken_gp_mod": "import this_module_does_not_exist\n"})
    _fake_distribution(tmp_path, "dup-gp-plugin", {"dup": "dup_gp_mod"}, {"dup_gp_mod": """
        from gigapath_core import hookimpl
        from gigapath_core.kinds import Tiler

        class FakeOtsu(Tiler):
            name = "otsu"  # clashes with the bundled tiler
            def tile(self, wsi, mpp=None):
                raise NotImplementedError

        @hookimpl
        def gigapath_tilers():
            return [FakeOtsu]
    """})
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PluginManager()
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert any("'broken-gp-plugin'" in m and "ModuleNotFoundError" in m for m in messages), messages
    assert any("duplicate tiler plugin name 'otsu'" in m and "'dup-gp-plugin'" in m for m in messages), messages
    assert pm.get("tiler", "otsu").package == "gigapath-plugins"  # the first registration is kept
    assert pm.get("tile_encoder", "dinov2_vit").package == "gigapath-plugins"  # others unaffected


def test_unknown_names_list_choices():
    with pytest.raises(PluginNotFoundError, match=r"unknown plugin or preset 'nope'; valid choices: .*dinov2_vit"):
        gp.build("tile_encoder", "nope")
    with pytest.raises(PluginNotFoundError, match=r"unknown plugin kind 'encoder'; valid choices: slide_reader"):
        gp.build("encoder", "x")


def test_build_validates_params_with_key_path():
    with pytest.raises(ConfigError, match=r"^tiler\.params\.min_occupancy: Input should be less than or equal to 1"):
        gp.build("tiler", "otsu", min_occupancy=3)
    with pytest.raises(ConfigError, match=r"^tiler\.params\.colour: unknown parameter for tiler 'otsu'; valid: tile_size"):
        gp.build("tiler", "otsu", colour="red")


def test_build_preset_and_override():
    enc = gp.build("tile_encoder", "dinov2-vits14", weights="random", model_kwargs={"depth": 1})
    assert enc.embed_dim == 384 and enc.weights_source == "random"
    assert len(enc.model.blocks) == 1  # the override reached timm


@pytest.fixture
def third_party_installed():
    pkg = ROOT / "examples" / "third_party_plugin"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["install", "-q", "--no-deps", "--no-build-isolation", str(pkg)], check=True)
    reset()
    yield
    subprocess.run(pip + ["uninstall", "-q", "-y", "gigapath-histogram"], check=True)
    reset()


def test_third_party_plugin_is_listed_and_usable_in_a_config(third_party_installed, example_slide, tmp_path):
    rows = {(r["kind"], r["name"]): r for r in gp.list_plugins()}
    assert rows[("tile_encoder", "rgb_histogram")]["package"] == "gigapath-histogram"
    cli = subprocess.run([sys.executable, "-m", "gigapath_core.cli", "plugins", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert sum(r["name"] == "rgb_histogram" for r in json.loads(cli)) == 1
    config = {"inputs": {"slides": [str(example_slide)]}, "readers": ["openslide"],
              "tile_encoder": {"name": "rgb_histogram", "params": {"bins": 8}, "num_workers": 0},
              "slide_encoder": {"name": "mean", "params": {"in_dim": 24}}}
    assert gp.run(config, out=str(tmp_path)) == 0
    from gigapath_core.store import read_h5

    data, attrs = read_h5(tmp_path / "CMU-1-Small-Region" / "tile_embeddings.h5")
    assert data["features"].shape[1] == 24
    # each channel block of a histogram sums to one
    assert abs(data["features"].reshape(-1, 3, 8).sum(-1) - 1).max() < 1e-5
    assert attrs["tile_encoder"] == "rgb_histogram"


def test_plugin_descriptions_are_whole_first_sentences_without_rst_markup():
    from gigapath_core.kinds import Plugin

    class Wrapped(Plugin):
        """Reads ``x`` via :class:`~a.B` (e.g. SVS; Lu et al. 2021) and
        wraps. Second sentence. Ignored.

        Another paragraph."""

    class NoFullStop(Plugin):
        """One line without a full stop"""

    assert Wrapped.describe() == "Reads x via a.B (e.g. SVS; Lu et al. 2021) and wraps."
    assert NoFullStop.describe() == "One line without a full stop"
    rows = {r["name"]: r["description"] for r in gp.list_plugins("slide_reader")}
    assert rows["openslide-library"] == ("OpenSlide, every pixel through read_region (no direct JPEG decoding; for "
                                         "comparison or a file where the direct path misbehaves).")
    assert not any("`" in d or "\n" in d for d in rows.values())
