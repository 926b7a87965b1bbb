"""`sts extract`: one dataset through the extraction engine (`sts.engine.extract`) into a statistics
file (single or paired runs) or the reference's dense `.pt` tensor.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sts.choices import Format, Method, Responses
from sts.data.inputs import (
    sequences,
)
from sts.engine.extract import Extractor, check_fits, domain_shift_stats, shift_stats
from sts.engine.settings import ExtractConfig
from sts.engine.stats import RunStats, Stats
from sts.errors import UserError, no_tokens
from sts.files import GENERATED, atomic_path


def save_dense(features: torch.Tensor, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(features.float().contiguous(), tmp)


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
