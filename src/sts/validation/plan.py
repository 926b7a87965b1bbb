"""The plan of a validation: its stages per training set, the settings that key each stage (every
setting that changes its outputs) and the prediction settings each stage passes on.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sts import defaults
from sts.analysis import library
from sts.choices import Method, Metric
from sts.data.datasets import DomainDemos, domain_demonstrations
from sts.data.examples import Dataset, Example
from sts.scores.score import gradient_scores, shift_scores
from sts.validation.config import Inputs, ValidateConfig, read_inputs


@dataclass(frozen=True)
class Step:
    """One stage of a validation: what it does (icl, finetune, evaluate, sft, reference), the name
    of its manifest and the settings that key it. `Plan.base_steps` and `Plan.set_steps` write the
    sequence once; `validate` runs it and `Plan.stage_settings` lists it."""

    kind: str
    name: str
    settings: dict[str, Any]


def train_dir_name(i: int, ds: Dataset) -> str:
    """train-K-NAME: the order given, and a readable name of the spec."""
    stem = Path(ds.spec.split("#")[0]).stem if not ds.spec.startswith("embedded:") else ds.spec.split(":", 1)[1]
    sel = ds.spec.split("#", 1)[1].split("=", 1)[-1] if "#" in ds.spec else ""
    name = re.sub(r"[^A-Za-z0-9]+", "-", f"{stem}-{sel}" if sel else stem).strip("-")[:40]
    return f"train-{i + 1}-{name}"


@dataclass
class Plan:
    """What every stage of one validation shares: the config (model and SAE resolved), the
    data, and each kind of stage's settings (the JSON whose hash keys it: every option that
    changes its outputs, and the ids of its examples)."""

    cfg: ValidateConfig
    inputs: Inputs
    demos: DomainDemos
    predict_domains: dict[str, list[Example]]
    eval_domains: dict[str, list[Example]]

    @property
    def extra(self) -> dict[str, Any]:
        """Settings that change every stage's outputs but were not in the keys of the first
        runs: recorded only away from those runs' values, so that their stages still verify."""
        dtype = self.cfg.placement.describe()["dtype"]  # statistics in another precision are others
        return {} if dtype == "float32" else {"dtype": dtype}

    def evaluation(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model, "questions": {d: [e.uid for e in q] for d, q in self.eval_domains.items()},
                "shots": c.shots, "likelihoods": c.likelihoods} | self.extra

    def reference(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "records": {d: [e.uid for e in q] for d, q in self.inputs.reference.items()},
                "spec": self.cfg.reference} | self.extra

    def prediction(self, train: Dataset) -> dict[str, Any]:
        from sts.engine.gradients import first_step_key

        c = self.cfg
        # the scores computed are part of the key: a release that adds one recomputes these stages
        # (from the extraction cache) instead of reusing files that lack it
        first = {} if c.first_token == defaults.PREDICT_FIRST_TOKEN else {"first_token": c.first_token}
        return {"train": [asdict(e) for e in train.examples], "sae": c.sae, "model": c.model, "k": c.k,
                "demos": c.demos, "seed": c.seed, "max_length": c.max_length, "score": c.score,
                "scores": [list(c.icl_scores), list(shift_scores())],
                "questions": {d: [e.uid for e in q] for d, q in self.predict_domains.items()},
                "domain_demos": self.demos.describe()} | first | self.extra | (
                    {"gradients": first_step_key(c.finetune)} if c.gradients else {}) | (
                    {"gradient_loss": "content"} if self.gradient_content else {}) | (
                    {"probes": self.inputs.probes.describe()} if self.inputs.probes else {})

    def sides(self) -> dict[str, str]:
        """What each score's domain side read (`library.side_label`): the gradient scores their
        probe records (the ground truth's loss), every other score the domain questions."""
        c, probes = self.cfg, self.inputs.probes
        return {s: library.side_label(True, probes.source, (e for q in probes.probes.values() for e in q))
                if s in gradient_scores() and probes else
                library.side_label(False, c.domains, ()) for s in c.icl_scores}

    @property
    def gradient_content(self) -> bool:
        """Whether the gradient scores' domain side takes cot_nll_content's loss: the loss the
        primary ground truth measures, on the reference records."""
        return self.cfg.metric == Metric.COT_NLL_CONTENT and bool(self.inputs.reference)

    def finetuning(self, train: Dataset) -> dict[str, Any]:
        return {"train": [asdict(e) for e in train.examples], "model": self.cfg.model,
                "spec": asdict(self.cfg.finetune)} | self.extra

    def base_steps(self) -> list[Step]:
        """The base model's evaluations, before any training set: its questions, its reference records."""
        steps = [Step("evaluate", "evaluate base", self.evaluation())] if self.cfg.question_evaluation else []
        if self.inputs.reference:
            steps.append(Step("reference", "evaluate base (reference)", self.reference()))
        return steps

    def set_steps(self, i: int, train: Dataset) -> list[Step]:
        """One training set's stages, in the order `validate` runs them: predict (icl) -> finetune
        -> evaluate tuned -> predict (sft) -> evaluate tuned on the reference records."""
        c, names = self.cfg, stage_names(train_dir_name(i, train))
        predicted = self.prediction(train)  # the icl and sft predictions share their settings
        steps = [Step("icl", names["icl"], predicted),
                 Step("finetune", names["finetune"], self.finetuning(train))]
        if c.question_evaluation:
            steps.append(Step("evaluate", names["evaluate"], self.evaluation() | {"model": "tuned"}))
        if c.sft_shift:
            steps.append(Step("sft", names["sft"], predicted))
        if self.inputs.reference:
            steps.append(Step("reference", names["reference"], self.reference() | {"model": "tuned"}))
        return steps

    def stage_settings(self) -> dict[str, dict[str, Any]]:
        """Every stage's name and settings, as `validate` runs them (and keys their manifests)."""
        steps = self.base_steps() + [s for i, t in enumerate(self.inputs.trains) for s in self.set_steps(i, t)]
        return {s.name: s.settings for s in steps}

    def load(self, model: str) -> Any:
        from sts.engine.models import load_model

        p = self.cfg.placement
        return load_model(model, p.dtype, p.device, p.device_map)

    def predict_config(self, train: Dataset, method: Method, tuned: Path) -> Any:
        """A prediction stage's config: the shared fields as they are (`SharedConfig`), and this
        set, method and score."""
        from sts.prediction.config import PredictConfig, SharedConfig

        c = self.cfg
        shared = {f.name: getattr(c, f.name) for f in dataclasses.fields(SharedConfig)}
        return PredictConfig(**shared, train=train.spec, domains=c.domains, method=method,
                             tuned_model=str(tuned) if method == "sft" else None, max_train=len(train.examples),
                             max_examples=c.predict_examples, probe_records=c.probe_records, score=c.score,
                             gradient_content=self.gradient_content)


