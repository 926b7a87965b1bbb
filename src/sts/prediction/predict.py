"""`sts predict` for one training set: prepare (load and check the inputs), extract, score, and
the `Prediction` with its explanation (the top contexts of the shifted SAE features).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sts import defaults
from sts.analysis.library import side_label
from sts.choices import Readout
from sts.data.datasets import DomainDemos, domain_demonstrations
from sts.data.examples import Dataset, Example, unsealed
from sts.data.inputs import ModelInput, Render, sequences, training_render
from sts.defaults import DEFAULT_SCORE
from sts.engine import extract as ex
from sts.engine.distributed import gather
from sts.errors import UserError
from sts.prediction.config import PredictConfig, candidate_specs, score_for
from sts.prediction.extraction import (
    check_extraction,
    check_lookahead,
    explains,
    extract_all,
    gradient_train,
    needs,
    responses,
    reused,
)
from sts.prediction.libraries import Libraries, calibration_library, library
from sts.prediction.plan import plan
from sts.prediction.result import Attribution, FeatureReport, Prediction
from sts.prediction.session import Session, contexts_key
from sts.scores.score import Extraction, check_score, spec_of, uses_domain_demos
from sts.scores.selection import Shift, ShiftSamples, top_features


def top_contexts(engine: ex.Extractor, seqs: list[ModelInput], features: list[int], n: int,
                 tok: Any, window: int = 12) -> dict[int, list[dict[str, Any]]]:
    """For each feature, the n tokens (over the counted positions of `seqs`) where it fires
    most, with a few tokens of context on each side and the token itself in [[...]]."""
    heaps: dict[int, list[tuple[float, int, int]]] = {j: [] for j in features}
    cols = torch.tensor(features, dtype=torch.long)
    for indices, batch in engine.batches(seqs, len(seqs), "contexts"):
        f = engine.features(batch)[:, cols.to(engine.device)].cpu()
        where = [(i, p) for i, s in zip(indices, batch) for p in s.positions]
        values, rows = f.topk(min(n, f.shape[0]), dim=0)
        for c, j in enumerate(features):
            for v, r in zip(values[:, c].tolist(), rows[:, c].tolist()):
                if v > 0:
                    item = (v, *where[r])
                    (heapq.heappush if len(heaps[j]) < n else heapq.heappushpop)(heaps[j], item)
    # under several processes each read its share of the sequences: the n best of every share
    merged = {j: sorted((x for part in gather(heaps, engine.world) for x in part[j]), reverse=True)[:n]
              for j in features}
    out: dict[int, list[dict[str, Any]]] = {}
    for j, heap in merged.items():
        out[j] = []
        for v, si, pos in heap:
            ids = seqs[si].ids
            left = tok.decode(ids[max(0, pos - window):pos])
            mid = tok.decode(ids[pos:pos + 1])
            right = tok.decode(ids[pos + 1:pos + 4])
            out[j].append({"activation": round(v, 4), "token": mid,
                           "context": f"{left}[[{mid}]]{right}".replace("\n", "\\n")})
    return out


def score_extraction(cfg: PredictConfig, extraction: Extraction, score: str
                     ) -> tuple[dict[str, float], dict[str, int], Any, ShiftSamples | None]:
    """(domain -> score, domain -> tokens scored, the Shift behind it or None, bootstrap samples)."""
    spec = spec_of(check_score(score))
    out = spec.kind.compute(spec, extraction, cfg.k)
    return out.scores, out.tokens, out.shift, out.samples


@dataclass
class Prepared:
    """A prediction's inputs, loaded and checked, before any extraction: the config (the
    embedded model and SAE filled in), the training sets by spec, the domains, the domain
    demonstrations, the session and the libraries."""

    cfg: PredictConfig
    sets: dict[str, Dataset]
    domains: dict[str, list[Example]]
    demos: DomainDemos | None
    session: Session
    libs: Libraries
    score_note: str = ""  # how the score was chosen, where none was given (said beside the plan line)

    @property
    def several(self) -> bool:
        return isinstance(self.cfg.train, list)

    def announce(self, progress: Callable[[str], None]) -> None:
        """How the score was chosen (where none was given), then what will be computed (`plan`)."""
        if self.score_note:
            progress(self.score_note)
        progress(plan(self.cfg, self.sets, self.domains, self.session))


def predict_one(cfg: PredictConfig | None = None, train: Dataset | None = None,
            domains: dict[str, list[Example]] | None = None, progress: Callable[[str], None] = lambda _m: None,
            demos: DomainDemos | None = None, *, model: Any = None, tokenizer: Any = None, sae: Any = None
            ) -> Prediction:
    """One training set's prediction, always a `Prediction` (`sts.predict`, i.e.
    `sts.prediction.compare.predict`, also takes several sets and mixtures and returns a
    `Comparison` for them); arguments as `prepare`'s."""
    p = prepare(cfg, train, domains, progress, demos, model=model, tokenizer=tokenizer, sae=sae)
    if p.several:
        raise UserError("several training sets (or a mixture): call sts.predict (sts.prediction.compare.predict)")
    p.announce(progress)
    return single(p, progress)


