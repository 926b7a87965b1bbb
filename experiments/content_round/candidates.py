"""Issue 53, item 4: the content round's candidates, as PREREGISTRATION.md defines them, computed
from each set's records and the shipped probe records only (no truth is read here). Resumable: every
side is cached under `$STS_CACHE/content-round/` as it finishes, and `candidates.json` (committed)
gains each set's scores as they are complete.

    .venv/bin/python -m experiments.content_round.candidates run   # the gradient and text candidates
    .venv/bin/python -m experiments.content_round.candidates sae   # the shipped scores and the SAE's
    .venv/bin/python -m experiments.content_round.candidates earlier   # both, on the 13 earlier sets (a report)

Stages (one heavy process; the gradient sides dominate: a backward pass per record):
- the probe records' sides: each domain's whole-reference mean gradient, and each record's
  content-span gradient (its row: their mean is the domain's content side, and the rows with the
  control's make `trackstar`'s basis), all through the shipped count sketch;
- each set's training side on its first 25 examples, each example's sketched row kept; the control's
  on all 100;
- RDS+'s pooled hidden states of each set's 100 records and of the probe records;
- then every candidate's 14 scores per set. The SAE candidates (`act-untemplated`,
  `cosine-untemplated`), `lexical` and `grad +lib` come from `sts predict`'s own machinery in the
  `sae` verb (a separate stage: they read the SAE and the shipped library, not new gradients).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from experiments.common import read_json, run_verb, write_json
from experiments.content_round import data as cr

OUT = cr.HERE / "candidates.json"
EARLIER = cr.HERE / "candidates-earlier.json"  # the thirteen earlier sets' (a report, not judged)
BIG = 1 << 16  # the shipped sketch
GRADIENT_EXAMPLES = 25  # as the shipped grad (defaults.GRADIENT_EXAMPLES)
COMPONENTS = 10  # trackstar's removed directions


def work() -> Path:
    from sts.cache import cache_root

    path = cache_root() / "content-round"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sets() -> dict[str, str]:
    """Folder name (as `sts validate` names it) -> spec, in run order."""
    from sts.data.datasets import load_dataset
    from sts.validation.plan import train_dir_name

    return {train_dir_name(i, load_dataset(t, max_examples=cr.SET_SIZE)): t for i, t in enumerate(cr.config().train)}


def probes() -> dict[str, list[Any]]:
    from sts.data.datasets import load_dataset

    return load_dataset(str(cr.DATA / "probes.jsonl")).by_domain()


def cached(path: Path, compute: Any, load: Any, secs: dict[str, float], name: str) -> Any:
    """A stage's value, read where an earlier run saved it (a side's own `save`, else torch.save)."""
    import torch

    if path.is_file():
        return load(path)
    started = time.perf_counter()
    value = compute()
    if hasattr(value, "save"):
        value.save(path)
    else:
        torch.save(value, path)
    secs[name] = round(time.perf_counter() - started, 1)
    return value


def probe_sides(lm: Any, model: Any, secs: dict[str, float]) -> tuple[dict[str, Any], Any, list[str]]:
    """(domain -> sketched whole-reference side, [140, BIG] sketched content rows, each row's domain)."""
    import torch

    from sts.engine.gradients import DomainGradients, domain_side, sketch

    recs = probes()
    whole = {}
    for d, exs in recs.items():
        side = cached(work() / f"whole-{cr_slug(d)}.safetensors",
                      lambda exs=exs, d=d: domain_side(lm, model, {d: exs}).sketched(BIG),
                      DomainGradients.load, secs, f"whole {d}")
        whole[d] = side.domains[d].double()
    rows, owner = [], []
    for d, exs in recs.items():
        for e in exs:
            path = work() / f"content-{cr_slug(d)}-{e.uid}.pt"
            rows.append(cached(path, lambda e=e, d=d: sketch(domain_side(lm, model, {d: [e]}, content=True)
                                                                .domains[d], BIG).float(),
                               torch.load, secs, f"content {d} {e.uid}").double())
            owner.append(d)
    return whole, torch.stack(rows), owner


def cr_slug(name: str) -> str:
    return name.replace(" ", "-")


def training(lm: Any, model: Any, name: str, spec_name: str, n: int, secs: dict[str, float]) -> Any:
    """The set's first `n` examples' sketched training side, each example's row kept."""
    from sts.data.datasets import load_dataset
    from sts.engine.gradients import PerExample, TrainingGradients, training_side
    from sts.engine.settings import FinetuneSpec

    spec = FinetuneSpec(max_steps=60, batch_size=4, seed=0)

    def compute() -> Any:
        exs = load_dataset(spec_name, max_examples=n).examples
        return training_side(lm, model, exs, spec, keep=PerExample(dim=BIG)).sketched(BIG)

    return cached(work() / f"train-{name}-{n}.safetensors", compute, TrainingGradients.load, secs, f"train {name}")


def pooled(lm: Any, name: str, examples: list[Any], secs: dict[str, float], side: str = "train") -> Any:
    import torch

    from experiments.baselines import pooled as pool

    return cached(work() / f"pooled-{name}.pt", lambda: pool(lm, examples, side), torch.load, secs, f"pooled {name}")


def scores_of(G: Any, rows: Any, whole: dict[str, Any], content_rows: Any, owner: list[str], G_ctrl: Any,
              basis: Any, pooled_train: Any, pooled_probes: Any, bm25: Any, texts: list[str]) -> dict[str, dict]:
    """Every gradient and text candidate's score per domain for one set."""
    domains = list(whole)
    content = {d: content_rows[[i for i, o in enumerate(owner) if o == d]].mean(0) for d in domains}

    def project(x: Any) -> Any:
        y = x - basis.T @ (basis @ x)
        return y / y.norm()

    out: dict[str, dict[str, float]] = {
        "grad": {d: float(G @ whole[d]) for d in domains},
        "grad-content": {d: float(G @ content[d]) for d in domains},
        "grad-ctrl": {d: float((G - G_ctrl) @ content[d]) for d in domains},
        "trackstar": {d: float(project(G) @ project(content[d])) for d in domains},
    }
    idx = {d: [i for i, o in enumerate(owner) if o == d] for d in domains}
    read = pooled_train[pooled_train.norm(dim=1) > 0]  # the records the gradient side reads
    sims = read @ pooled_probes.T  # [train, probes] cosines (unit rows)
    out["rds+"] = {d: float(sims[:, idx[d]].mean()) for d in domains}
    out["bm25"] = {d: sum(bm25.score(t, j) for t in texts for j in idx[d]) / (len(texts) * len(idx[d]))
                   for d in domains}
    z = {k: _z(v) for k, v in out.items()}
    out["bm25+grad"] = {d: z["bm25"][d] + z["grad"][d] for d in domains}
    return out


def _z(v: dict[str, float]) -> dict[str, float]:
    import statistics

    m, s = statistics.mean(v.values()), statistics.pstdev(v.values())
    return {k: (x - m) / s if s else 0.0 for k, x in v.items()}


def earlier_sets() -> dict[str, str]:
    """The thirteen earlier sets (transfer, held-out, second round): folder name -> spec. The
    pre-registration has them report only, on `cot_nll` over the 10 categories they measured."""
    from experiments.beyond.candidates import NEW
    from experiments.probes.probes import HELDOUT, TRANSFER

    return {**TRANSFER, **HELDOUT, **NEW}


def judged_sets(earlier: bool) -> tuple[dict[str, str], dict[str, str]]:
    """(the round's sets, the sets a stage scores: the round's after its control, or the earlier ones)."""
    named = sets()
    return named, earlier_sets() if earlier else dict(list(named.items())[1:])


def complete(done: dict[str, Any], key: str, judged: dict[str, str]) -> bool:
    """Whether every judged set already has the stage's scores (`key` is one it writes): a new
    machine then need not rebuild the cached sides nor load the model."""
    return all(key in done["scores"].get(name, {}) for name in judged)


def run(earlier: bool = False) -> None:
    """The gradient and text candidates of the round's sets (`earlier`: of the thirteen earlier
    sets, into EARLIER, against the same control and probe records)."""
    import torch

    from experiments.baselines import BM25, text_of
    from sts.data.datasets import load_dataset
    from sts.engine.gradients import adapted
    from sts.engine.models import default_model_dir, load_model
    from sts.engine.settings import FinetuneSpec

    out = EARLIER if earlier else OUT
    done = read_json(out, {"seconds": {}, "scores": {}})
    secs = done["seconds"]
    named, judged = judged_sets(earlier)
    if complete(done, "grad", judged):
        return
    lm = load_model(str(default_model_dir()))
    model = adapted(lm, FinetuneSpec(max_steps=60, batch_size=4, seed=0))
    whole, content_rows, owner = probe_sides(lm, model, secs)
    write_json(done, out)
    control_name = next(iter(named))
    ctrl = training(lm, model, control_name, named[control_name], cr.SET_SIZE, secs)
    G_ctrl = ctrl.mean.double()
    unit = torch.cat([ctrl.rows.double(), content_rows])
    unit = unit / unit.norm(dim=1, keepdim=True)
    basis = torch.linalg.svd(unit, full_matrices=False).Vh[:COMPONENTS]  # top right singular vectors
    recs = probes()
    probe_list = [e for d in recs for e in recs[d]]
    pooled_probes = pooled(lm, "probes", probe_list, secs, side="domain")
    bm25 = BM25([text_of(e) for e in probe_list])
    for name, spec_name in judged.items():
        if "grad" in done["scores"].get(name, {}):
            continue
        side = training(lm, model, name, spec_name, GRADIENT_EXAMPLES, secs)
        hundred = load_dataset(spec_name, max_examples=cr.SET_SIZE).examples
        got = scores_of(side.mean.double(), side.rows, whole, content_rows, owner, G_ctrl, basis,
                        pooled(lm, name, hundred, secs), pooled_probes, bm25, [text_of(e) for e in hundred])
        done["scores"].setdefault(name, {}).update(got)
        write_json(done, out)
        print(f"{name}: done", file=sys.stderr, flush=True)


def shipped(spec_name: str) -> dict[str, Any]:
    """What `sts predict` reads of a set by default (the embedded model, SAE and sealed domains):
    its SAE shift and the domains' readouts (act), its mean residual (cosine), its text (lexical),
    and `grad` with the shipped library (`grad +lib`: shared + own)."""
    from sts.prediction.compare import predict
    from sts.prediction.config import PredictConfig
    from sts.prediction.extraction import extract_all
    from sts.prediction.predict import prepare

    # the probe records from their file (the same records as the sealed domains): the release ships
    # their SAE readout but not the residual means `cosine` reads
    p = prepare(PredictConfig(train=spec_name, domains=str(cr.DATA / "probes.jsonl"), score="act", library="none",
                              calibrate=["none"]))
    train = next(iter(p.sets.values()))
    x = extract_all(p.cfg, train, p.domains, ("act", "cosine"), p.demos, lambda _m: None, p.session)
    lib = predict(PredictConfig(train=spec_name, score="grad", calibrate=["none"]))
    return {"extraction": x, "grad+lib": lib.decomposition.combined if lib.decomposition else None}


def sae_scores(x: Any, control: Any, k: int = 400) -> dict[str, dict[str, float]]:
    """act and cosine as shipped, and their untemplated forms: `act-untemplated` selects the
    set's top-k shifted SAE features outside the control set's top-k (the features any CoT set
    moves); `cosine-untemplated` takes the cosine of the mean residuals with the control's mean
    residual direction projected out of both (the residual has no features: one direction)."""
    import torch

    from sts.choices import Readout
    from sts.scores.baselines import cosine, cosine_scores
    from sts.scores.score import domain_feature_values, score, spec_of
    from sts.scores.selection import top_features

    sae, raw = x.shift[Readout.SAE], x.shift[spec_of("cosine").readout]
    values, _ = domain_feature_values("act", x.domains[Readout.SAE], {})
    out = {"act": score(sae.sum_sq_diff.double(), values, k, "sum")[1]}
    template = set(top_features(control.shift[Readout.SAE].sum_sq_diff.double(), k))
    masked = sae.sum_sq_diff.double().clone()
    masked[sorted(template)] = -float("inf")
    out["act-untemplated"] = score(masked, values, k, "sum")[1]
    domains = x.domains[spec_of("cosine").readout]
    out["cosine"] = cosine_scores(raw.a, domains)
    c = control.shift[spec_of("cosine").readout].a
    u = (c.sum / c.count).double()
    u = u / u.norm()

    def off(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        return v - (v @ u) * u

    mean = off(raw.a.sum / raw.a.count)
    out["cosine-untemplated"] = {d: cosine(mean, off(st.sum / st.count)) for d, st in domains.items()}
    return out


def lexical(spec_name: str) -> dict[str, float]:
    """`lexical` (TF-IDF, as shipped) against the probe records' texts: the sealed domains ship none,
    so the round's own copy of them stands in (the same records)."""
    from sts.data.datasets import load_dataset
    from sts.prediction.config import PredictConfig
    from sts.scores.baselines import domain_text, lexical_scores, training_text

    train = load_dataset(spec_name, max_examples=PredictConfig().max_train).examples
    return lexical_scores(training_text(train), {d: domain_text(q) for d, q in probes().items()})


def sae(earlier: bool = False) -> None:
    """The shipped scores' stage: act, cosine, lexical, their untemplated forms and grad +lib, per
    set (`earlier`: of the thirteen earlier sets, into EARLIER)."""
    out = EARLIER if earlier else OUT
    done = read_json(out, {"seconds": {}, "scores": {}})
    named, judged = judged_sets(earlier)
    if complete(done, "act", judged):
        return
    control_name = next(iter(named))
    control = shipped(named[control_name])["extraction"]
    for name, spec_name in judged.items():
        if "act" in done["scores"].get(name, {}):
            continue
        started = time.perf_counter()
        got = shipped(spec_name)
        scores = sae_scores(got["extraction"], control) | {"lexical": lexical(spec_name)}
        if got["grad+lib"] is not None:
            scores["grad +lib"] = got["grad+lib"]
        done["scores"].setdefault(name, {}).update(scores)
        done["seconds"][f"shipped {name}"] = round(time.perf_counter() - started, 1)
        write_json(done, out)
        print(f"{name}: shipped scores done", file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    run_verb({"run": run, "sae": sae, "earlier": lambda: (run(earlier=True), sae(earlier=True))}, argv,
             "experiments.content_round.candidates")


if __name__ == "__main__":
    main(sys.argv[1:])
