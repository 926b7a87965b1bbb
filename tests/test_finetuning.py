"""Fine-tuning on tiny models: it lowers the response loss and saves a loadable model, the
loss is on response tokens only, and over-long records are reported (dropped or cut)."""

from __future__ import annotations

import json

import pytest
import torch

from sts.data.examples import Example
from sts.engine.finetuning import finetune, sft_records
from sts.engine.models import LoadedModel, load_model
from sts.engine.settings import FinetuneSpec

from .conftest import make_model


def response_loss(lm: LoadedModel, examples: list[Example], max_length: int = 256) -> float:
    """Mean next-token loss over response tokens, rendered as training renders them."""
    from trl.data_utils import apply_chat_template

    tok, losses = lm.tokenizer, []
    for rec in sft_records(examples, tok):
        if isinstance(rec["prompt"], list):
            rec = apply_chat_template(rec, tok)
        prompt_ids = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
        full_ids = tok(rec["prompt"] + rec["completion"], add_special_tokens=False)["input_ids"][:max_length]
        labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([full_ids]), labels=torch.tensor([labels[:len(full_ids)]]))
        losses.append(float(out.loss))
    return sum(losses) / len(losses)


def test_finetune_lowers_response_loss_and_saves_a_loadable_model(tokenizer, tmp_path):
    lm = LoadedModel(make_model("llama", len(tokenizer)), tokenizer, "tiny")
    exs = [Example(f"What is {i} plus {i}?", f"The answer is {2 * i}.", "math", str(i)) for i in range(8)]
    before = response_loss(lm, exs)
    result = finetune(lm, exs, FinetuneSpec(max_steps=8, lr=5e-3, batch_size=4, warmup_steps=0),
                      tmp_path / "ft")
    assert len(result.losses) == 8 and result.losses[-1] < result.losses[0]
    tuned = load_model(str(tmp_path / "ft"))
    assert response_loss(tuned, exs) < before - 0.05
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").exists()
    meta = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert meta["losses"] == result.losses and meta["spec"]["lora"] is True
    assert not (tmp_path / "ft.part").exists()


def test_loss_is_on_response_tokens_only(tokenizer, tmp_path):
    """The batches the trainer sees carry labels on the response (and its end-of-turn
    marker) and -100 on every prompt and chat-template token."""
    from sts.engine.finetuning import build_trainer

    lm = LoadedModel(make_model("llama", len(tokenizer)), tokenizer, "tiny")
    exs = [Example("What is two plus two?", "The answer is four.", None, "1"),
           Example("Solve for x: 2x = 8.", "Divide by two, so x = 4.", None, "2")]
    trainer = build_trainer(lm, exs, FinetuneSpec(max_steps=1, batch_size=2), tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = tokenizer.decode(ids[labels != -100])
        assert trained.strip() in {f"{e.response}<|im_end|>" for e in exs}, trained
        assert "What is" not in trained and "user" not in trained
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(lm.model.parameters(), trainer.model.parameters()))


def test_finetune_reports_dropped_and_cut_records_and_stops_when_none_is_left(tokenizer, tmp_path):
    from sts.engine.finetuning import fitted_length, length_report, token_lengths
    from sts.errors import UserError

    lm = LoadedModel(make_model("llama", len(tokenizer)), tokenizer, "tiny")
    exs = [Example("Short question?", "Short answer.", None, "0"),
           Example("A much longer question " * 8, "An answer.", None, "1"),
           Example("Q?", "A long chain of thought " * 10, None, "2")]
    lengths = token_lengths(exs, tokenizer)
    prompt_1, full_2 = lengths[1][0], lengths[2][1]
    limit = max(lengths[0][1], lengths[2][0]) + 1  # example 0 fits, 1's prompt fills it, 2 is cut
    assert prompt_1 >= limit and full_2 > limit
    assert length_report(lengths, limit) == {"records": 3, "dropped": 1, "cut": 1, "kept": 2,
                                             "max_length": limit, "longest": max(f for _, f in lengths)}
    fitted = fitted_length(lengths)
    assert fitted % 64 == 0 and fitted >= max(f for _, f in lengths) and length_report(lengths, fitted)["cut"] == 0
    with pytest.raises(UserError, match="nothing to train on"):
        finetune(lm, exs, FinetuneSpec(max_length=8, max_steps=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()
