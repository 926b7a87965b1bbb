"""`sts.engine.stats`: one run's and a paired run's statistics, told apart by their file, not by None fields."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sts.engine.stats import ExampleShifts, FeatureStats, PairedStats, RunStats, load_stats
from sts.errors import UserError


def _features(rows: torch.Tensor) -> FeatureStats:
    f = FeatureStats.zeros(rows.shape[1])
    f.update(rows)
    return f


def test_each_kind_round_trips_as_itself(tmp_path):
    a = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 0.0], [3.0, 2.0, 1.0]])
    single = RunStats(_features(a), {"readout": "sae"})
    single.save(tmp_path / "one.safetensors")
    back = load_stats(tmp_path / "one.safetensors")
    assert type(back) is RunStats and back.meta == {"readout": "sae"} and back.a.count == 2
    torch.testing.assert_close(back.a.sum, a.sum(0).double())

    # per example: example 0 is row 0, example 1 is row 1 (sparse entries, zeros left out)
    sq = (b - a) ** 2
    rows, cols = sq.nonzero(as_tuple=True)
    shifts = ExampleShifts(rows.int(), cols.int(), sq[rows, cols], examples=3)  # a third example had no token
    paired = PairedStats(_features(a), _features(b), sq.sum(0).double(), {"shift": "icl"}, shifts)
    paired.save(tmp_path / "two.safetensors")
    back2 = load_stats(tmp_path / "two.safetensors")
    assert type(back2) is PairedStats and back2.b.count == 2 and back2.meta["shift"] == "icl"
    per = back2.example_shift([2, 0])
    assert per.shape == (3, 2) and per[2].abs().sum() == 0
    torch.testing.assert_close(per[:2], sq[:, [2, 0]].double())
    torch.testing.assert_close(back2.example_shift([0, 1, 2]).sum(0), back2.sum_sq_diff)


def test_a_file_that_is_not_statistics_is_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not an sts statistics file"):
        load_stats(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable sts statistics file"):
        load_stats(tmp_path / "junk.safetensors")
