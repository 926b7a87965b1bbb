"""`sts train-sae` on a tiny model: activations cached, sae_lens training, metrics, sae_lens format.

The metrics the command records are recomputed here from the saved SAE (loaded with sae_lens)
and a plain HF forward pass: the same held-out windows, features from sae_lens's own `encode`,
sums in float64. The saved weights are fp16, the metrics were measured before that rounding:
hence the small tolerances."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sae_lens import SAE
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import CORPUS

SEQ_LEN = 16
K = 4
WIDTH = 64


def _windows(tok, texts: list[str]) -> list[list[int]]:
    """Each text's tokens (no BOS) cut into SEQ_LEN-token windows; shorter tails dropped."""
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out += [ids[i:i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN) if len(ids) - i >= SEQ_LEN]
    return out


def _recompute(model_dir, sae_dir, texts: list[str], median_norm: float) -> dict[str, float]:
    """The held-out metrics from their definitions: every token but each window's first (the
    attention sink), layer 2's output read from `hidden_states`, and next-token losses from
    log-softmax with that layer's output (position 0 kept) replaced by the reconstruction."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sae = SAE.load_from_disk(sae_dir).eval()

    def splice(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        recon = sae.decode(sae.encode(hidden))
        recon[:, 0] = hidden[:, 0]
        return (recon, *output[1:]) if isinstance(output, tuple) else recon

    xs, feats, recons, nll_clean, nll_spliced = [], [], [], [], []
    for w in _windows(tok, texts):
        ids = torch.tensor([w])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            handle = model.model.layers[2].register_forward_hook(splice)
            try:
                spliced = model(input_ids=ids).logits
            finally:
                handle.remove()
            x = out.hidden_states[3][0, 1:]
            xs.append(x.double())
            feats.append(sae.encode(x))
            recons.append(sae.decode(feats[-1]).double())
        for logits, into in ((out.logits, nll_clean), (spliced, nll_spliced)):
            logp = torch.log_softmax(logits[0].double(), -1)
            into += [-float(logp[i - 1, w[i]]) for i in range(2, len(w))]  # token 1 sees only the sink
    x, f, recon = torch.cat(xs), torch.cat(feats), torch.cat(recons)
    clean, spliced_loss = float(np.mean(nll_clean)), float(np.mean(nll_spliced))
    return {"tokens": x.shape[0], "sinks": int((x.norm(dim=-1) > 10 * median_norm).sum()),
            "explained_variance": 1 - float(((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()),
            "l0": float((f != 0).sum(1).double().mean()), "min_l0": int((f != 0).sum(1).min()),
            "dead_fraction": float(((f != 0).sum(0) == 0).double().mean()),
            "ce_loss_clean": clean, "ce_loss_spliced": spliced_loss}


def test_train_sae_writes_a_loadable_sae_with_metrics(tmp_path, model_dirs, text_file, qa_file, run_cli):
    out = tmp_path / "sae"
    # 150 tokens, 20 epochs of 32 at a high rate: 93 steps, seconds on a CPU, and the SAE learns
    # (explained variance 0.85 measured; 3 epochs at the default rate left it at -0.006)
    argv = ["train-sae", "--model", str(model_dirs["llama"]), "--layer", "2", "--corpus", str(text_file),
            "--corpus", str(qa_file), "--heldout", str(text_file), "--out", str(out), "--tokens", "150",
            "--width", str(WIDTH), "--k", str(K), "--train-batch", "32", "--epochs", "20", "--lr", "2e-2",
            "--eval-tokens", "200", "--seq-len", str(SEQ_LEN)]
    run_cli(argv)
    sae = SAE.load_from_disk(out)
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == WIDTH
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert sae.W_enc.dtype == torch.float32  # stored in fp16, loaded as float32
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    assert record["command"].startswith("sts train-sae") and "--width 64" in record["command"]
    assert all(math.isfinite(v) for v in m.values()), m

    shards = sorted((tmp_path / "sae.acts").glob("acts_*.npy"))
    acts = torch.from_numpy(np.concatenate([np.load(p) for p in shards])).float()
    assert m["training_tokens"] == acts.shape[0] == 150 and m["training_sink_tokens_dropped"] == 0
    direct = _recompute(model_dirs["llama"], out, CORPUS, float(acts.norm(dim=-1).median()))
    # the held-out tokens: 6 windows of 16 tokens (two texts are shorter), 15 counted in each
    assert m["tokens"] == direct["tokens"] == 90 and m["sink_tokens"] == direct["sinks"] == 0
    # TopK fires exactly k features on every token
    assert m["l0"] == direct["l0"] == K and direct["min_l0"] == K
    # the SAE learned: most of the variance is explained, and the number is the definition's
    assert m["explained_variance"] > 0.6
    assert m["explained_variance"] == pytest.approx(direct["explained_variance"], abs=2e-3)
    assert m["explained_variance_with_sinks"] == m["explained_variance"]  # no sink tokens here
    # dead: never fires on these tokens (fp16 storage may move one near-tie feature)
    assert m["dead_fraction"] < 0.5
    assert m["dead_fraction"] == pytest.approx(direct["dead_fraction"], abs=1 / WIDTH + 1e-9)
    # next-token loss, clean (independent of the SAE) and with the reconstruction spliced in
    assert m["ce_loss_clean"] == pytest.approx(direct["ce_loss_clean"], rel=1e-5)
    assert m["ce_loss_clean"] == pytest.approx(math.log(len(AutoTokenizer.from_pretrained(model_dirs["llama"]))),
                                               abs=0.2)  # a random model: close to uniform
    assert m["ce_loss_spliced"] != m["ce_loss_clean"]  # the splice changed the forward pass
    assert m["ce_loss_spliced"] == pytest.approx(direct["ce_loss_spliced"], abs=1e-4)
    assert m["ce_loss_increase"] == pytest.approx(m["ce_loss_spliced"] - m["ce_loss_clean"], abs=1e-9)

    # the activation cache is kept and reused: a second run caches nothing new
    assert shards and sum(int(np.load(p).shape[0]) for p in shards) == 150
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    second = list(argv)
    second[second.index("--out") + 1] = str(tmp_path / "sae2")
    second[second.index("--epochs") + 1] = "1"  # its SAE is not the point
    result = run_cli(second + ["--activations", str(tmp_path / "sae.acts")])
    assert "150 activations cached" in result.err
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "sae.acts").glob("acts_*.npy"))} == stamps
    assert (tmp_path / "sae2" / "cfg.json").exists()
