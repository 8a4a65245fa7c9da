"""The leaf's file helpers: one cache root for the whole project, and atomic writes."""

from __future__ import annotations


import pytest

from factedit.files import atomic_path, cache_root, write_text_atomically


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    monkeypatch.delenv("FACTEDIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "factedit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "factedit"


def test_every_cache_lives_under_the_one_root(tmp_path, monkeypatch):
    from factedit.datamodules.sources import cache_dir

    monkeypatch.setenv("FACTEDIT_CACHE", "~/somewhere")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / "somewhere" and cache_dir() == tmp_path / "somewhere" / "data"


def test_an_atomic_write_replaces_the_file_or_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "deep" / "file.txt"
    write_text_atomically(target, "first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary != target
        temporary.write_bytes(b"second")
    assert target.read_text() == "second" and sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_an_atomic_folder_appears_whole_and_its_leftovers_are_found(tmp_path):
    from factedit.files import atomic_dir, leftovers

    target = tmp_path / "edits" / "000001"
    stale = tmp_path / "edits" / ".000001.partial"
    stale.mkdir(parents=True)
    (stale / "torn").write_text("x")
    with atomic_dir(target) as staging:
        assert staging == stale and not staging.exists()  # a killed write's staging folder is emptied first
        staging.mkdir()
        (staging / "edit.json").write_text("{}")
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == ["edit.json"] and not stale.exists()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "edits" / "000002") as staging:
            staging.mkdir()
            raise RuntimeError("killed")
    assert not (tmp_path / "edits" / "000002").exists()
    assert leftovers(tmp_path / "edits" / "000002") == [tmp_path / "edits" / ".000002.partial"]
    (tmp_path / "edits" / ".summary.json.abc123.tmp").write_text("torn")
    assert leftovers(tmp_path / "edits" / "summary.json") == [tmp_path / "edits" / ".summary.json.abc123.tmp"]
    assert leftovers(tmp_path / "edits" / "000001") == []
