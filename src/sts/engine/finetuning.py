"""`sts finetune`: supervised fine-tuning with TRL, LoRA through peft by default.

Examples become TRL "prompt-completion" records (conversational when the tokenizer has a
chat template), so TRL's completion-only loss puts the loss on response tokens only — the
tokens the `icl`/`sft` shifts also read. Output directory:

    OUT/                  merged model + tokenizer (save_pretrained): `--model OUT` anywhere,
                          including `--tuned-model OUT` for the sft shift
    OUT/adapter/          the LoRA adapter alone (peft), when LoRA was used
    OUT/finetune.json     spec, per-step training loss, time, the command
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sts import files
from sts.data.examples import Dataset, Example
from sts.engine.distributed import barrier, world
from sts.engine.models import LoadedModel, plain_model
from sts.engine.settings import FinetuneConfig, FinetuneSpec
from sts.errors import UserError
from sts.files import atomic_dir


@dataclass
class FinetuneResult:
    out: Path
    adapter: Path | None
    losses: list[float] = field(default_factory=list)  # training loss per logged step
    seconds: float = 0.0
    lengths: dict[str, int] = field(default_factory=dict)  # records dropped / cut by max_length


def has_response(e: Example) -> bool:
    """Whether a record has a response to train on (`sft_records` keeps those only)."""
    return bool(e.response and e.response.strip())


def sft_records(examples: list[Example], tok: Any) -> list[dict[str, Any]]:
    """Prompt-completion records; conversational (chat-template) when the tokenizer has one."""
    usable = [e for e in examples if has_response(e)]
    if not usable:
        raise UserError("the training set has no responses to train on (need prompt/response "
                        "records: MMLU answers, LIMO/MATH solutions, Alpaca outputs, chat turns)")
    if getattr(tok, "chat_template", None):
        out = []
        for e in usable:
            history = [{"role": r, "content": c} for r, c in e.history]
            out.append({"prompt": history + [{"role": "user", "content": e.prompt}],
                        "completion": [{"role": "assistant", "content": e.response}]})
        return out
    return [{"prompt": e.prompt + "\n", "completion": (e.response or "") + (tok.eos_token or "")}
            for e in usable]


MAX_AUTO_LENGTH = 1024  # the fitted default's cap: a step of 4 x 1024 tokens is ~4x one of 4 x 256


def token_lengths(examples: list[Example], tok: Any) -> list[tuple[int, int]]:
    """(prompt tokens, prompt + response tokens) of each record, rendered as TRL renders it."""
    from trl.data_utils import apply_chat_template

    out = []
    for rec in sft_records(examples, tok):
        if isinstance(rec["prompt"], list):
            rec = apply_chat_template(rec, tok)
        prompt = len(tok(rec["prompt"], add_special_tokens=False)["input_ids"])
        out.append((prompt, len(tok(rec["prompt"] + rec["completion"], add_special_tokens=False)["input_ids"])))
    return out


def fitted_length(lengths: list[tuple[int, int]]) -> int:
    """The default --max-length: the longest record, rounded up to a multiple of 64, at most
    MAX_AUTO_LENGTH (TRL pads each batch to its longest record, not to this bound)."""
    longest = max(full for _, full in lengths)
    return min(MAX_AUTO_LENGTH, -(-longest // 64) * 64)


def length_report(lengths: list[tuple[int, int]], max_length: int) -> dict[str, int]:
    """What --max-length does to the records: those whose prompt alone fills it are dropped
    (no response token would be trained), those longer than it are cut."""
    dropped = sum(prompt >= max_length for prompt, _ in lengths)
    cut = sum(prompt < max_length < full for prompt, full in lengths)
    return {"records": len(lengths), "dropped": dropped, "cut": cut, "kept": len(lengths) - dropped,
            "max_length": max_length, "longest": max(full for _, full in lengths)}


def finetune(lm: LoadedModel, examples: list[Example], spec: FinetuneSpec, out: Path,
             command: str = "", in_place: bool = False, report_extra: dict | None = None) -> FinetuneResult:
    """Train, then write OUT (merged model), OUT/adapter and OUT/finetune.json atomically:
    everything goes to OUT.part first and is renamed at the end. `in_place`: train `lm.model`
    itself (a model loaded for this run only), not a copy — a 7-9B model is not copied."""
    from sts.errors import warn

    spec, usable, report = trained_records(examples, spec, lm.tokenizer, warn)
    losses: list[float] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sts-finetune-") as scratch:
        trainer = build_trainer(lm, usable, spec, Path(scratch), losses, copy_model=not in_place)
        trainer.train()
    seconds = time.perf_counter() - started
    tuned = trainer.model
    adapter = out / files.ADAPTER if spec.lora else None
    w = world()
    if not w.main:  # data-parallel under torchrun: every process holds the same model; the main one writes
        barrier(w)
        return FinetuneResult(out, adapter, losses, seconds, report)
    with atomic_dir(out) as tmp:
        if spec.lora:
            tuned.save_pretrained(tmp / files.ADAPTER)
            tuned = tuned.merge_and_unload()
        tuned.eval()
        tuned.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        meta = {"base_model": lm.spec, "examples": len(trainer.train_dataset), "lengths": report,
                "spec": asdict(spec), "learning_rate": spec.learning_rate, "losses": losses,
                "seconds": round(seconds, 1), "command": command, **(report_extra or {})}
        (tmp / files.FINETUNE).write_text(json.dumps(meta, indent=2) + "\n")
    barrier(w)
    return FinetuneResult(out, adapter, losses, seconds, report)


def trained_records(examples: list[Example], spec: FinetuneSpec, tok: Any,
                    warn: Any = lambda _m: None) -> tuple[FinetuneSpec, list[Example], dict[str, int]]:
    """(the spec with its length fitted, the records the trainer trains on, the length report):
    one rule for `finetune` and for the lookahead scores (`sts.engine.lookahead`), which must take the
    very steps the run takes."""
    lengths = token_lengths(examples, tok)
    if spec.max_length is None:
        spec = dataclasses.replace(spec, max_length=fitted_length(lengths))
    assert spec.max_length is not None
    report = length_report(lengths, spec.max_length)
    if report["kept"] == 0:
        raise UserError(f"every training record's prompt fills --max-length {spec.max_length}: nothing to "
                        f"train on (longest record {report['longest']} tokens); raise --max-length")
    if report["dropped"] or report["cut"]:
        warn(f"--max-length {spec.max_length}: {report['dropped']} of {report['records']} training records "
             f"dropped (the prompt alone fills it), {report['cut']} cut (the response's end is not trained)")
    usable = [e for e, (prompt, _) in zip([e for e in examples if e.response and e.response.strip()], lengths)
              if prompt < spec.max_length]
    return spec, usable, report


def sft_args(spec: FinetuneSpec, model: Any, scratch: Path) -> Any:
    """TRL's SFTConfig of the run: its optimizer (AdamW, TRL's betas and epsilon), gradient
    clipping and schedule are what the lookahead scores read (`sts.engine.lookahead.recipe`)."""
    from trl import SFTConfig

    from sts.engine.distributed import launched

    param = next(model.parameters())
    processes = launched()  # under torchrun the trainer runs data-parallel: the same batch of spec.batch_size
    if spec.batch_size % processes:
        raise UserError(f"--batch-size {spec.batch_size} does not split over {processes} processes: give a multiple "
                        f"of {processes}")
    return SFTConfig(output_dir=str(scratch), max_steps=spec.max_steps,
                     per_device_train_batch_size=spec.batch_size // processes,
                     gradient_accumulation_steps=spec.grad_accum, learning_rate=spec.learning_rate,
                     lr_scheduler_type="linear", warmup_steps=spec.warmup_steps,
                     max_length=spec.max_length, completion_only_loss=True, packing=False,
                     logging_steps=1, save_strategy="no", report_to=spec.report_to, seed=spec.seed,
                     use_cpu=param.device.type == "cpu", dataloader_num_workers=0,
                     gradient_checkpointing=spec.gradient_checkpointing,
                     bf16=param.dtype == torch.bfloat16,
                     fp16=param.dtype == torch.float16 and param.device.type == "cuda")  # the trainer has no CPU fp16


def build_trainer(lm: LoadedModel, examples: list[Example], spec: FinetuneSpec, scratch: Path,
                  losses: list[float] | None = None, copy_model: bool = True, callbacks: list[Any] | None = None
                  ) -> Any:
    """TRL's SFTTrainer on prompt-completion records with completion-only loss (LoRA on all
    linear layers unless `spec.lora` is off); `losses` collects the logged training loss;
    `callbacks` (transformers TrainerCallbacks) watch or stop the run (`sts.engine.lookahead`).
    The model trains in the precision and on the device it was loaded with."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    log = losses if losses is not None else []

    class _Losses(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                log.append(float(logs["loss"]))

    peft_config = None
    if spec.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec.lora_r, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    args = sft_args(spec, lm.model, scratch)
    # By default a copy: peft injects LoRA layers in place and merging rewrites the weights,
    # and a caller holding the model may still need the base model afterwards.
    model = copy.deepcopy(lm.model) if copy_model else lm.model
    return SFTTrainer(model=plain_model(model), args=args,
                      train_dataset=Dataset.from_list(sft_records(examples, lm.tokenizer)),
                      processing_class=lm.tokenizer, peft_config=peft_config,
                      callbacks=[_Losses(), *(callbacks or [])])


# --- the `sts finetune` stage --------------------------------------------------------------


def run(cfg: FinetuneConfig, command: str = "") -> tuple[FinetuneResult, Dataset]:
    """Load the data and the model (in the chosen dtype, for this run only: trained in place,
    never copied), fine-tune, write cfg.out."""
    from sts.data.datasets import load_dataset
    from sts.engine.models import default_model_dir, load_model

    extra: dict = {}
    if isinstance(cfg.train, list):
        from sts.engine.mixture import candidates, mixed_examples

        (mix,) = candidates(cfg.train)
        parts = {p.spec: load_dataset(p.spec, cfg.skip_bad_lines, cfg.max_train) for p in mix.parts}
        drawn, counts = mixed_examples(mix, {s: d.examples for s, d in parts.items()}, cfg.max_train, cfg.spec.seed)
        train = dataclasses.replace(next(iter(parts.values())), spec=mix.name, examples=drawn)
        extra = {"mixture": [{"spec": p.spec, "weight": p.weight, "examples": counts[p.spec],
                              "pool": len(parts[p.spec].examples)} for p in mix.parts]}
    else:
        train = load_dataset(cfg.train, cfg.skip_bad_lines, cfg.max_train)
    where = cfg.placement
    lm = load_model(cfg.model or str(default_model_dir()), where.dtype, where.device, where.device_map)
    return finetune(lm, train.examples, cfg.spec, cfg.out, command, in_place=True, report_extra=extra), train
