"""Slide inputs (gigapath_core/slide_inputs.py): every bad manifest row reported at once, one slide file never
processed under two ids, exact repeats dropped."""

from __future__ import annotations

import os

import pytest

from gigapath_core.config import InputsConfig, collect_slides
from gigapath_core.errors import ConfigError, ConfigErrors
from gigapath_core.slide_inputs import MAX_PROBLEMS_SHOWN

from faults_helpers import copy_slide, run_cli, tree


def test_every_bad_manifest_row_is_reported_at_once_exit_2(tmp_path):
    copy_slide(tmp_path / "a.svs")
    (tmp_path / "list.csv").write_text("slide_path,slide_id,slide_mpp\n"
                                       "a.svs,ok,\n"          # row 2: fine
                                       "missing.svs,m1,\n"    # row 3: no such file
                                       "a.svs,../bad,\n"      # row 4: unsafe id
                                       "a.svs,x,abc\n"        # row 5: mpp not a number
                                       ",empty,\n"            # row 6: no path
                                       "gone.svs,y,zz\n")     # row 7: two bad cells
    (tmp_path / "c.yaml").write_text("inputs: {manifest: list.csv}\noutput: out\ntiler: {name: otsu}\n")
    before = tree(tmp_path)
    proc = run_cli("validate", str(tmp_path / "c.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gigapath: error: inputs.manifest[row 3].slide_path: slide not found: {tmp_path}/missing.svs",
        "gigapath: error: inputs.manifest[row 4].slide_id: slide_id '../bad' contains a path separator ('/' or '\\'); "
        "it must be a single folder name; see docs/promises.md (slide id rules)",
        "gigapath: error: inputs.manifest[row 5].slide_mpp: not a number: 'abc'",
        "gigapath: error: inputs.manifest[row 6].slide_path: empty",
        f"gigapath: error: inputs.manifest[row 7].slide_path: slide not found: {tmp_path}/gone.svs",
        "gigapath: error: inputs.manifest[row 7].slide_mpp: not a number: 'zz'",
    ]
    assert tree(tmp_path) == before


def test_a_long_list_of_bad_rows_is_cut_with_a_count(tmp_path):
    n = MAX_PROBLEMS_SHOWN + 7
    (tmp_path / "list.csv").write_text("slide_path\n" + "".join(f"m{i}.svs\n" for i in range(n)))
    with pytest.raises(ConfigErrors) as err:
        collect_slides(InputsConfig(manifest=str(tmp_path / "list.csv")), tmp_path)
    lines = str(err.value).splitlines()
    assert len(lines) == MAX_PROBLEMS_SHOWN + 1
    assert lines[0] == f"inputs.manifest[row 2].slide_path: slide not found: {tmp_path}/m0.svs"
    assert lines[-1] == f"inputs: 7 more problems not shown ({n} in all)"


def test_one_slide_file_under_two_ids_is_refused_naming_both(tmp_path):
    a = copy_slide(tmp_path / "a.svs")
    (tmp_path / "list.csv").write_text("slide_path,slide_id\na.svs,other\n")
    inputs = InputsConfig(slides=[str(tmp_path / "*.svs")], manifest=str(tmp_path / "list.csv"))
    with pytest.raises(ConfigError) as err:
        collect_slides(inputs, tmp_path)
    assert str(err.value) == (f"inputs.manifest[row 2]: {a} is already listed as slide 'a' (inputs.slides[0]); one "
                              f"slide file under two slide_ids ('a' and 'other') would be embedded twice: list it once")


def test_a_hard_link_is_the_same_slide_file(tmp_path):
    a = copy_slide(tmp_path / "a.svs")
    os.link(a, tmp_path / "b.svs")
    with pytest.raises(ConfigError, match=r"^inputs\.slides\[0\]: .*b\.svs is already listed as slide 'a' "
                                          r"\(inputs\.slides\[0\]\); one slide file under two slide_ids "
                                          r"\('a' and 'b'\)"):
        collect_slides(InputsConfig(slides=[str(tmp_path / "*.svs")]), tmp_path)


def test_an_exact_repeat_is_dropped_and_different_settings_are_refused(tmp_path):
    a = copy_slide(tmp_path / "a.svs")
    (tmp_path / "same.csv").write_text("slide_path,slide_id\na.svs,a\n")
    inputs = InputsConfig(slides=[str(a), str(tmp_path / "*.svs")], manifest=str(tmp_path / "same.csv"))
    slides = collect_slides(inputs, tmp_path)
    assert [(s.slide_id, s.path, s.mpp) for s in slides] == [("a", str(a), None)]
    (tmp_path / "mpp.csv").write_text("slide_path,slide_id,slide_mpp\na.svs,a,0.25\n")
    with pytest.raises(ConfigError, match=r"^inputs\.manifest\[row 2\]: slide 'a' .* is listed twice with different "
                                          r"settings: slide_mpp None mask None \(inputs\.slides\[0\]\) vs slide_mpp "
                                          r"0\.25 mask None: list it once$"):
        collect_slides(InputsConfig(slides=[str(a)], manifest=str(tmp_path / "mpp.csv")), tmp_path)
