"""The hooked residual stream is exactly HF's hidden state, and nothing past it runs."""

from __future__ import annotations

import pytest
import torch

from sts.engine.models import HookPoint, ResidualReader, decoder_layers, load_model, parse_hook_name
from sts.errors import UserError

FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gpt2"]


def _batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 2])
def test_resid_post_equals_hidden_states(model_dirs, family, layer):
    lm = load_model(str(model_dirs[family]))
    ids, mask = _batch(lm.tokenizer, ["The quick brown fox.", "Solve for x: 2x + 3 = 7, so x = 2."])
    got = ResidualReader(lm, HookPoint(layer, "post"))(ids, mask)
    with torch.no_grad():
        ref = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[layer + 1][real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_resid_pre_equals_previous_hidden_state(model_dirs, family):
    lm = load_model(str(model_dirs[family]))
    ids, mask = _batch(lm.tokenizer, ["Atoms bond to form molecules."])
    got = ResidualReader(lm, HookPoint(2, "pre"))(ids, mask)
    with torch.no_grad():
        ref = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got, ref[2], rtol=1e-5, atol=1e-5)


def test_forward_stops_after_the_hooked_layer(model_dirs):
    lm = load_model(str(model_dirs["llama"]))
    ran: list[str] = []
    layers = decoder_layers(lm.model)
    handles = [m.register_forward_hook(lambda *_a, i=i: ran.append(f"layer{i}"))
               for i, m in enumerate(layers)]
    handles.append(lm.model.lm_head.register_forward_hook(lambda *_a: ran.append("lm_head")))
    ids, mask = _batch(lm.tokenizer, ["The quick brown fox."])
    ResidualReader(lm, HookPoint(1, "post"))(ids, mask)
    for h in handles:
        h.remove()
    assert ran == ["layer0", "layer1"]


@pytest.mark.parametrize("name,layer,expected", [
    ("blocks.25.hook_resid_post", None, HookPoint(25, "post")),
    ("blocks.3.hook_resid_pre", None, HookPoint(3, "pre")),
    ("model.layers.7", None, HookPoint(7, "post")),
    ("transformer.h.4", None, HookPoint(4, "post")),
    ("blocks.25.hook_resid_post", 2, HookPoint(2, "post")),
    (None, 5, HookPoint(5, "post")),
])
def test_parse_hook_name(name, layer, expected):
    assert parse_hook_name(name, layer) == expected


def test_unknown_hook_name_without_layer_is_a_user_error():
    with pytest.raises(UserError, match="--layer"):
        parse_hook_name("blocks.3.attn.hook_z")


def test_layer_out_of_range(model_dirs):
    lm = load_model(str(model_dirs["qwen2"]))
    with pytest.raises(UserError, match="out of range"):
        ResidualReader(lm, HookPoint(4, "post"))


def test_the_readmes_large_model_saes_exist_in_the_installed_sae_lens_directory():
    """docs/usage.md pairs each of the paper's models with the SAE the paper used, by its id in
    sae_lens's directory; a renamed release would break those commands."""
    import re
    from pathlib import Path

    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    readme = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    pairs = [p for p in re.findall(r"--model (\S+) --sae ([^/\s]+)/(\S+)", readme) if "/" in p[0]]
    assert {m for m, _, _ in pairs} >= {"meta-llama/Meta-Llama-3-8B-Instruct", "google/gemma-2-9b-it",
                                        "Qwen/Qwen2.5-7B-Instruct"}
    directory = get_pretrained_saes_directory()
    for model, release, sae_id in pairs:
        assert release in directory and sae_id in directory[release].saes_map, (release, sae_id)
        assert directory[release].model.split("/")[-1] == model.split("/")[-1]  # trained on that model
