"""`sts train-sae` on a tiny model: activations cached, sae_lens training, metrics, sae_lens format."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE

from sts.cli import main


def test_train_sae_writes_a_loadable_sae_with_metrics(tmp_path, model_dirs, text_file, qa_file, capsys):
    out = tmp_path / "sae"
    argv = ["train-sae", "--model", str(model_dirs["llama"]), "--layer", "2", "--corpus", str(text_file),
            "--corpus", str(qa_file), "--heldout", str(text_file), "--out", str(out), "--tokens", "150",
            "--width", "64", "--k", "4", "--train-batch", "32", "--epochs", "3", "--eval-tokens", "200",
            "--seq-len", "16"]
    exit_code = main(argv)
    assert exit_code == 0, capsys.readouterr().err
    sae = SAE.load_from_disk(out)
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert sae.W_enc.dtype == torch.float32  # stored in fp16, loaded as float32
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    assert m["l0"] == pytest.approx(4.0)  # TopK with k=4 on every token
    assert 0 <= m["dead_fraction"] <= 1 and m["tokens"] > 0
    assert m["explained_variance"] < 1 and m["ce_loss_spliced"] > 0
    assert record["command"].startswith("sts train-sae") and "--width 64" in record["command"]
    # the activation cache is kept and reused: a second run caches nothing new
    shards = sorted((tmp_path / "sae.acts").glob("acts_*.npy"))
    assert shards and sum(int(__import__("numpy").load(p).shape[0]) for p in shards) == 150
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    second = list(argv)
    second[second.index("--out") + 1] = str(tmp_path / "sae2")
    assert main(second + ["--activations", str(tmp_path / "sae.acts")]) == 0
    assert "150 activations cached" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "sae.acts").glob("acts_*.npy"))} == stamps
    assert (tmp_path / "sae2" / "cfg.json").exists()
