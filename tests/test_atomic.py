"""Folders written whole or not at all, and never a folder almost-ray did not write replaced or removed."""

from __future__ import annotations

import pytest

from almost_ray.cli import main
from almost_ray.data.atomic import (
    MARKER,
    NotOursError,
    atomic_directory,
    own_directory,
    remove_own_directory,
)


def test_a_folder_appears_whole_and_a_failed_one_leaves_the_previous_version(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "weights").write_text("v1")
    assert (out / "weights").read_text() == "v1" and (out / MARKER).is_file()
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "weights").write_text("v2")
        raise RuntimeError("killed halfway")
    assert (out / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind
    with atomic_directory(out) as tmp:  # ours: replaced
        (tmp / "weights").write_text("v3")
    assert (out / "weights").read_text() == "v3"


def test_a_folder_it_did_not_write_is_refused_before_any_work(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    ran = []
    with pytest.raises(NotOursError, match="theirs: a folder almost-ray did not write"):
        with atomic_directory(theirs):
            ran.append(True)
    assert not ran and (theirs / "notes.txt").read_text() == "keep me"
    with pytest.raises(NotOursError):
        remove_own_directory(theirs)
    with pytest.raises(NotOursError):
        own_directory(theirs)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotOursError, match="file: a file is already there"):
        remove_own_directory(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as tmp:  # an empty folder holds nothing to lose
        (tmp / "x").write_text("1")
    assert (empty / "x").is_file()


def test_the_model_cache_keeps_a_copy_another_process_finished_first(tmp_path):
    final = tmp_path / "cache" / "model"
    with atomic_directory(final, keep_existing=True) as tmp:
        (tmp / "config.json").write_text("{}")
        with atomic_directory(final, keep_existing=True) as other:  # a concurrent converter wins the race
            (other / "config.json").write_text('{"first": true}')
    assert (final / "config.json").read_text() == '{"first": true}'


def test_export_into_a_folder_holding_files_exits_2_and_keeps_them(tmp_path, monkeypatch, capsys):
    """`almost-ray export --to .` in a folder with a user's file: refused before reading the stage."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("precious")
    code = main(["export", "--set", f"runs_dir={tmp_path / 'runs'}", "--stage", "compare", "--to", "."])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is already there and is never replaced" in err[0]
    assert (tmp_path / "mine.txt").read_text() == "precious"
    code = main(["export", "--set", f"runs_dir={tmp_path / 'runs'}", "--stage", "compare", "--to", str(tmp_path)])
    assert code == 2 and (tmp_path / "mine.txt").is_file()
