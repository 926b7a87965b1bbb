"""`sts.cache`: entries are named by their key, verified by a sidecar sha256, never trusted blind."""

from __future__ import annotations

from sts.cache import Cache, fingerprint, key_digest


def test_json_entries_are_reused_verified_and_recomputed_when_corrupted(tmp_path, capsys):
    cache = Cache(tmp_path)
    calls: list[int] = []

    def compute() -> dict[int, str]:
        calls.append(1)
        return {3: "three", 1: "one"}

    key = {"kind": "generated", "examples": "abc"}
    assert cache.get_or_compute_json(key, compute) == {3: "three", 1: "one"}
    assert cache.get_or_compute_json(key, compute) == {3: "three", 1: "one"} and len(calls) == 1
    assert cache.get_or_compute_json(key | {"examples": "abd"}, compute) and len(calls) == 2  # another key
    entry = tmp_path / "extract" / f"{key_digest(key)}.json"
    entry.write_text(entry.read_text().replace("three", "tree"))  # same length, other bytes
    assert cache.get_or_compute_json(key, compute) == {3: "three", 1: "one"} and len(calls) == 3
    assert "corrupted" in capsys.readouterr().err
    (tmp_path / "extract" / f"{key_digest(key)}.sha256").unlink()  # a payload without its sidecar
    cache.get_or_compute_json(key, compute)
    assert len(calls) == 4


def test_a_disabled_cache_computes_and_stores_nothing(tmp_path):
    cache = Cache(tmp_path, enabled=False)
    assert cache.get_or_compute_json({"k": 1}, lambda: {1: "x"}) == {1: "x"}
    assert not (tmp_path / "extract").exists()


def test_fingerprint_follows_file_contents(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    first = fingerprint(str(model))
    assert fingerprint(str(model)) == first and fingerprint("hub/id") != first
    (model / "config.json").write_text('{"x": 1}')
    assert fingerprint(str(model)) != first and fingerprint("") == ""
