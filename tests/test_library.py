"""The shared / own decomposition of a prediction by a library of measured runs."""

from __future__ import annotations

import numpy as np
import pytest

from sts.analysis.library import Library, LibrarySet, check_library, decompose
from sts.errors import UserError

DOMAINS = ["a", "b", "c", "d"]


def _library(tmp_path) -> Library:
    rng = np.random.default_rng(0)
    sets = {f"s{i}": LibrarySet(f"spec{i}", {"act": dict(zip(DOMAINS, rng.normal(size=4)))},
                                {"nll": dict(zip(DOMAINS, rng.normal(size=4)))}) for i in range(3)}
    lib = Library("sae-sha", "m", 10, "nll", sets)
    lib.save(tmp_path / "library.json")
    return Library.load(tmp_path)


def z(v):
    v = np.asarray(v, float)
    return (v - v.mean()) / v.std()


def test_the_parts_are_the_library_means_and_sum_to_the_split(tmp_path):
    lib = _library(tmp_path)
    mine = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.5, "e": 9.0}  # e: not in the library, not split
    dec = decompose(lib, "act", mine, leave_out="spec2")
    assert dec.library_sets == ["s0", "s1"] and set(dec.shared) == set(DOMAINS)
    members = [lib.sets["s0"], lib.sets["s1"]]
    shared = np.mean([z([s.changes["nll"][d] for d in DOMAINS]) for s in members], 0)
    typical = np.mean([z([s.scores["act"][d] for d in DOMAINS]) for s in members], 0)
    own = z([mine[d] for d in DOMAINS]) - typical
    assert [dec.shared[d] for d in DOMAINS] == pytest.approx(shared)
    assert [dec.own[d] for d in DOMAINS] == pytest.approx(own)
    assert all(dec.combined[d] == pytest.approx(dec.shared[d] + dec.own[d]) for d in DOMAINS)


def test_a_library_from_another_sae_or_k_is_refused(tmp_path):
    lib = _library(tmp_path)
    assert "another SAE" in check_library(lib, str(tmp_path / "other-sae"), "act", 10)
    assert "k = 10" in check_library(lib, "sae-sha", "act", 400) and check_library(lib, "sae-sha", "act", 10) is None
    with pytest.raises(UserError, match="fewer than 2 other sets"):
        decompose(Library("x", "m", 10, "nll", {"s0": lib.sets["s0"]}), "act", {d: 1.0 for d in DOMAINS})
    with pytest.raises(UserError, match="not an sts library"):
        Library.load(tmp_path / "missing.json")


def test_the_embedded_sae_ships_the_transfer_experiments_library():
    """`sts predict` with the embedded SAE splits the default score by the seven measured sets, with
    the library of the embedded domain set it reads (the reference domains' or MMLU's, each scored
    on those domains' own records); another k, or a domain side of another kind, gets a one-line
    note instead, and a library asked for must fit."""
    from sts.analysis.library import side_label
    from sts.data.datasets import load_dataset
    from sts.data.embedded import LIBRARIES, REFERENCE_DOMAINS, SAE_DIR
    from sts.defaults import DEFAULT_K, DEFAULT_SCORE
    from sts.prediction.config import PredictConfig
    from sts.prediction.libraries import library

    assert REFERENCE_DOMAINS in LIBRARIES
    # your own domains: the shipped libraries were scored on other records, and the output says so
    lib, note = library(PredictConfig(sae=str(SAE_DIR), domains="mine.jsonl", score=DEFAULT_SCORE),
                        "mine.jsonl: reference chains of thought")
    assert lib is None and "the shipped libraries hold scores read on" in note and "mine.jsonl" in note
    for domains, path in LIBRARIES.items():
        side = side_label(True, domains, load_dataset(domains).examples)
        lib, note = library(PredictConfig(sae=str(SAE_DIR), domains=domains, score=DEFAULT_SCORE), side)
        # the transfer experiment's 7 sets; on the reference domains the held-out round's 3 too
        assert lib is not None and note == "" and lib.k == DEFAULT_K, domains
        assert len(lib.sets) == {REFERENCE_DOMAINS: 10, "embedded:mmlu": 7}[domains]
        assert all(DEFAULT_SCORE in s.scores and "cot_nll" in s.changes for s in lib.sets.values())
        assert lib.sides[DEFAULT_SCORE] == side
        other = {REFERENCE_DOMAINS: "embedded:mmlu", "embedded:mmlu": REFERENCE_DOMAINS}[domains]
        lib, note = library(PredictConfig(sae=str(SAE_DIR), domains=domains, score=DEFAULT_SCORE),
                            side_label(True, other, load_dataset(other).examples))
        assert lib is None and "scores of two kinds do not share a scale" in note
        lib, note = library(PredictConfig(sae=str(SAE_DIR), domains=domains, k=100, score=DEFAULT_SCORE), side)
        assert lib is None and "k = 400" in note
        with pytest.raises(UserError, match="--library"):
            library(PredictConfig(sae=str(SAE_DIR), k=100, library=str(path), score=DEFAULT_SCORE), side)
