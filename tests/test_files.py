"""`sts.files`: a write that fails leaves the previous artifact (or nothing) and no partial one."""

from __future__ import annotations

import pytest

from sts.files import atomic_dir, atomic_path


def test_atomic_dir_replaces_on_success_and_keeps_the_old_one_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        assert tmp != out and tmp.is_dir() and not out.exists()
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first" and not (tmp_path / "model.part").exists()
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("stopped midway")
    assert (out / "a.txt").read_text() == "first" and not (tmp_path / "model.part").exists()
    with atomic_dir(out) as tmp:  # a leftover .part of a killed run is cleared, not merged
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_atomic_path_leaves_no_partial_file(tmp_path):
    out = tmp_path / "sub" / "x.json"
    with pytest.raises(ValueError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise ValueError
    assert not out.exists() and list(out.parent.iterdir()) == []
    with atomic_path(out) as tmp:
        tmp.write_text("whole")
    assert out.read_text() == "whole" and [p.name for p in out.parent.iterdir()] == ["x.json"]