def single(p: Prepared, progress: Callable[[str], None]) -> Prediction:
    """Extract, score, split and calibrate one training set."""
    spec = next(iter(p.sets))
    ds = responses(p.cfg, p.sets[spec], p.session, progress)
    extraction = extract_all(p.cfg, ds, p.domains, (p.cfg.score,), p.demos, progress, p.session)
    pred = prediction(p.cfg, extraction, p.cfg.score, ds, p.session)
    reused(p.session, progress)
    return p.libs.apply(pred, [spec])


def _held(cfg: PredictConfig, model: Any, tokenizer: Any, sae: Any) -> tuple[PredictConfig, Any, Any]:
    """The objects a notebook passes, wrapped as the loaders return them (None where not passed);
    the embedded model and SAE named in `cfg` where neither an object nor a name was given."""
    if cfg.model == "" and model is None or cfg.sae == "" and sae is None:
        from sts.data.embedded import default_sae_dir
        from sts.engine.models import default_model_dir

        cfg = dataclasses.replace(cfg, model=cfg.model or (str(default_model_dir()) if model is None else ""),
                                  sae=cfg.sae or (str(default_sae_dir()) if sae is None else ""))
    lm = loaded_sae = None
    if model is not None:
        from sts.engine.models import LoadedModel

        if tokenizer.pad_token_id is None:  # padding is masked out; any id will do
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"
        lm = LoadedModel(model.eval(), tokenizer, cfg.model or getattr(model, "name_or_path", "model"))
    if sae is not None:
        from sts.engine.saes import LoadedSAE

        loaded_sae = LoadedSAE(sae.eval(), cfg.sae or "sae")
    return cfg, lm, loaded_sae


def prepare(cfg: PredictConfig | None = None, train: Dataset | None = None,
            domains: dict[str, list[Example]] | None = None, progress: Callable[[str], None] = lambda _m: None,
            demos: DomainDemos | None = None, *, model: Any = None, tokenizer: Any = None, sae: Any = None
            ) -> Prepared:
    """Shift statistics of the training set, per-domain statistics, then the score per domain.

    The Python API: `train`/`domains` default to `cfg.train`/`cfg.domains` read as the CLI
    reads them (`cfg.max_train` examples; `cfg.max_examples` questions per domain, training
    questions left out); `model` + `tokenizer` (a transformers causal LM and its tokenizer,
    on any device and in any dtype) and `sae` (a sae_lens SAE) are used as given instead of
    loading `cfg.model`/`cfg.sae`. For the icl score without `demos`, demonstrations come from
    `cfg.domain_demos`, or from each domain's first `cfg.domain_demos_n` questions, which are
    then not scored.

    Loads what the prediction reads and checks it (bad input fails here, before any model
    pass); `predict` / `sts.prediction.compare.predict` then run it."""
    from sts.data.datasets import sets_and_domains

    cfg = cfg or PredictConfig()
    if (model is None) != (tokenizer is None):
        raise UserError("pass model and tokenizer together (a transformers causal LM and its tokenizer)")
    several = isinstance(cfg.train, list)
    if several and train is not None:
        raise UserError("several training sets are named in cfg.train (a list of specs), not passed as `train`")
    specs = candidate_specs(cfg)
    sets: dict[str, Dataset] = {}
    if train is not None:
        sets = {specs[0]: train}
    if train is None or domains is None:
        extra = cfg.domain_demos_n if cfg.score and uses_domain_demos(cfg.score) and demos is None else 0
        loaded_sets, loaded_domains = sets_and_domains(
            specs, cfg.domains, cfg.max_train, None if cfg.max_examples is None else cfg.max_examples + extra,
            cfg.skip_bad_lines)
        sets, domains = sets or loaded_sets, domains or loaded_domains
    chosen = ""
    if not cfg.score:
        cfg = dataclasses.replace(cfg, score=score_for(domains))
        chosen = (f"score {cfg.score}: {'every' if cfg.score == DEFAULT_SCORE else 'not every'} domain record holds a "
                  "reference chain of thought (--score chooses another)")
    cfg.refuse_unused_for_score()
    if uses_domain_demos(cfg.score) and demos is None:
        demos, domains = domain_demonstrations(domains, cfg.domain_demos_n, cfg.domain_demos, cfg.skip_bad_lines)
        if cfg.max_examples is not None:
            domains = {d: q[: cfg.max_examples] for d, q in domains.items()}
    _, _, domain_pairs, texts = needs((cfg.score,))
    if texts or domain_pairs:  # sealed domains ship no text: refused before a model is built
        unsealed((e for q in domains.values() for e in q), f"the {cfg.score} score")
    if spec_of(cfg.score).reads("lookahead"):
        check_lookahead(cfg, domains)
    cfg, lm, loaded_sae = _held(cfg, model, tokenizer, sae)
    # before anything loads: a library that cannot serve fails here, one of another side is left out
    side = side_label(spec_of(cfg.score).run_based, cfg.domains, (e for q in domains.values() for e in q))
    lib, note = library(cfg, side)
    cal_lib, cal_note = calibration_library(cfg, lib, side)
    libs = Libraries(lib, note, cal_lib, cal_note, bool(cfg.calibrate), side)
    session = Session(cfg, progress, lm, loaded_sae)
    check_extraction(cfg, domains, (cfg.score,), demos, session)  # bad input fails before the plan line
    return Prepared(cfg, sets, domains, demos, session, libs, chosen)


