"""Build the statistics that ship with the package (`src/sts/assets/cache/`), the same for
every user, so that a first `sts predict` (and `make demo`) reads them instead of computing them:
- the default domains, `embedded:mmlu-pro-cot`: MMLU-Pro's 14 categories, each read on its probe
  records (`defaults.PROBE_RECORDS` of the seeded draw that `docs/results/probes` committed, none
  of them in a committed training set or evaluation). Only their seals ship
  (`assets/domains-mmlu-pro-cot.json`: ids, digests, token counts), never their text, with their
  gradient sides sketched (`grad`, `grad-adam`) and their SAE readout (the SAE scores);
- the plain-question domains `embedded:mmlu` (14 categories x 100 MMLU questions): the same two;
- the embedded default's training side (CHAMP's first 100 problems): its gradients sketched (both
  directions, 1 MB; of the first `defaults.GRADIENT_EXAMPLES`), the SAE shift that explains them and
  its top contexts.
Exact gradients are read from your own cache (`~/.cache/sts` or `$STS_CACHE`) where a run
computed them, from `docs/results/probes`' exact chunks for the reference domains, else computed.
An entry already shipped under the same key is kept as it is.

They are ordinary cache entries (named by the sha256 of their key, with a sha256 sidecar):
the key holds the embedded model's and SAE's identities, the records (or their seals), the
rendering and the code version, so any change to those makes `sts predict` compute its own
instead (a sealed domain then says it cannot). Rerun this after such a change (a test fails
while the shipped entries no longer match the defaults); it reads ../shared/data:

    .venv/bin/python scripts/ship_domain_stats.py            # everything (hours on 2 CPU cores, cold)
    .venv/bin/python scripts/ship_domain_stats.py --demo     # the demo's training side only
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from sts import defaults
from sts.cache import SHIPPED, Cache, cache_root, key_digest
from sts.data.datasets import load_dataset, training_and_domains
from sts.data.embedded import REFERENCE_DOMAINS, REFERENCES, default_sae_dir
from sts.data.examples import Example, seal
from sts.defaults import DEFAULT_SCORE
from sts.engine.gradients import DomainGradients
from sts.engine.models import default_model_dir
from sts.files import atomic_path
from sts.prediction.config import PredictConfig
from sts.prediction.extraction import explained, extract_all, gradient_train
from sts.prediction.predict import prediction
from sts.prediction.session import Session, contexts_key, domain_key, gradient_domain_key, gradient_train_key, shift_key

ROOT = Path(__file__).resolve().parents[1]
PROBES = ROOT / "docs" / "results" / "probes"
DATA = ROOT.parent / "shared" / "data"
SOURCES = ("mmlu_pro_cot_train.jsonl", "mmlu_pro_cot_refs.jsonl")


def reference_domains(tokenizer: Any) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """(the real probe records, their seals) per category: the first PROBE_RECORDS of the
    committed draw. Writes the seals' manifest."""
    drawn = json.loads((PROBES / "probes.json").read_text())
    records = {e.uid: e for name in SOURCES for e in load_dataset(str(DATA / name)).examples}
    n = defaults.PROBE_RECORDS
    real = {d: [records[u] for u in uids[:n]] for d, uids in drawn["probes"].items()}
    sealed = {d: [seal(e, len(tokenizer(e.prompt + (e.cot or ""), add_special_tokens=False)["input_ids"]))
                  for e in q] for d, q in real.items()}
    manifest = {"format": "sts-sealed-domains/1", "spec": REFERENCE_DOMAINS, "probe_records": n,
                "seed": drawn["seed"], "source": "MMLU-Pro (TIGER-Lab, MIT licence): chains of thought of "
                "Llama-3.1-70B-Instruct's official runs, questions it answered correctly; drawn by "
                "experiments/probes/probes.py, none in a committed training set or evaluation",
                "records": [{"uid": s.uid, "domain": s.domain, **dataclasses.asdict(s.seal)}
                            for q in sealed.values() for s in q]}
    with atomic_path(REFERENCES) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    return real, sealed


def exact_reference_side(d: str, exs: list[Example], session: Session, cfg: PredictConfig) -> Any:
    """One reference domain's exact gradient side: docs/results/probes' chunks where they cover
    exactly these records (`probes.prefix_sides`: the same mean gradient), else computed."""
    from sts.engine.gradients import adapted, domain_side

    sys.path.insert(0, str(PROBES))
    import probes  # the experiment that drew these records and computed their sides

    sides = probes.prefix_sides(d, len(exs)) if len(exs) in probes.CHUNKS else None
    if sides is not None:
        mean, count = sides[len(exs)]
        return DomainGradients({d: mean.float()}, {d: count})
    lm = session.engine().lm
    return domain_side(lm, adapted(lm, cfg.finetune), {d: exs}, progress=print)


