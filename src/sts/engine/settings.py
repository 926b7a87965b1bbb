"""The engine's settings: where models load (`Placement`), how responses are generated
(`Generation`), the fine-tuning recipe (`FinetuneSpec`), and the configs of the engine's verbs
(`sts extract`, `sts finetune`, `sts evaluate`, `sts train-sae`), each field with its option's
help (`sts.options`).

Why a module of its own: the command line builds its options from these dataclasses, and it must
not import torch to print its help, so nothing here imports torch at module level (the device and
dtype checks import it when they run).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sts import defaults
from sts.choices import Architecture, Format, Method, Mode, Readout, ReportTo, Responses, Tokens, parse
from sts.data.inputs import Render, domain_render, training_render
from sts.errors import UserError, check_positive, refuse_unused
from sts.options import option

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
BATCH_TOKENS_HELP = ("padded tokens per forward pass; sequences are sorted by length to keep padding small (raise it "
                     "on a GPU: 32768 and more)")
BATCH_SIZE_HELP = "at most N sequences per forward pass (default: no cap; --batch-tokens sizes batches)"
SKIP_HELP = "skip malformed JSONL lines with a warning instead of failing"
MODEL_HELP = "model (default: the embedded SmolLM2-135M-Instruct)"


def resolve_device(name: str = "auto") -> str:
    """`auto`: cuda, then mps, then cpu; otherwise the device named (cpu, cuda, cuda:N, mps),
    checked to exist so that a typo or a CPU-only PyTorch fails in one line, not deep in a run."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: PyTorch sees no CUDA device here (build {torch.__version__}); "
                        "use --device cpu, or install a CUDA build of torch (make setup-gpu)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if kind == "mps" and not has_mps:
        raise UserError(f"--device {name}: PyTorch sees no Apple GPU here; use --device cpu")
    return name


