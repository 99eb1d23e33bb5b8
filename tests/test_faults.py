"""The standing fault suite (issue #11): bad slide files, traversal slide ids, a slide folder that cannot be
written, changed inputs and deleted outputs after success, a full file system, our outputs inside the input
glob, symlink loops. Each test asserts the exact status and message, that nothing outside the output folder
changed, and that finished work is not redone. Tiling-only runs on copies of the bundled slide keep it fast.

Two runs on one output folder: tests/test_crash_safety.py::test_two_runs_on_one_folder_process_each_slide_once.
Hostile configs (YAML bombs, bounds, paths): tests/test_hostile_configs.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import gigapath_core as gp
from gigapath_core.config import SlideInput, load_pipeline_config
from gigapath_core.errors import ConfigError
from gigapath_core.markers import input_identity, stale_reason
from gigapath_core.pipeline import process_slide
from gigapath_core.store import read_status

from faults_helpers import (
    SLIDE, can_mount_tmpfs, copy_slide, fill, manifest, run_cli, small_tmpfs, stamps, tiler_only, tree,
)


# ------------------------------------------------------------------------------------------- bad files
def test_bad_slide_files_fail_alone_and_a_non_ascii_path_works(tmp_path):
    slides = tmp_path / "slides"
    good = copy_slide(slides / "tëst_スライド.svs")
    data = SLIDE.read_bytes()
    (slides / "truncated.svs").write_bytes(data[: len(data) // 3])
    (slides / "wrong_magic.svs").write_bytes(b"GIF89a" + data[6:4096])
    (slides / "empty.svs").write_bytes(b"")
    out = tmp_path / "out"
    before = tree(tmp_path, exclude=out)
    assert gp.run(tiler_only(slides / "*.svs"), out=str(out)) == 1
    rows = manifest(out)
    assert rows["tëst_スライド"]["status"] == "ok" and int(rows["tëst_スライド"]["n_tiles"]) > 0
    assert rows["tëst_スライド"]["slide_path"] == str(good)
    not_a_slide = "no reader could open it — openslide: not a slide format OpenSlide recognises"
    truncated = ("no reader could open it — file truncated? (the TIFF points past its end: offset 1,275,950 > size "
                 f"{len(data) // 3:,}); openslide: not a slide format OpenSlide recognises")
    for sid, reason in (("wrong_magic", not_a_slide), ("truncated", truncated), ("empty", "empty file (0 bytes)")):
        assert (rows[sid]["status"], rows[sid]["error_type"]) == ("failed", "SlideOpenError"), rows[sid]
        assert rows[sid]["reason"] == f"{slides / sid}.svs: {reason}"
    assert tree(tmp_path, exclude=out) == before  # nothing outside OUT changed
    done = stamps(out / "tëst_スライド")
    assert gp.run(tiler_only(slides / "*.svs"), out=str(out)) == 1
    assert manifest(out)["tëst_スライド"]["this_run"] == "skipped"
    assert stamps(out / "tëst_スライド") == done  # finished work not redone


# ------------------------------------------------------------------------------------- traversal ids
@pytest.mark.parametrize("slide_id, message", [
    ("../x", r"'\.\./x' contains a path separator"),
    ("/tmp/gigapath-abs", r"'/tmp/gigapath-abs' contains a path separator"),
    (".", r"'\.' is not a folder name"),
    ("..", r"'\.\.' is not a folder name"),
    (".hidden", r"'\.hidden' starts with '\.'"),
    ("a\\b", r"contains a path separator"),
    ("manifest.csv", r"is a file name gigapath writes in the output folder"),
    (" padded", r"leading or trailing whitespace"),
    ("x" * 201, r"longer than 200 bytes"),
])
def test_unsafe_manifest_slide_ids_are_refused_before_any_work(slide_id, message, tmp_path):
    copy_slide(tmp_path / "in" / "a.svs")
    (tmp_path / "in" / "list.csv").write_text(f"slide_path,slide_id\na.svs,ok_one\na.svs,{slide_id}\n")
    out = tmp_path / "work" / "out"
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match=rf"^inputs\.manifest\[row 3\]\.slide_id: slide_id .*{message}"):
        gp.run({"inputs": {"manifest": str(tmp_path / "in" / "list.csv")}}, out=str(out))
    assert tree(tmp_path) == before  # not even OUT was created


def test_traversal_id_exits_2_with_one_line(tmp_path):
    copy_slide(tmp_path / "a.svs")
    (tmp_path / "list.csv").write_text("slide_path,slide_id\na.svs,../escaped\n")
    (tmp_path / "c.yaml").write_text("inputs: {manifest: list.csv}\noutput: out\n")
    before = tree(tmp_path)
    proc = run_cli("run", str(tmp_path / "c.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gigapath: error: inputs.manifest[row 2].slide_id: slide_id '../escaped' contains a path separator ('/' or "
        "'\\'); it must be a single folder name; see docs/promises.md (slide id rules)"]
    assert tree(tmp_path) == before


def test_unsafe_id_from_a_file_name_names_the_pattern_and_the_way_out(tmp_path):
    copy_slide(tmp_path / "in" / " padded.svs")
    with pytest.raises(ConfigError) as err:
        gp.run(tiler_only(tmp_path / "in" / "*.svs"), out=str(tmp_path / "out"))
    assert str(err.value) == ("inputs.slides[0]: slide_id ' padded' has leading or trailing whitespace (from the file "
                              "name ' padded.svs'; rename it, or give a slide_id in inputs.manifest); see "
                              "docs/promises.md (slide id rules)")
    assert not (tmp_path / "out").exists()


def test_ids_that_differ_only_in_case_are_one_folder(tmp_path):
    copy_slide(tmp_path / "a.svs")
    copy_slide(tmp_path / "b.svs")
    (tmp_path / "list.csv").write_text("slide_path,slide_id\na.svs,Slide1\nb.svs,slide1\n")
    with pytest.raises(ConfigError, match=r"^inputs\.manifest\[row 3\]: slide_ids 'Slide1' .* and 'slide1' .* "
                                          r"differ only in letter case"):
        gp.run({"inputs": {"manifest": str(tmp_path / "list.csv")}}, out=str(tmp_path / "out"))


def test_process_slide_keeps_unsafe_ids_and_planted_symlinks_inside_out(tmp_path):
    """Defence in depth for API callers that build SlideInputs themselves."""
    slide = copy_slide(tmp_path / "a.svs")
    out = tmp_path / "out"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cfg, _ = load_pipeline_config(tiler_only(slide), tmp_path, str(out))
    out.mkdir()
    (out / "planted").symlink_to(outside, target_is_directory=True)
    before = tree(tmp_path, exclude=out)
    row = process_slide(cfg, SlideInput(slide_id="../elsewhere", path=str(slide)))
    assert (row["status"], row["error_type"]) == ("failed", "SlideError")
    assert "contains a path separator" in row["reason"]
    row = process_slide(cfg, SlideInput(slide_id="planted", path=str(slide)))
    assert (row["status"], row["error_type"]) == ("failed", "SlideError")
    assert f"resolves to {outside}, outside the output folder" in row["reason"]
    assert tree(tmp_path, exclude=out) == before and not any(outside.iterdir())


# ---------------------------------------------------------------- one slide's filesystem error, the batch
def test_status_json_that_is_a_folder_fails_that_slide_only(tmp_path):
    slides = [copy_slide(tmp_path / "in" / f"s{i}.svs") for i in range(3)]
    out = tmp_path / "out"
    (out / "s1" / "status.json").mkdir(parents=True)
    before = tree(tmp_path, exclude=out)
    assert gp.run(tiler_only(*slides), out=str(out)) == 1
    rows = manifest(out)
    assert [rows[f"s{i}"]["status"] for i in range(3)] == ["ok", "failed", "ok"]
    assert rows["s1"]["error_type"] == "IsADirectoryError"
    assert rows["s1"]["reason"].startswith(f"{out / 's1'}: could not clear old outputs: IsADirectoryError: ")
    assert "and the status marker could not be written either: IsADirectoryError" in rows["s1"]["reason"]
    assert tree(tmp_path, exclude=out) == before
    done = {s: stamps(out / s) for s in ("s0", "s2")}
    (out / "s1" / "status.json").rmdir()  # the user fixes it: only s1 is done now
    assert gp.run(tiler_only(*slides), out=str(out)) == 0
    rows = manifest(out)
    assert [rows[f"s{i}"]["this_run"] for i in range(3)] == ["skipped", "processed", "skipped"]
    assert {s: stamps(out / s) for s in ("s0", "s2")} == done


# --------------------------------------------------------------------------------- honest markers
def test_slide_replaced_after_success_is_redone_with_the_reason(tmp_path):
    a, b = copy_slide(tmp_path / "in" / "a.svs"), copy_slide(tmp_path / "in" / "b.svs")
    out = tmp_path / "out"
    assert gp.run(tiler_only(a, b), out=str(out)) == 0
    done_b = stamps(out / "b")
    size = a.stat().st_size
    with open(a, "ab") as f:  # a re-export at the same path: still a valid slide, different bytes
        f.write(b"\0" * 1000)
    assert gp.run(tiler_only(a, b), out=str(out)) == 0
    rows = manifest(out)
    assert rows["a"]["status"] == "ok"
    assert rows["a"]["reason"] == f"redone: slide file changed since the last run (size {size} -> {size + 1000} bytes)"
    assert rows["b"]["this_run"] == "skipped" and stamps(out / "b") == done_b
    assert read_status(out / "a")["input"]["size"] == size + 1000
    assert gp.run(tiler_only(a, b), out=str(out)) == 0
    assert manifest(out)["a"]["this_run"] == "skipped"  # and now it is done for the new file


def test_output_deleted_after_success_is_redone_with_the_reason(tmp_path):
    a, b = copy_slide(tmp_path / "in" / "a.svs"), copy_slide(tmp_path / "in" / "b.svs")
    out = tmp_path / "out"
    assert gp.run(tiler_only(a, b), out=str(out)) == 0
    done_b = stamps(out / "b")
    (out / "a" / "tiles.h5").unlink()
    assert gp.run(tiler_only(a, b), out=str(out)) == 0
    rows = manifest(out)
    assert (rows["a"]["status"], rows["a"]["reason"]) == ("ok", "redone: output tiles.h5 is missing since the last run")
    assert (out / "a" / "tiles.h5").is_file()
    assert rows["b"]["this_run"] == "skipped" and stamps(out / "b") == done_b


def test_marker_checks_size_mtime_and_the_end_hashes(tmp_path):
    slide = tmp_path / "s.bin"
    slide.write_bytes(os.urandom(3 << 20))  # 3 MiB: head, an unhashed middle, tail
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "tiles.h5").write_bytes(b"x" * 10)
    ident = input_identity(slide)
    marker = {"status": "ok", "input": ident, "outputs": {"tiles.h5": 10}}
    assert stale_reason(marker, input_identity(slide), tmp_path / "o") is None
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert stale_reason(marker, input_identity(slide), tmp_path / "o").endswith("(modification time differs)")
    last = slide.read_bytes()[-1]
    with open(slide, "r+b") as f:  # same size, last byte changed, mtime put back
        f.seek(-1, 2)
        f.write(bytes([last ^ 0xFF]))
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stale_reason(marker, input_identity(slide), tmp_path / "o").endswith("(its first/last MiB differ)")
    (tmp_path / "o" / "tiles.h5").write_bytes(b"x" * 11)
    assert stale_reason({**marker, "input": input_identity(slide)}, input_identity(slide), tmp_path / "o") == \
        "redone: output tiles.h5 changed size since the last run (10 -> 11 bytes)"
    assert "older gigapath" in stale_reason({"status": "ok"}, ident, tmp_path / "o")


# -------------------------------------------------------------------------------- full file system
def _skip_without_tmpfs(tmp_path: Path) -> None:
    why = can_mount_tmpfs(tmp_path)
    if why:
        pytest.skip(why)


def test_full_disk_at_start_is_one_line_and_exit_2(tmp_path):
    _skip_without_tmpfs(tmp_path)
    slide = copy_slide(tmp_path / "in" / "a.svs")
    with small_tmpfs(tmp_path / "mnt") as mnt:
        fill(mnt, leave=0)
        proc = run_cli("run", "--out", str(mnt / "out"), str(_yaml(tmp_path, tiler_only(slide))))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"gigapath: error: output: cannot write to the output folder "
                                                       f"{mnt / 'out'}"), lines
        assert lines[0].endswith("No space left on device")


def test_full_disk_mid_run_fails_the_slide_and_the_next_run_redoes_it(tmp_path):
    _skip_without_tmpfs(tmp_path)
    slide = copy_slide(tmp_path / "in" / "a.svs")
    with small_tmpfs(tmp_path / "mnt") as mnt:
        out = mnt / "out"
        filler = fill(mnt, leave=200_000)  # room for the manifest and markers, not for a 1 MB thumbnail
        before = tree(tmp_path, exclude=mnt)
        assert gp.run(tiler_only(slide), out=str(out)) == 1
        row = manifest(out)["a"]
        assert (row["status"], row["error_type"]) == ("failed", "OSError"), row
        assert "No space left on device" in row["reason"]
        assert not list(out.rglob(".gigapath-tmp-*"))  # the partial file was removed
        assert tree(tmp_path, exclude=mnt) == before
        filler.unlink()
        assert gp.run(tiler_only(slide), out=str(out)) == 0
        assert manifest(out)["a"]["status"] == "ok"


def _yaml(folder: Path, cfg: dict) -> Path:
    import yaml

    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


# --------------------------------------------------------------------- our outputs inside the input glob
def test_output_folder_inside_the_input_glob_is_never_read_as_slides(tmp_path, caplog):
    data = tmp_path / "data"
    copy_slide(data / "a.svs")
    out = data / "out"
    cfg = tiler_only(data / "**" / "*", readers=["openslide", "pyvips"])  # pyvips would open thumbnail.png
    assert gp.run(cfg, out=str(out)) == 0
    done = stamps(out / "a")
    with caplog.at_level("WARNING", logger="gigapath"):
        assert gp.run(cfg, out=str(out)) == 0
    assert list(manifest(out)) == ["a"] and manifest(out)["a"]["this_run"] == "skipped"
    assert stamps(out / "a") == done
    assert any("inputs.slides[0]: left out" in r.getMessage() and str(out) in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"^inputs\.slides\[0\]: .*thumbnail\.png is inside the output folder"):
        gp.run(tiler_only(out / "a" / "thumbnail.png"), out=str(out))
    with pytest.raises(ConfigError, match=rf"^inputs\.slides\[0\]: every file matching '\*\.svs' \(in {data}\) is "
                                          rf"inside the output folder {tmp_path}; .*choose an output folder"):
        gp.run(tiler_only(data / "*.svs"), out=str(tmp_path))  # OUT holds the slides' folder


# ---------------------------------------------------------------------------------------- symlink loops
def test_symlink_loop_named_is_a_config_error_and_found_by_a_glob_fails_that_slide(tmp_path):
    slides = tmp_path / "in"
    copy_slide(slides / "a.svs")
    (slides / "loop.svs").symlink_to(slides / "loop.svs")
    with pytest.raises(ConfigError, match=rf"^inputs\.slides\[0\]: cannot read {slides / 'loop.svs'}: a symlink loop$"):
        gp.run(tiler_only(slides / "loop.svs"), out=str(tmp_path / "o1"))
    out = tmp_path / "o2"
    assert gp.run(tiler_only(slides / "*.svs"), out=str(out)) == 1
    rows = manifest(out)
    assert rows["a"]["status"] == "ok"
    assert (rows["loop"]["status"], rows["loop"]["error_type"]) == ("failed", "SlideOpenError")
    assert rows["loop"]["reason"] == f"{slides / 'loop.svs'}: cannot read the file: Too many levels of symbolic links"


def test_slide_deleted_after_listing_fails_alone(tmp_path):
    a, b = copy_slide(tmp_path / "a.svs"), copy_slide(tmp_path / "b.svs")
    cfg, slides = load_pipeline_config(tiler_only(a, b), tmp_path, str(tmp_path / "out"))
    b.unlink()
    rows = [process_slide(cfg, s) for s in slides]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[1]["reason"] == f"{b}: cannot read the file: No such file or directory"