def stage_names(set_name: str) -> dict[str, str]:
    """The names of one training set's stages (its manifests are stages/NAME.json)."""
    return {"icl": f"{set_name}: predict (icl)", "finetune": f"{set_name}: finetune",
            "evaluate": f"{set_name}: evaluate tuned", "sft": f"{set_name}: predict (sft)",
            "reference": f"{set_name}: evaluate tuned (reference)"}


def plan(cfg: ValidateConfig) -> Plan:
    """Resolve the embedded model and SAE, check that they pair, and read the data."""
    from sts.data.embedded import default_sae_dir
    from sts.engine.extract import check_fits
    from sts.engine.models import default_model_dir, parse_hook_name
    from sts.engine.saes import load_sae

    cfg = dataclasses.replace(cfg, model=cfg.model or str(default_model_dir()), sae=cfg.sae or str(default_sae_dir()))
    loaded = load_sae(cfg.sae)  # a bad SAE/model pair fails before any data is read
    check_fits(loaded, parse_hook_name(loaded.hook_name), cfg.model)
    return plan_data(cfg)


def plan_data(cfg: ValidateConfig) -> Plan:
    """The Plan of a config whose model and SAE are given: the data read, nothing loaded."""
    inputs = read_inputs(cfg)
    demos, domains = domain_demonstrations(inputs.domains, cfg.domain_demos_n, cfg.domain_demos)
    return Plan(cfg, inputs, demos, {d: q[: cfg.predict_examples] for d, q in domains.items()},
                {d: q[: cfg.eval_examples + cfg.shots] for d, q in domains.items()})