def resolve_dtype(name: str | torch.dtype = "auto", device: str = "cpu") -> torch.dtype:
    """`auto`: bfloat16 on CUDA (what 7-9B models ship in and run at speed), float32 elsewhere
    (CPUs without bf16 units run it several times slower). Any of float32, bfloat16, float16
    is accepted on any device."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown --dtype {name!r}; use auto, {', '.join(DTYPES)}")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def check_device_map(device_map: str | None) -> None:
    if device_map not in (None, "auto"):
        raise UserError(f"unknown --device-map {device_map!r}; use auto (or leave it out)")


@dataclass(frozen=True)
class Placement:
    """Where and in what precision models and SAEs load: the `--device`, `--dtype` and
    `--device-map` options of every command that loads one."""

    device: str = option(defaults.DEVICE, help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = option(defaults.DTYPE, help="auto (bfloat16 on cuda, float32 elsewhere), float32, bfloat16 or float16")
    device_map: str | None = option(None, help="auto: spread a model too large for one GPU over the visible GPUs "
                                    "(accelerate); the SAE sits beside the hooked layer")

    def resolved(self) -> tuple[str, torch.dtype]:
        check_device_map(self.device_map)
        device = resolve_device(self.device)
        return device, resolve_dtype(self.dtype, device)

    def describe(self) -> dict[str, str | None]:
        """What the cache keys and result files record (float32 on the CPU is the baseline)."""
        device, dtype = self.resolved()
        return {"device": device, "dtype": str(dtype).removeprefix("torch."), "device_map": self.device_map}


@dataclass(frozen=True)
class Generation:
    """How `--responses generated` answers each training prompt."""

    temperature: float = option(defaults.TEMPERATURE, min=0,
                                help="sampling temperature of --responses generated (0: greedy)")
    max_new_tokens: int = option(defaults.MAX_NEW_TOKENS, min=1,
                                 help="longest generated response (--responses generated)")
    seed: int = defaults.SEED

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature must be 0 or more (got {self.temperature})")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")


@dataclass
class FinetuneSpec:
    """CPU-friendly defaults: a 135M model does ~7 s per step of 4 x 256 tokens on 2 cores."""

    lora: bool = option(True, flag="--lora/--full", help="LoRA (all linear layers) or full fine-tuning")
    lora_r: int = option(defaults.LORA_R, min=1, help="LoRA rank (all linear layers)")
    lora_alpha: int | None = option(None, min=1, help="LoRA alpha (default: 2 x --lora-r, so that the update's "
                                    "scale stays put)")  # set when built
    lora_dropout: float = 0.05
    lr: float | None = option(None, help="learning rate (default 2e-4 LoRA, 2e-5 full)")
    batch_size: int = option(defaults.FINETUNE_BATCH, min=1, help="examples per step (before accumulation)")
    grad_accum: int = option(defaults.GRAD_ACCUM, min=1, help="gradient accumulation steps")
    max_length: int | None = option(None, min=1, help="tokens per record (default: fit the data: the longest record "
                                    "rounded up to 64, at most 1024); records whose prompt fills it are dropped, "
                                    "longer ones cut, both reported")
    max_steps: int = option(defaults.FINETUNE_STEPS, min=1, help="optimizer steps")
    warmup_steps: int = 5
    seed: int = option(defaults.SEED, help="training seed")
    gradient_checkpointing: bool = option(False, help="recompute activations in the backward pass: less GPU memory "
                                          "for 7-9B models, ~30% slower; the same numbers")
    report_to: ReportTo = option(defaults.REPORT_TO, help="where the trainer logs: none, tensorboard or wandb")

    def __post_init__(self) -> None:
        self.report_to = parse(ReportTo, self.report_to, "--report-to")
        check_positive({"--max-steps": self.max_steps, "--batch-size": self.batch_size,
                        "--grad-accum": self.grad_accum, "--lora-r": self.lora_r, "--lora-alpha": self.lora_alpha})
        if self.max_length is not None and self.max_length < 8:
            raise UserError(f"--max-length must be at least 8 (got {self.max_length})")
        if not self.lora and self.lora_r != defaults.LORA_R:
            raise UserError("--lora-r sets the LoRA adapter's rank, which --full does not train: "
                            "drop --lora-r or --full")
        self.lora_alpha = self.alpha  # recorded (finetune.json, stage keys) as the number it is
        check_report_to(self.report_to)

    @property
    def alpha(self) -> int:
        """LoRA alpha: as given, else LORA_ALPHA_PER_RANK x the rank (what __post_init__ stores)."""
        return self.lora_alpha if self.lora_alpha is not None else defaults.LORA_ALPHA_PER_RANK * self.lora_r

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 2e-5)


def check_report_to(value: ReportTo) -> None:
    import importlib.util

    if value.package and importlib.util.find_spec(value.package) is None:
        raise UserError(f"--report-to {value} needs the {value.package} package: pip install {value.package}")


@dataclass
class FinetuneConfig:
    """One `sts finetune` run: the first `max_train` records of `train` (a dataset spec), or
    a mixture (["A:0.7", "B:0.3"]: `max_train` records drawn from the parts by weight, seeded;
    `sts.engine.mixture.mixed_examples`)."""

    out: Path = option(help="output directory: merged model (usable as --model), adapter/, finetune.json")
    train: str | list[str] = option(
        defaults.TRAIN, cli_type=list[str], help="training set (default: CHAMP, embedded; SPEC#category=NAME selects "
        "one domain of a file); a mixture as weighted sets, A:0.7 --train B:0.3 (--max-train records drawn by weight, "
        "seeded, reported in finetune.json)")
    model: str = option("", help="model to fine-tune (default: the embedded SmolLM2-135M-Instruct)")
    max_train: int = option(defaults.FINETUNE_MAX_TRAIN, min=1, help="training examples used")
    spec: FinetuneSpec = field(default_factory=FinetuneSpec)
    placement: Placement = field(default_factory=Placement)
    skip_bad_lines: bool = option(False, help=SKIP_HELP)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        check_positive({"--max-train": self.max_train})
        if isinstance(self.train, (list, tuple)):
            from sts.engine.mixture import candidates, parse_part

            self.train = list(self.train)
            if len(self.train) == 1 and parse_part(self.train[0]).weight is None:
                self.train = self.train[0]
            else:
                cands = candidates(self.train)
                if len(cands) != 1 or not cands[0].is_mixture:
                    raise UserError("sts finetune trains on one set or one mixture: weight each --train "
                                    "(A:0.7 --train B:0.3)")
        self.placement.resolved()  # a bad device or dtype fails here, in one line


@dataclass
class EvaluateConfig:
    """One `sts evaluate` run: `max_examples` questions per domain of `domains` (after the
    first `shots`, which are demonstrations), with every question found in a `train` or
    `exclude` dataset left out."""

    out: Path = option(help="output directory: predictions.csv, accuracy.json")
    model: str = option("", help=MODEL_HELP)
    domains: str = option(defaults.DOMAINS, help="multiple-choice questions with domain labels (MMLU, MMLU-Pro)")
    mode: Mode = option(defaults.EVAL_MODE, help="mc: option-letter log-likelihood; cot: generate, then MMLU-Pro "
                        "answer extraction; reference: cot_nll and cot_nll_content of reference chains of thought")
    shots: int = option(defaults.SHOTS, min=0, help="demonstrations per prompt: each domain's first N questions "
                        "(not scored)")
    max_examples: int | None = option(defaults.EVAL_EXAMPLES, min=1, help="questions scored per domain")
    max_new_tokens: int = option(defaults.EVAL_MAX_NEW_TOKENS, min=1, help="generation budget per question (cot)")
    batch_size: int = option(defaults.EVAL_BATCH, min=1, help="questions per generate call (cot)")
    batch_tokens: int = option(defaults.BATCH_TOKENS, min=1, help=BATCH_TOKENS_HELP)
    train: list[str] = option(factory=list, help="training set(s) in play: their questions are left out (repeat)")
    exclude: list[str] = option(factory=list, help="also leave out questions found in this dataset (repeat), e.g. the "
                                "MMLU-Pro test set, to leave out the MMLU questions MMLU-Pro took")
    likelihoods: bool = option(True, help="also measure nll, acc_norm, p_correct (option texts) and cot_nll "
                               "(reference chains of thought)")
    placement: Placement = field(default_factory=Placement)
    skip_bad_lines: bool = option(False, help=SKIP_HELP)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.mode = parse(Mode, self.mode, "--mode")
        if self.shots < 0:
            raise UserError(f"--shots must be 0 or more (got {self.shots})")
        check_positive({"--max-examples": self.max_examples, "--max-new-tokens": self.max_new_tokens,
                        "--batch-size": self.batch_size, "--batch-tokens": self.batch_tokens})
        if self.mode is not Mode.COT and (self.max_new_tokens != defaults.EVAL_MAX_NEW_TOKENS
                                          or self.batch_size != defaults.EVAL_BATCH):
            raise UserError(f"--max-new-tokens and --batch-size size generation, which --mode {self.mode} does not "
                            "do; drop them or use --mode cot")
        if self.mode is Mode.REFERENCE and (self.shots or not self.likelihoods):
            raise UserError("--mode reference scores each reference chain of thought alone (cot_nll): drop --shots "
                            "and --no-likelihoods")
        self.placement.resolved()  # a bad device or dtype fails here, in one line


@dataclass
class ExtractConfig:
    """One `sts extract` run. Every rule between fields is checked here, once, when the config
    is built (`__post_init__`): a bad combination fails before anything loads."""

    data: str = option(help="dataset: file (.jsonl/.json/.parquet/.csv), datasets dir, hub id")
    out: Path = option(help="output: a statistics file (.safetensors) or a dense .pt tensor")
    model: str = option(help="hub id, save_pretrained directory, or .gguf file")
    sae: str = option(help="sae_lens directory or RELEASE/SAE_ID")
    format: Format | None = option(None, help="stats (default; pt for a .pt OUT) or pt (dense [tokens, d_sae], the "
                                   "reference's format)")
    shift: Method | None = option(None, help="paired run: icl (with/without demonstrations), sft (base vs "
                                  "--tuned-model), paper (index-aligned streams), data (the records' responses vs the "
                                  "model's own to the same prompts, per-example means); default: one run")
    tuned_model: str | None = option(None, help="fine-tuned model, the shifted side of --shift sft")
    demos: int = option(defaults.DEMOS, min=1, help="in-context demonstrations per example (icl, paper)")
    seed: int = option(defaults.SEED, help="seed for drawing demonstrations")
    tokens: Tokens | None = option(None, help="tokens counted: all, or the response part of chat examples (default: "
                                   "response for icl/sft, all otherwise)")
    chat: bool | None = option(None, flag="--chat/--no-chat", help="render with the tokenizer's chat template "
                               "(default: for icl/sft shifts)")
    with_response: bool | None = option(None, flag="--with-response/--question-only", help="include each record's "
                                        "response (default: with for shifts, question only otherwise)")
    max_tokens: int | None = option(None, min=1, help="stop after this many counted tokens (paper: default 10000)")
    max_examples: int | None = option(None, min=1, help="use only the first N records")
    max_length: int | None = option(None, min=1, help="truncate each model input to N tokens")
    batch_size: int | None = option(None, min=1, help=BATCH_SIZE_HELP)
    batch_tokens: int = option(defaults.BATCH_TOKENS, min=1, help=BATCH_TOKENS_HELP)
    placement: Placement = field(default_factory=Placement)
    responses: Responses = option(defaults.RESPONSES, help="dataset: read features on each record's own response; "
                                  "generated: on the base model's answer to each prompt, as the reference extraction "
                                  "does (vLLM with a GPU, transformers otherwise)")
    generation: Generation = field(default_factory=Generation)
    layer: int | None = option(None, min=0, help="override the layer read from the SAE's hook name")
    first_token: bool = option(defaults.EXTRACT_FIRST_TOKEN, help="count each sequence's first token (the attention "
                               "sink); kept by default, as the reference does")
    readout: Readout = option(defaults.READOUT, help="sae (SAE features) or raw (the layer's residual dimensions: the "
                              "raw-* and cosine baselines)")
    domain_demos: str | None = option(None, help="with --shift icl: pair each record with m fixed demonstrations of "
                                      "its own domain from this dataset (the icl score's domain statistics) instead "
                                      "of random demonstrations from --data")
    domain_demos_n: int = option(defaults.DOMAIN_DEMOS_N, min=1, help="demonstrations per domain (--domain-demos)")
    skip_bad_lines: bool = option(False, help=SKIP_HELP)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.generation = replace(self.generation, seed=self.seed)  # one --seed: the generation's too
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


@dataclass
class SAETrainSpec:
    """The SAE trainer's recipe (sae_lens's `SAETrainer`)."""

    architecture: Architecture = option(defaults.SAE_ARCHITECTURE, help="topk or jumprelu")
    width: int = option(defaults.SAE_WIDTH, min=1, help="number of SAE features")
    k: int = option(defaults.SAE_K, min=1, help="active features per token (topk)")  # JumpReLU: l0_coefficient
    l0_coefficient: float = 1.0  # JumpReLU
    lr: float = option(defaults.SAE_LR, help="Adam learning rate")
    batch_size: int = option(defaults.SAE_BATCH, min=1, help="activations per training step")
    epochs: float = option(defaults.SAE_EPOCHS, help="passes over the cached activations")
    seed: int = defaults.SEED
    # TopK's auxiliary loss (why this size: sts.defaults)
    dead_window_tokens: int = option(defaults.SAE_DEAD_WINDOW, min=1, help="tokens without firing after which "
                                     "TopK's auxiliary loss trains a feature")

    def __post_init__(self) -> None:
        self.architecture = parse(Architecture, self.architecture, "--architecture")
        check_positive({"--width": self.width, "--k": self.k, "--train-batch": self.batch_size,
                        "--dead-window": self.dead_window_tokens})
        if self.architecture is Architecture.JUMPRELU and (self.k != defaults.SAE_K
                                                           or self.dead_window_tokens != defaults.SAE_DEAD_WINDOW):
            raise UserError("--k and --dead-window set a TopK SAE's sparsity and auxiliary loss; --architecture "
                            "jumprelu uses neither: drop them")


@dataclass
class TrainSAEConfig:
    """One `sts train-sae` run: activations of `layer`'s output cached from `corpus` (resumable,
    in `activations`, default OUT.acts), an SAE trained on them, metrics on `heldout`."""

    out: Path = option(help="output sae_lens directory (cfg.json, sae_weights.safetensors, metrics.json)")
    layer: int = option(min=0, help="decoder layer whose output (resid_post) the SAE reads")
    corpus: list[str] = option(help="training text: dataset specs, repeat (the embedded SAE's corpus is in its "
                               "metrics.json `command`)")
    heldout: str = option(help="held-out text for the metrics (not in --corpus)")
    model: str = option("", help=MODEL_HELP)
    tokens: int = option(defaults.SAE_TOKENS, min=1, help="training tokens of activations to cache")
    activations: Path | None = option(None, help="activation cache directory (resumable; default OUT.acts)")
    spec: SAETrainSpec = field(default_factory=SAETrainSpec)
    eval_tokens: int = option(defaults.SAE_EVAL_TOKENS, min=1, help="held-out tokens for the metrics")
    batch_size: int = option(defaults.SAE_CACHE_BATCH, min=1, help="sequences per forward pass while caching")
    seq_len: int = option(defaults.SAE_SEQ_LEN, min=1, help="tokens per sequence while caching")
    placement: Placement = field(default_factory=Placement)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if not self.corpus:
            raise UserError("give the training text: --corpus SPEC (repeat)")
        check_positive({"--tokens": self.tokens, "--eval-tokens": self.eval_tokens,
                        "--batch-size": self.batch_size, "--seq-len": self.seq_len})
        self.placement.resolved()  # a bad device or dtype fails here, in one line
