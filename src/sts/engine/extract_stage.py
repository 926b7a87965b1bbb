"""`sts extract`: one dataset through the extraction engine (`sts.engine.extract`) into a statistics
file (single or paired runs) or the reference's dense `.pt` tensor.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sts import defaults
from sts.choices import Format, Method, Readout, Responses, Tokens, parse
from sts.data.inputs import (
    Render,
    domain_render,
    sequences,
    training_render,
)
from sts.engine.extract import Extractor, check_fits, domain_shift_stats, shift_stats
from sts.engine.generate import Generation
from sts.engine.models import (
    Placement,
)
from sts.engine.stats import RunStats, Stats
from sts.errors import UserError, no_tokens, refuse_unused
from sts.files import GENERATED, atomic_path


def save_dense(features: torch.Tensor, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(features.float().contiguous(), tmp)


@dataclass
class ExtractConfig:
    """One `sts extract` run. Every rule between fields is checked here, once, when the config
    is built (`__post_init__`): a bad combination fails before anything loads."""

    data: str
    out: Path
    model: str
    sae: str
    format: Format | None = None  # None: pt for a .pt/.pth OUT, stats otherwise
    shift: Method | None = None  # None: one run; else a paired run
    tuned_model: str | None = None
    demos: int = defaults.DEMOS
    seed: int = defaults.SEED
    tokens: Tokens | None = None  # None: response for icl/sft, all otherwise
    chat: bool | None = None  # None: chat template for icl/sft
    with_response: bool | None = None  # None: with the response for shifts
    max_tokens: int | None = None
    max_examples: int | None = None
    max_length: int | None = None
    batch_size: int | None = None
    batch_tokens: int = defaults.BATCH_TOKENS
    placement: Placement = field(default_factory=Placement)
    responses: Responses = defaults.RESPONSES
    generation: Generation = field(default_factory=Generation)
    layer: int | None = None
    first_token: bool = defaults.EXTRACT_FIRST_TOKEN  # count each sequence's first token
    readout: Readout = defaults.READOUT
    domain_demos: str | None = None
    domain_demos_n: int = defaults.DOMAIN_DEMOS_N
    skip_bad_lines: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.shift = None if self.shift in (None, "none") else parse(Method, self.shift, "--shift")
        self.readout = parse(Readout, self.readout, "--readout")
        self.responses = parse(Responses, self.responses, "--responses")
        self.tokens = None if self.tokens is None else parse(Tokens, self.tokens, "--tokens")
        if self.format is None:
            self.format = Format.PT if self.out.suffix.lower() in (".pt", ".pth") else Format.STATS
        self.format = parse(Format, self.format, "--format")
        if self.format is Format.PT and self.shift is not None:
            raise UserError("--format pt writes one run's dense features; drop --shift (extract base "
                            "and shifted runs separately) or write statistics")
        if self.shift is Method.SFT and not self.tuned_model:
            raise UserError("--shift sft needs --tuned-model (the fine-tuned model)")
        if self.domain_demos is not None and self.shift is not Method.ICL:
            raise UserError("--domain-demos pairs each record with its domain's demonstrations: use it "
                            "with --shift icl")
        if self.domain_demos is not None and self.readout is not Readout.SAE:
            raise UserError("--domain-demos statistics are read on SAE features (the icl score); drop --readout raw")
        if not self.first_token and self.shift is Method.PAPER:
            raise UserError("--no-first-token does not apply to --shift paper (index-aligned streams "
                            "count every token, as the reference does)")
        self._refuse_what_changes_nothing()
        self.placement.resolved()  # a bad device or dtype fails here, in one line

    def _refuse_what_changes_nothing(self) -> None:
        """An option that this combination ignores is bad input: the user meant something else."""
        demos_used = self.shift in (Method.ICL, Method.PAPER) and self.domain_demos is None
        generating = self.responses is Responses.GENERATED or self.shift is Method.DATA
        if self.responses is Responses.GENERATED and self.shift is Method.DATA:
            raise UserError("--shift data compares the records' responses with the model's own: drop "
                            "--responses generated")
        if self.responses is Responses.GENERATED and (self.shift is None or not self.render.with_response):
            raise UserError("--responses generated replaces each record's response, but this run reads "
                            "questions only; add --shift icl|sft|paper (a training set's shift), or drop it")
        refuse_unused([
                ("--tuned-model", self.tuned_model is not None and self.shift is not Method.SFT,
                 "it is the shifted side of --shift sft"),
                ("--demos", self.demos != defaults.DEMOS and not demos_used,
                 "only --shift icl and paper read demonstrations from --data"),
                ("--domain-demos-n", self.domain_demos_n != defaults.DOMAIN_DEMOS_N and self.domain_demos is None,
                 "it counts the --domain-demos"),
                ("--temperature", self.generation.temperature != defaults.TEMPERATURE and not generating,
                 "it samples --responses generated and --shift data"),
                ("--max-new-tokens", self.generation.max_new_tokens != defaults.MAX_NEW_TOKENS and not generating,
                 "it bounds --responses generated and --shift data")])

    @property
    def render(self) -> Render:
        """Training pairs (icl, sft, paper) as `sts predict` reads a training set
        (`training_render`); single runs, and domain questions with their domain's
        demonstrations, as it reads domain questions (`domain_render`). --chat, --tokens and
        --with-response override."""
        base = (training_render(self.shift) if self.shift is not None and self.domain_demos is None
                else domain_render(self.first_token))
        return Render(
            chat=base.chat if self.chat is None else self.chat,
            with_response=base.with_response if self.with_response is None else self.with_response,
            tokens=self.tokens or base.tokens,
            skip_first=not self.first_token,
        )


def run(cfg: ExtractConfig) -> str:
    """Load, read the features, write cfg.out (statistics or a dense tensor, atomically);
    returns the line that says what was written."""
    from sts.data.datasets import domain_demonstrations, load_dataset
    from sts.engine.models import load_model, parse_hook_name
    from sts.engine.saes import check_pairing, load_sae

    dataset = load_dataset(cfg.data, skip_bad_lines=cfg.skip_bad_lines, max_examples=cfg.max_examples)
    render = cfg.render
    sae = load_sae(cfg.sae)
    point = parse_hook_name(sae.hook_name, cfg.layer)
    for spec in filter(None, (cfg.model, cfg.tuned_model if cfg.shift is Method.SFT else None)):
        check_fits(sae, point, spec)
    check_pairing(sae, cfg.model)
    where = cfg.placement
    lm = load_model(cfg.model, where.dtype, where.device, where.device_map)
    engine = Extractor(lm, sae, point, cfg.batch_size, cfg.batch_tokens)
    examples, tok, n = dataset.examples, lm.tokenizer, len(dataset.examples)
    own = _own_responses(cfg, lm, examples)
    if own is not None and cfg.responses is Responses.GENERATED:
        examples = own
    meta = _meta(cfg, point.name, n, own is not None)
    if cfg.format is Format.PT:
        feats = engine.dense(sequences(examples, tok, render, cfg.max_length), n, cfg.max_tokens,
                             readout=cfg.readout)
        if feats.shape[0] == 0:
            raise _no_tokens(cfg.data)
        save_dense(feats, cfg.out)
        return f"wrote {cfg.out}: {feats.shape[0]} tokens x {feats.shape[1]} features"
    if cfg.shift is None:
        result: Stats = RunStats(engine.stats_many(sequences(examples, tok, render, cfg.max_length), (cfg.readout,), n,
                                         cfg.max_tokens)[cfg.readout])
    elif cfg.domain_demos is not None:
        shown, left = domain_demonstrations(dataset.by_domain(), cfg.domain_demos_n, cfg.domain_demos,
                                            cfg.skip_bad_lines)
        questions = [e for exs in left.values() for e in exs]  # a demonstration is never scored
        result = domain_shift_stats(engine, questions, shown.demos, render, cfg.max_length, cfg.max_tokens)
        meta["examples"] = len(questions)
        meta |= {"demos": cfg.domain_demos_n, "domain_demonstrations": shown.describe()}
    else:
        tuned = None
        if cfg.shift is Method.SFT:
            tuned = Extractor(load_model(cfg.tuned_model or "", where.dtype, where.device, where.device_map),
                              sae, point, cfg.batch_size, cfg.batch_tokens)
        result = shift_stats(engine, cfg.shift, examples, render, cfg.demos, cfg.seed, cfg.max_length,
                             cfg.max_tokens, tuned, (cfg.readout,), own)[cfg.readout]
    if result.a.count == 0:
        raise _no_tokens(cfg.data)
    result.meta = meta | {"tokens": result.a.count} | (
        {"truncation": result.meta["truncation"]} if "truncation" in result.meta else {})
    result.save(cfg.out)
    return f"wrote {cfg.out}: {result.a.count} tokens, {result.a.d_sae} features"


def _own_responses(cfg: ExtractConfig, lm: Any, examples: list[Any]) -> list[Any] | None:
    """The model's own responses to the prompts, where the extraction reads them (--responses
    generated, --shift data), written beside the output; None where it does not."""
    if cfg.responses is not Responses.GENERATED and cfg.shift is not Method.DATA:
        return None
    from sts.engine.generate import generated_responses

    own = generated_responses(lm, examples, cfg.generation, cfg.batch_size or 8)
    texts = cfg.out.with_name(cfg.out.name + "." + GENERATED)  # beside the output: what was read
    with atomic_path(texts) as tmp:
        tmp.write_text("".join(json.dumps({"id": e.uid, "prompt": e.prompt, "response": e.response}) + "\n"
                               for e in own))
    print(f"wrote {texts}: the model's {len(examples)} responses", file=sys.stderr)
    return own


def _meta(cfg: ExtractConfig, hook: str, n: int, generated: bool) -> dict[str, Any]:
    """What the statistics file records of how it was read."""
    meta: dict[str, Any] = {
        "model": cfg.model, "sae": cfg.sae, "data": cfg.data, "hook": hook, "shift": cfg.shift.value if cfg.shift
        else "none", **cfg.placement.describe(), "render": asdict(cfg.render), "examples": n,
        "readout": cfg.readout.value, "demos": cfg.demos if cfg.shift in (Method.ICL, Method.PAPER) else 0,
        "seed": cfg.seed, "responses": cfg.responses.value}
    if generated:
        meta["generation"] = {"temperature": cfg.generation.temperature,
                              "max_new_tokens": cfg.generation.max_new_tokens, "seed": cfg.generation.seed}
    return meta


def _no_tokens(data: str) -> UserError:
    return no_tokens(data, "empty records, or no aligned response tokens; check the data, or try --tokens all")