def prediction(cfg: PredictConfig, extraction: Extraction, score: str, train: Dataset,
               session: Session | None = None) -> Prediction:
    """One score of an Extraction as a Prediction (with top contexts of the shifted SAE features)."""
    scores, tokens, shift, samples = score_extraction(cfg, extraction, score)
    on_sae = spec_of(score).readout == Readout.SAE
    if shift is None and explains(cfg, (score,)) and Readout.SAE in extraction.shift:
        values = extraction.shift[Readout.SAE].sum_sq_diff.double()  # STS_act's selection of S
        shift, on_sae = Shift(values, top_features(values, min(cfg.k, values.shape[0]))), True  # only shown
    features: list[FeatureReport] = []
    if shift is not None:
        contexts: dict[int, list[dict[str, Any]]] = {}
        if cfg.top_contexts > 0 and on_sae and session is not None:
            sample = train.examples[: defaults.CONTEXT_EXAMPLES]  # a bounded read: contexts only illustrate
            contexts = session.cache.get_or_compute_json(
                contexts_key(session, cfg, train, shift.features),
                lambda: _contexts(session.engine(), sample, training_render(cfg.method), shift.features, cfg))
        features = [FeatureReport(j, float(shift.values[j]), contexts.get(j, []))
                    for j in shift.features]
    readout = spec_of(score).readout
    train_tokens = extraction.shift[readout].a.count if readout else 0
    if spec_of(score).reads("gradients") and extraction.gradients is not None:
        train_tokens = extraction.gradients.tokens
    truncation = {}
    if readout and "truncation" in extraction.shift[readout].meta:
        truncation["train"] = extraction.shift[readout].meta["truncation"]
    if uses_domain_demos(score):
        truncation["domains"] = {d: st.meta.get("truncation", {}) for d, st in extraction.domain_icl.items()}
    generated = ([{"id": e.uid, "prompt": e.prompt, "response": e.response or ""} for e in train.examples]
                 if cfg.responses == "generated" else None)
    spec = spec_of(score)
    attribution = (attributed(extraction.gradients, gradient_train(cfg, train))
                   if spec.kind.name == "gradient" and spec.direction == "G" and extraction.gradients is not None
                   else None)
    return Prediction(config=dataclasses.replace(cfg, score=score), hook=extraction.hook, scores=scores,
                      tokens=tokens, questions=dict(extraction.questions), train_tokens=train_tokens, features=features,
                      samples=samples, score=score, demonstrations=extraction.demos.describe()
                      if uses_domain_demos(score) and extraction.demos else None,
                      truncation=truncation, generated=generated, attribution=attribution)


def attributed(grads: Any, train: Dataset) -> Attribution | None:
    """`grad`'s terms as an Attribution of the examples it read (None where the training side kept
    no per-example rows: a mixture, or a side cached before they were kept)."""
    parts = grads.contributions()
    if parts is None or grads.example_index is None:
        return None
    names = list(parts)
    tokens = grads.example_tokens.tolist()
    examples = [{"position": pos, "id": train.examples[pos].uid, "tokens": int(t),
                 "excerpt": excerpt(train.examples[pos].prompt)} for pos, t in zip(grads.example_index, tokens)]
    terms = [[float(parts[d][i]) for d in names] for i in range(len(examples))]
    return Attribution(examples, names, terms, f"count sketch of {grads.sketch}" if grads.sketch else "exact")


def excerpt(text: str, width: int = 70) -> str:
    """A record's prompt on one line, cut to `width` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _contexts(engine: ex.Extractor, examples: list[Example], render: Render, features: list[int],
              cfg: PredictConfig) -> dict[int, list[dict[str, Any]]]:
    tok = engine.lm.tokenizer
    seqs = list(sequences(examples, tok, render, cfg.max_length))
    return top_contexts(engine, seqs, features, cfg.top_contexts, tok)