def main() -> None:
    cfg = PredictConfig(model=str(default_model_dir()), sae=str(default_sae_dir()), explain=False,
                        domains="embedded:mmlu", score=DEFAULT_SCORE)
    train, mmlu = training_and_domains(cfg.train, cfg.domains, cfg.max_train, cfg.max_examples)
    few = dataclasses.replace(train, examples=train.examples[: cfg.demos + 1])  # what the domains' pass needs
    shipped: dict[str, tuple[str, Path]] = {}  # digest -> (what, the folder it is copied from)
    grads = Session(cfg, print)
    grads.cache = Cache(cache_root(), shipped=SHIPPED)  # exact sides a run computed are reused, sketches written
    real, sealed = reference_domains(grads.engine().lm.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        session = Session(cfg, print)
        session.cache = Cache(Path(tmp), shipped=None)  # computed here, never read from what ships
        for domains in (mmlu, real):  # the SAE readout every SAE score reads
            extract_all(cfg, few, domains, ("act",), None, print, session)
        for name, exs in mmlu.items():
            shipped[key_digest(domain_key(session, cfg, exs) | {"readout": "sae"})] = (name, Path(tmp) / "extract")
        for name, exs in real.items():  # the statistics of the real records, under their seals' key
            digest = key_digest(domain_key(session, cfg, exs) | {"readout": "sae"})
            as_sealed = key_digest(domain_key(session, cfg, sealed[name]) | {"readout": "sae"})
            for suffix in (".safetensors", ".sha256"):
                shutil.copy(Path(tmp) / "extract" / f"{digest}{suffix}", Path(tmp) / "extract" / f"{as_sealed}{suffix}")
            shipped[as_sealed] = (f"{REFERENCE_DOMAINS} {name}", Path(tmp) / "extract")
        extract_all(cfg, few, mmlu, ("grad",), None, print, grads)
        dim = cfg.gradient_sketch
        for name, exs in mmlu.items():
            shipped[key_digest(gradient_domain_key(grads, cfg, name, exs, dim))] = (
                f"{name} (gradients, sketch {dim})", cache_root() / "extract")
        for name, exs in real.items():
            key = gradient_domain_key(grads, cfg, name, sealed[name], dim)
            def compute(_m: tuple[str, ...], name: str = name, exs: list[Example] = exs) -> dict[str, Any]:
                return {name: exact_reference_side(name, exs, grads, cfg).sketched(dim)}

            grads.cache.get_or_compute_many({name: key}, compute, DomainGradients.load, lambda g, path: g.save(path))
            shipped[key_digest(key)] = (f"{REFERENCE_DOMAINS} {name} (gradients, sketch {dim})",
                                        cache_root() / "extract")
        write(shipped | demo_entries(cfg, train, grads))


def demo_entries(cfg: PredictConfig, train: Any, grads: Session) -> dict[str, tuple[str, Path]]:
    """The demo's training side: the default score's sketched gradients (each example's row kept:
    the attribution), the explanation's SAE shift and its contexts, as `sts predict` with no
    arguments reads them (computed where neither shipped nor cached)."""
    demo = PredictConfig(model=cfg.model, sae=cfg.sae, score=DEFAULT_SCORE)  # the default on reference domains
    demo_domains = load_dataset(demo.domains).by_domain()
    extraction = extract_all(demo, train, demo_domains, (demo.score,), None, print, grads)
    shown = prediction(demo, extraction, demo.score, train, grads)
    out = {key_digest(gradient_train_key(grads, demo, gradient_train(demo, train), demo.gradient_sketch)): (
        f"{train.spec} (gradients, sketch {demo.gradient_sketch})", cache_root() / "extract")}
    out[key_digest(shift_key(grads, demo, explained(demo, train)) | {"readout": "sae"})] = (
        f"{train.spec} (the explanation's SAE shift)", cache_root() / "extract")
    if demo.top_contexts:
        out[key_digest(contexts_key(grads, demo, train, [f.index for f in shown.features]))] = (
            f"{train.spec} (top contexts)", cache_root() / "extract")
    return out


def demo_only() -> None:
    """`--demo`: only the demo's training side again (after a change to its key); every other
    shipped entry is kept as it is, and the training side it replaces is removed."""
    from safetensors import safe_open

    cfg = PredictConfig(model=str(default_model_dir()), sae=str(default_sae_dir()), explain=False,
                        domains="embedded:mmlu", score=DEFAULT_SCORE)
    train, _ = training_and_domains(cfg.train, cfg.domains, cfg.max_train, cfg.max_examples)
    grads = Session(cfg, print)
    grads.cache = Cache(cache_root(), shipped=SHIPPED)

    def training_side(path: Path) -> bool:
        with safe_open(str(path), "pt") as fh:
            return (fh.metadata() or {}).get("format") == "sts-gradients-train/1"

    kept = {p.name.split(".")[0]: ("kept", SHIPPED) for p in SHIPPED.glob("*.safetensors") if not training_side(p)}
    kept |= {p.name.split(".")[0]: ("kept", SHIPPED) for p in SHIPPED.glob("*.json")}
    write(kept | demo_entries(cfg, train, grads))


def write(shipped: dict[str, tuple[str, Path]]) -> None:
    """Copy each entry (and its sidecar) into SHIPPED unless it is there; remove what no key names."""
    SHIPPED.mkdir(parents=True, exist_ok=True)
    for digest, (name, folder) in shipped.items():
        for source in (SHIPPED, folder):  # an entry already shipped is kept as it is
            payload = next((p for p in (source / f"{digest}.safetensors", source / f"{digest}.json") if p.exists()),
                           None)
            if payload is not None:
                break
        else:
            sys.exit(f"{name}: entry {digest[:12]} was neither computed nor shipped")
        if payload.parent != SHIPPED:
            for path in (payload, source / f"{digest}.sha256"):
                shutil.copy(path, SHIPPED / path.name)
        print(f"shipped {name}: {digest[:12]}")
    for old in SHIPPED.iterdir():
        if old.name.split(".")[0] not in shipped:
            old.unlink()


if __name__ == "__main__":
    demo_only() if sys.argv[1:] == ["--demo"] else main()
