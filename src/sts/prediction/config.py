"""`sts predict`'s settings (`PredictConfig`) and their rules, checked when built; which score a
prediction reads when none is given (`score_for`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sts import defaults
from sts.choices import Method, Responses, parse
from sts.data.examples import Example
from sts.defaults import DEFAULT_K, DEFAULT_SCORE
from sts.engine.settings import BATCH_SIZE_HELP, BATCH_TOKENS_HELP, FinetuneSpec, Generation, Placement
from sts.errors import UserError, check_positive, refuse_unused
from sts.options import option
from sts.scores.score import check_score, spec_of


@dataclass
class SharedConfig:
    """The settings `sts predict` and `sts validate` share, written once: `ValidateConfig` extends
    this class, and a validation's prediction stages copy these fields into their `PredictConfig`
    (`sts.validation.plan.Plan.predict_config`)."""

    model: str = option("", help="model (default: the embedded SmolLM2-135M-Instruct)")
    sae: str = option("", help="SAE (default: the embedded SmolLM2 SAE)")
    k: int = option(DEFAULT_K, min=1, help="number of shifted features")
    demos: int = option(defaults.DEMOS, min=1, help="in-context demonstrations per training example (icl shift)")
    seed: int = option(defaults.SEED, help="seed (demonstrations, generation, fine-tuning, bootstrap)")
    max_length: int | None = option(defaults.MAX_LENGTH, min=1, help="truncate each model input to N tokens (ICL "
                                    "pairs: the example is cut, never its demonstrations; CHAMP pairs are ~830 tokens "
                                    "at the median)")
    batch_size: int | None = option(None, min=1, help=BATCH_SIZE_HELP)  # None: --batch-tokens decides
    # padded tokens per forward pass; sequences are sorted by length
    batch_tokens: int = option(defaults.BATCH_TOKENS, min=1, help=BATCH_TOKENS_HELP)
    placement: Placement = field(default_factory=Placement)  # --device, --dtype, --device-map
    use_cache: bool = option(True, flag="--cache/--no-cache", help="reuse cached extraction")
    # count each domain question's first token (the attention sink)
    first_token: bool = option(defaults.PREDICT_FIRST_TOKEN, help="count each domain question's first token (the "
                               "attention sink; left out by default)")
    domain_demos: str | None = option(None, help="icl score: dataset with each domain's demonstrations (MMLU-Pro "
                                      "records with cot_content use the chain of thought); default: each domain's "
                                      "first m questions, then left out of every score")
    domain_demos_n: int = option(defaults.DOMAIN_DEMOS_N, min=1, help="icl score: demonstrations per domain (m, as "
                                 "the paper)")
    # the fine-tuning run: the gradient scores (grad, grad-adam) take its first step, `sts validate` runs it
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)


@dataclass
class PredictConfig(SharedConfig):
    """Everything a prediction depends on. `model` and `sae` name what to load ("" = the
    embedded SmolLM2-135M and its SAE); in the Python API they may instead be passed to
    `predict` as loaded objects, and then only label the results."""

    # a dataset spec; or several to compare (`sts.prediction.compare`), or weighted parts of one mixture
    # (["A:0.7", "B:0.3"], `sts.engine.mixture`): `predict` then returns a Comparison
    train: str | list[str] = option(
        defaults.TRAIN, cli_type=list[str], help="training set (default: CHAMP, 270 competition-math problems with "
        "worked solutions, embedded; `embedded:mmlu#category=math` for MMLU math questions, held out of the math "
        "domain); repeat to compare sets (one table), or give weights (A:0.7 --train B:0.3) to predict that mixture")
    domains: str = option(defaults.PREDICT_DOMAINS, help="downstream domains: a dataset with domain labels; records "
                          "with a reference chain of thought (MMLU-Pro's cot_content) give the validated form. "
                          "Default: MMLU-Pro's 14 categories on reference chains of thought, shipped as statistics "
                          "(embedded:mmlu-pro-cot); embedded:mmlu: MMLU's plain questions")
    method: Method = option(defaults.METHOD, help="shift method: icl, sft (with --tuned-model), paper, or data (the "
                            "training responses vs the base model's own answers to the same prompts, per-example "
                            "means; generation as --temperature, --max-new-tokens)")
    tuned_model: str | None = option(None, help="fine-tuned model for --method sft")
    max_train: int | None = option(defaults.PREDICT_MAX_TRAIN, min=1, help="training examples used (CHAMP pairs run "
                                   "to ~830 tokens with their 2 demonstrations: 100 keep a cold run near 10 minutes on "
                                   "2 CPU cores)")
    max_examples: int | None = option(defaults.PREDICT_MAX_EXAMPLES, min=1, help="questions per domain")
    max_tokens: int | None = option(None, min=1, help="tokens per domain")
    # the gradient and lookahead scores' domain side reads at most this many records a domain, drawn
    # (seeded) as `sts validate` draws its probe records (`sts.data.references.probe_draw`)
    probe_records: int = option(defaults.PROBE_RECORDS, min=1, help="grad, grad-adam, grad-sign, line, look, look-fo: "
                                "reference chains of thought a domain the domain side reads, drawn (seeded) where a "
                                "domain has more (the validated form read 10: docs/results/probes); a domain of plain "
                                "questions is read whole (--max-examples)")
    top_contexts: int = defaults.TOP_CONTEXTS
    # a registered score (`sts.scores.score.REGISTRY`); "": chosen by the domains' records (`score_for`)
    score: str = option("", metavar="SCORE", help="domain score: {choices} (`sts scores` lists each one's formula "
                        f"and what it reads); default: {DEFAULT_SCORE} where every domain record holds a reference "
                        f"chain of thought (docs/results/probes), else {defaults.PLAIN_SCORE} (docs/results/plain)")
    # "dataset": read features on each training record's own response; "generated": on the base
    # model's answer to its prompt (the reference extraction), sampled as `generation` says
    responses: Responses = option(defaults.RESPONSES, help="dataset: read features on each record's own response; "
                                  "generated: on the base model's answer to each prompt, as the reference extraction "
                                  "does (vLLM with a GPU, transformers otherwise)")
    generation: Generation = field(default_factory=Generation)
    skip_bad_lines: bool = option(False, help="skip malformed JSONL lines of the training and domain files with a "
                                  "warning")
    # measured runs on this model and SAE that split the prediction into shared and own parts
    # (`sts.analysis.library`): a library.json or `sts validate` folder; None: the embedded one with the
    # embedded SAE, else none; "" or "none": none
    library: str | None = option(None, help="measured runs on this model and SAE (library.json of `sts validate`, or "
                                 "its folder) that split each domain's prediction into a shared part (what any such "
                                 "training did) and this set's own; default: the embedded library with the embedded "
                                 "SAE; none: no split")
    # libraries (library.json or `sts validate` folders) that calibrate scores into changes in
    # the metric's units with intervals (`sts.analysis.calibration`); None: the --library one; [] or ["none"]: none
    calibrate: list[str] | None = option(None, help="`sts validate` folders (or library.json) on this model and SAE "
                                         "that calibrate scores into changes in the metric's units with 90% intervals "
                                         "(repeat to pool); default: the --library one; none: no calibration")
    target: list[str] | None = option(None, help="domain(s) to choose a training set for (DOMAIN[,DOMAIN]; several "
                                      "--train): ranks the sets by their mean predicted change there, with the margin "
                                      "between the first two against its bootstrap uncertainty")
    # also score the mixtures of the 2-3 sets on a grid of this step (1/N); None: the grid of
    # `defaults.TARGET_MIX_GRID` when --target chooses among 2-3 unweighted sets, else 0
    mix_grid: int | None = option(None, min=0, help="also predict every mixture of the 2-3 --train sets on a grid of "
                                  "step 1/N (from their statistics: no new model pass); default: "
                                  f"{defaults.TARGET_MIX_GRID} with --target and 2-3 sets, else 0")
    # a score over no shifted features (cosine, lexical, grad, grad-adam) still reads the training
    # set's SAE shift and reports its top k features as the explanation of the ranking (the held-out
    # round's pre-registration: a default that needs no SAE keeps the SAE's account of the data);
    # False: skip that pass (for these scores, the only use of the SAE)
    explain: bool = option(True, help="a score over no shifted features (cosine, lexical, grad, grad-adam) still reads "
                           "the training set's SAE shift and prints its top --k features as the explanation; "
                           "--no-explain skips that pass")
    gradient_examples: int = option(defaults.GRADIENT_EXAMPLES, min=0, help="grad, grad-adam, grad-sign, line: the "
                                    "training side's backward passes read the first N training examples (0: all of "
                                    "them; 25 of 100 keep the ranking: docs/results/subset)")
    explain_examples: int = option(defaults.EXPLAIN_EXAMPLES, min=0, help="the explanation reads the SAE shift of the "
                                   "first N training examples (0: all of them; a score over the shifted features "
                                   "always reads all)")
    # the gradient scores compare both sides through a count sketch of this dimension (`sts.engine.gradients`;
    # 0: exact); the sketched domain sides of the embedded default ship with the package
    gradient_sketch: int = option(defaults.GRADIENT_SKETCH, min=0, help="grad, grad-adam, grad-sign, look-fo: compare "
                                  "the training and domain gradients through a seeded count sketch of this dimension "
                                  "(LESS-style; the embedded domains' sketched sides ship with sts); 0: exact")
    # the gradient scores' domain side leaves the references' templated openings out of its loss
    # (cot_nll_content's tokens; `sts validate --metric cot_nll_content` sets it); a record with no
    # reference chain of thought keeps its correct option's loss
    gradient_content: bool = False
    # line, look, look-fo: the optimizer steps of the fine-tuning run the score looks ahead (`sts.engine.lookahead`)
    steps: int = option(defaults.LOOKAHEAD_STEPS, min=1, help="line, look, look-fo: the optimizer steps of the "
                        "fine-tuning run the score looks ahead (step 1 moves nothing: the warm-up starts at lr 0)")

    def __post_init__(self) -> None:
        """Every rule between fields, checked once: a bad config fails before anything loads."""
        if isinstance(self.train, (list, tuple)):
            from sts.engine.mixture import candidates, default_grid, parse_part

            self.train = list(self.train)
            if self.mix_grid is None:
                self.mix_grid = default_grid(self.train, self.target)
            candidates(self.train, self.mix_grid)  # a bad list fails here, in one line
            if len(self.train) == 1 and parse_part(self.train[0]).weight is None:
                self.train = self.train[0]
        # one --seed: the generation's and the fine-tuning run's (the gradient scores' first step) too
        self.generation = dataclasses.replace(self.generation, seed=self.seed)
        self.finetune = dataclasses.replace(self.finetune, seed=self.seed)
        self.library = "" if self.library == "none" else self.library
        self.calibrate = [] if self.calibrate == ["none"] else self.calibrate
        several = isinstance(self.train, list)
        self.mix_grid = self.mix_grid or 0
        refuse_unused([("--mix-grid", self.mix_grid != 0 and not several, "it mixes several --train sets"),
                       ("--target", bool(self.target) and not several,
                        "it ranks several --train sets for those domains; give two or more")])
        self.method = parse(Method, self.method, "--method")
        self.score = check_score(self.score) if self.score else ""
        self.responses = parse(Responses, self.responses, "--responses")
        if self.method is Method.SFT and not self.tuned_model:
            raise UserError("--method sft needs --tuned-model (the fine-tuned model)")
        check_positive({"--k": self.k, "--demos": self.demos, "--max-train": self.max_train,
                        "--max-examples": self.max_examples, "--max-tokens": self.max_tokens,
                        "--max-length": self.max_length, "--batch-size": self.batch_size,
                        "--batch-tokens": self.batch_tokens, "--domain-demos-n": self.domain_demos_n,
                        "--steps": self.steps, "--probe-records": self.probe_records})
        if self.gradient_sketch < 0:
            raise UserError(f"--gradient-sketch must be 0 (exact) or a positive dimension (got {self.gradient_sketch})")
        self._refuse_what_changes_nothing()
        self.placement.resolved()  # a bad device or dtype fails here, in one line

    def _refuse_what_changes_nothing(self) -> None:
        """An option that this combination ignores is bad input: the user meant something else.
        (Rules that depend on the score are `refuse_unused_for_score`'s: `sts validate` reads
        every score from one config.)"""
        generated = self.responses is Responses.GENERATED or self.method is Method.DATA
        if self.responses is Responses.GENERATED and self.method is Method.DATA:
            raise UserError("--method data compares the dataset's responses with the model's own: drop "
                            "--responses generated")
        refuse_unused([("--tuned-model", self.tuned_model is not None and self.method is not Method.SFT,
                  "it is the shifted side of --method sft"),
                 ("--temperature", self.generation.temperature != defaults.TEMPERATURE and not generated,
                  "it samples --responses generated and --method data"),
                 ("--max-new-tokens", self.generation.max_new_tokens != defaults.MAX_NEW_TOKENS and not generated,
                  "it bounds --responses generated and --method data")])

    def refuse_unused_for_score(self) -> None:
        """The options that one score (`sts predict`'s) and this method leave unused."""
        spec = spec_of(self.score)
        refuse_unused([("--demos", self.demos != defaults.DEMOS and self.method in (Method.SFT, Method.DATA),
                  f"the {self.method} shift reads no demonstrations"),
                 ("--k", self.k != DEFAULT_K and not spec.uses_shift and not self.explain,
                  f"--score {self.score} does not use the shifted features, and --no-explain leaves them out"),
                 ("--no-explain", not self.explain and spec.uses_shift,
                  f"--score {self.score} reads the shifted features itself: they are its explanation"),
                 ("--domain-demos", self.domain_demos is not None and not spec.domain_demos,
                  f"--score {self.score} reads no domain demonstrations (the icl scores do)"),
                 ("--domain-demos-n", self.domain_demos_n != defaults.DOMAIN_DEMOS_N and not spec.domain_demos,
                  f"--score {self.score} reads no domain demonstrations (the icl scores do)"),
                 ("--gradient-sketch", self.gradient_sketch != defaults.GRADIENT_SKETCH and not spec.reads("gradients")
                  and spec.direction != "look-fo", f"--score {self.score} reads no gradient sides (grad, grad-adam, "
                  "grad-sign and look-fo do)"),
                 ("--gradient-examples", self.gradient_examples != defaults.GRADIENT_EXAMPLES
                  and not spec.reads("gradients") and spec.direction != "line",
                  f"--score {self.score} reads no training gradient (grad, grad-adam, grad-sign and line do)"),
                 ("--steps", self.steps != defaults.LOOKAHEAD_STEPS and not spec.reads("lookahead"),
                  f"--score {self.score} takes no step of the run (line, look and look-fo do)"),
                 ("--probe-records", self.probe_records != defaults.PROBE_RECORDS and not spec.reads("gradients")
                  and not spec.reads("lookahead"), f"--score {self.score} reads no domain gradient or loss (grad, "
                  "grad-adam, grad-sign, line, look and look-fo do)")])


def score_for(domains: dict[str, list[Example]]) -> str:
    """The score `sts predict` reads when none is given, by what the domains' records hold: the
    default (grad) where every record has a reference chain of thought (the validated form; a
    sealed embedded record is one), else `defaults.PLAIN_SCORE` (docs/results/plain's rule)."""
    from sts.data.examples import has_reference

    refs = all(has_reference(e) for q in domains.values() for e in q)
    return DEFAULT_SCORE if refs else defaults.PLAIN_SCORE


def candidate_specs(cfg: PredictConfig) -> list[str]:
    """The distinct dataset specs that `cfg.train` names (a mixture's parts without weights)."""
    if not isinstance(cfg.train, list):
        return [cfg.train]
    from sts.engine.mixture import candidates

    return list(dict.fromkeys(p.spec for c in candidates(cfg.train, cfg.mix_grid) for p in c.parts))
