"""The `sts` command line: thin verbs over the pipeline stages.

Bad input ends with one line on stderr and exit status 2 (`UserError` and click's usage
errors alike); outputs are written atomically by the stages.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sts import defaults, files
from sts.choices import Architecture, Format, Method, Metric, Mode, Protocol, Readout, ReportTo, Responses, Tokens
from sts.defaults import DEFAULT_K, DEFAULT_SCORE, REFERENCE_K, REFERENCE_SCORE
from sts.errors import UserError

# The --score options name registered scores (`sts.scores.score.REGISTRY`): their help lists the registry
# as it stands when `sts` runs (`_score_help`), after the `sts.scores` plugins registered theirs.
SCORE_HELP = "{choices}"


app = typer.Typer(add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="SAE-based Transferability Score: predict which domains fine-tuning helps.")


_invoked_args: list[str] = []  # the command line as given, recorded with trained artifacts


# Where models and SAEs load, and how much goes through the model at once (every command that
# loads a model takes these).
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on cuda, float32 elsewhere), float32, bfloat16 or float16")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(help="auto: spread a model too large for one GPU over the visible GPUs (accelerate); the SAE sits beside the hooked layer")]
BatchTokensOpt = Annotated[int, typer.Option(min=1, help="padded tokens per forward pass; sequences are sorted by length to keep padding small (raise it on a GPU: 32768 and more)")]
ResponsesOpt = Annotated[Responses, typer.Option(help="dataset: read features on each record's own response; generated: on the base model's answer to each prompt, as the reference extraction does (vLLM with a GPU, transformers otherwise)")]
TemperatureOpt = Annotated[float, typer.Option(min=0, help="sampling temperature of --responses generated (0: greedy)")]
MaxNewTokensOpt = Annotated[int, typer.Option(min=1, help="longest generated response (--responses generated)")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(min=1, help="at most N sequences per forward pass (default: no cap; --batch-tokens sizes batches)")]


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    if not sys.stderr.isatty():  # keep logs and captured stderr free of progress-bar frames
        transformers.utils.logging.disable_progress_bar()


@app.command()
def extract(
    data: Annotated[str, typer.Option(help="dataset: file (.jsonl/.json/.parquet/.csv), datasets dir, hub id")],
    out: Annotated[Path, typer.Option(help="output: a statistics file (.safetensors) or a dense .pt tensor")],
    model: Annotated[str, typer.Option(help="hub id, save_pretrained directory, or .gguf file")],
    sae: Annotated[str, typer.Option(help="sae_lens directory or RELEASE/SAE_ID")],
    format: Annotated[Optional[Format], typer.Option(help="stats (default; pt for a .pt OUT) or pt (dense [tokens, d_sae], the reference's format)")] = None,
    shift: Annotated[Optional[Method], typer.Option(help="paired run: icl (with/without demonstrations), sft (base vs --tuned-model), paper (index-aligned streams), data (the records' responses vs the model's own to the same prompts, per-example means); default: one run")] = None,
    tuned_model: Annotated[Optional[str], typer.Option(help="fine-tuned model, the shifted side of --shift sft")] = None,
    demos: Annotated[int, typer.Option(min=1, help="in-context demonstrations per example (icl, paper)")] = defaults.DEMOS,
    seed: Annotated[int, typer.Option(help="seed for drawing demonstrations")] = defaults.SEED,
    tokens: Annotated[Optional[Tokens], typer.Option(help="tokens counted: all, or the response part of chat examples (default: response for icl/sft, all otherwise)")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="render with the tokenizer's chat template (default: for icl/sft shifts)")] = None,
    with_response: Annotated[Optional[bool], typer.Option("--with-response/--question-only", help="include each record's response (default: with for shifts, question only otherwise)")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="stop after this many counted tokens (paper: default 10000)")] = None,
    max_examples: Annotated[Optional[int], typer.Option(min=1, help="use only the first N records")] = None,
    max_length: Annotated[Optional[int], typer.Option(min=1, help="truncate each model input to N tokens")] = None,
    batch_size: BatchSizeOpt = None,
    batch_tokens: BatchTokensOpt = defaults.BATCH_TOKENS,
    device: DeviceOpt = defaults.DEVICE,
    dtype: DtypeOpt = defaults.DTYPE,
    device_map: DeviceMapOpt = None,
    responses: ResponsesOpt = defaults.RESPONSES,
    temperature: TemperatureOpt = defaults.TEMPERATURE,
    max_new_tokens: MaxNewTokensOpt = defaults.MAX_NEW_TOKENS,
    layer: Annotated[Optional[int], typer.Option(min=0, help="override the layer read from the SAE's hook name")] = None,
    first_token: Annotated[bool, typer.Option("--first-token/--no-first-token", help="count each sequence's first token (the attention sink); kept by default, as the reference does")] = defaults.EXTRACT_FIRST_TOKEN,
    readout: Annotated[Readout, typer.Option(help="sae (SAE features) or raw (the layer's residual dimensions: the raw-* and cosine baselines)")] = defaults.READOUT,
    domain_demos: Annotated[Optional[str], typer.Option(help="with --shift icl: pair each record with m fixed demonstrations of its own domain from this dataset (the icl score's domain statistics) instead of random demonstrations from --data")] = None,
    domain_demos_n: Annotated[int, typer.Option(min=1, help="demonstrations per domain (--domain-demos)")] = defaults.DOMAIN_DEMOS_N,
    skip_bad_lines: Annotated[bool, typer.Option(help="skip malformed JSONL lines with a warning instead of failing")] = False,
) -> None:
    """Stream SAE features of a dataset into statistics (or a dense .pt tensor)."""
    from sts.engine import extract_stage as ex
    from sts.engine.generate import Generation
    from sts.engine.models import Placement

    cfg = ex.ExtractConfig(
        data=data, out=out, model=model, sae=sae, format=format, shift=shift, tuned_model=tuned_model,
        demos=demos, seed=seed, tokens=tokens, chat=chat, with_response=with_response, max_tokens=max_tokens,
        max_examples=max_examples, max_length=max_length, batch_size=batch_size, batch_tokens=batch_tokens,
        placement=Placement(device, dtype, device_map), responses=responses,
        generation=Generation(temperature, max_new_tokens, seed), layer=layer, first_token=first_token,
        readout=readout, domain_demos=domain_demos, domain_demos_n=domain_demos_n, skip_bad_lines=skip_bad_lines)
    _quiet_libraries()
    print(ex.run(cfg), file=sys.stderr)


def _parse_domains(specs: list[str]) -> dict[str, str]:
    domains: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--domain expects NAME=FILE (got {spec!r})")
        if name in domains:
            raise UserError(f"domain {name!r} is given twice")
        domains[name] = path
    return domains


@app.command()
def score(
    out: Annotated[Path, typer.Option(help="scores JSON")],
    domain: Annotated[list[str], typer.Option(help="NAME=FILE (.pt dense tensor or statistics file; a dataset for --score lexical); repeat per domain")],
    # the reference's score and k, not DEFAULT_*: this verb scores the reference's dense tensors too
    score: Annotated[str, typer.Option(metavar="SCORE", help=f"{SCORE_HELP} (`sts scores` lists each one's formula)")] = REFERENCE_SCORE,
    method: Annotated[Optional[Method], typer.Option(help="paper for --base/--shifted .pt tensors; with --shift-stats, read from the file")] = None,
    base: Annotated[Optional[Path], typer.Option(help="dense base features (.pt)")] = None,
    shifted: Annotated[Optional[Path], typer.Option(help="dense shifted features (.pt)")] = None,
    shift_stats: Annotated[Optional[Path], typer.Option(help="paired statistics from `sts extract --shift ...` (--readout raw for raw-act, raw-sq, cosine)")] = None,
    train: Annotated[Optional[str], typer.Option(help="training set (dataset spec) for --score lexical")] = None,
    k: Annotated[int, typer.Option(min=1, help="number of shifted features (the reference: 100)")] = REFERENCE_K,
    max_tokens: Annotated[int, typer.Option(min=1, help="rows of each dense tensor used (the reference's N)")] = defaults.DENSE_ROWS,
) -> None:
    """Shifted features and a score per domain; writes {score, formula, method, k, shifted_features, scores}."""
    from sts.scores import files as sc

    cfg = sc.ScoreConfig(out=out, domains=_parse_domains(domain), score=score, method=method, base=base,
                         shifted=shifted, shift_stats=shift_stats, train=train, k=k, max_tokens=max_tokens)
    result = sc.run(cfg)
    for name, value in sorted(result.scores.items(), key=lambda kv: -kv[1]):
        print(f"{name}\t{value:.6g}")


@app.command()
def predict(
    train: Annotated[list[str], typer.Option(help="training set (default: CHAMP, 270 competition-math problems with worked solutions, embedded; `embedded:mmlu#category=math` for MMLU math questions, held out of the math domain); repeat to compare sets (one table), or give weights (A:0.7 --train B:0.3) to predict that mixture")] = [defaults.TRAIN],  # noqa: B006 (typer reads the default)
    domains: Annotated[str, typer.Option(help="downstream domains: a dataset with domain labels; records with a reference chain of thought (MMLU-Pro's cot_content) give the validated form. Default: MMLU-Pro's 14 categories on reference chains of thought, shipped as statistics (embedded:mmlu-pro-cot); embedded:mmlu: MMLU's plain questions")] = defaults.PREDICT_DOMAINS,
    model: Annotated[Optional[str], typer.Option(help="model (default: embedded SmolLM2-135M-Instruct)")] = None,
    sae: Annotated[Optional[str], typer.Option(help="SAE (default: the embedded SmolLM2 SAE)")] = None,
    target: Annotated[Optional[list[str]], typer.Option(help="domain(s) to choose a training set for (DOMAIN[,DOMAIN]; several --train): ranks the sets by their mean predicted change there, with the margin between the first two against its bootstrap uncertainty")] = None,
    mix_grid: Annotated[Optional[int], typer.Option(min=0, help=f"also predict every mixture of the 2-3 --train sets on a grid of step 1/N (from their statistics: no new model pass); default: {defaults.TARGET_MIX_GRID} with --target and 2-3 sets, else 0")] = None,
    calibrate: Annotated[Optional[list[str]], typer.Option(help="`sts validate` folders (or library.json) on this model and SAE that calibrate scores into changes in the metric's units with 90% intervals (repeat to pool); default: the --library one; none: no calibration")] = None,
    method: Annotated[Method, typer.Option(help="shift method: icl, sft (with --tuned-model), paper, or data (the training responses vs the base model's own answers to the same prompts, per-example means; generation as --temperature, --max-new-tokens)")] = defaults.METHOD,
    tuned_model: Annotated[Optional[str], typer.Option(help="fine-tuned model for --method sft")] = None,
    k: Annotated[int, typer.Option(min=1, help="number of shifted features")] = DEFAULT_K,
    demos: Annotated[int, typer.Option(min=1, help="in-context demonstrations per training example")] = defaults.DEMOS,
    seed: Annotated[int, typer.Option(help="seed for drawing demonstrations")] = defaults.SEED,
    max_train: Annotated[int, typer.Option(min=1, help="training examples used (CHAMP pairs run to ~830 tokens with their 2 demonstrations: 100 keep a cold run near 10 minutes on 2 CPU cores)")] = defaults.PREDICT_MAX_TRAIN,
    max_examples: Annotated[int, typer.Option(min=1, help="questions per domain")] = defaults.PREDICT_MAX_EXAMPLES,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="tokens per domain")] = None,
    max_length: Annotated[int, typer.Option(min=1, help="truncate each model input to N tokens (ICL pairs: the example is cut, never its demonstrations; CHAMP pairs are ~830 tokens at the median)")] = defaults.MAX_LENGTH,
    batch_size: BatchSizeOpt = None,
    batch_tokens: BatchTokensOpt = defaults.BATCH_TOKENS,
    device: DeviceOpt = defaults.DEVICE,
    dtype: DtypeOpt = defaults.DTYPE,
    device_map: DeviceMapOpt = None,
    responses: ResponsesOpt = defaults.RESPONSES,
    temperature: TemperatureOpt = defaults.TEMPERATURE,
    max_new_tokens: MaxNewTokensOpt = defaults.MAX_NEW_TOKENS,
    out: Annotated[Path, typer.Option(help="output directory for sts.json, sts.csv, sts.png")] = Path("out"),
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse cached extraction")] = True,
    first_token: Annotated[bool, typer.Option("--first-token/--no-first-token", help="count each domain question's first token (the attention sink; left out by default)")] = defaults.PREDICT_FIRST_TOKEN,
    score: Annotated[Optional[str], typer.Option(metavar="SCORE", help=f"domain score: {SCORE_HELP} (`sts scores` lists each one's formula and what it reads); default: {DEFAULT_SCORE} where every domain record holds a reference chain of thought (docs/results/probes), else {defaults.PLAIN_SCORE} (docs/results/plain)")] = None,
    domain_demos: Annotated[Optional[str], typer.Option(help="icl score: dataset with each domain's demonstrations (MMLU-Pro records with cot_content use the chain of thought); default: each domain's first m questions, then not scored")] = None,
    domain_demos_n: Annotated[int, typer.Option(min=1, help="icl score: demonstrations per domain (m)")] = defaults.DOMAIN_DEMOS_N,
    skip_bad_lines: Annotated[bool, typer.Option(help="skip malformed JSONL lines with a warning")] = False,
    library: Annotated[Optional[str], typer.Option(help="measured runs on this model and SAE (library.json of `sts validate`, or its folder) that split each domain's prediction into a shared part (what any such training did) and this set's own; default: the embedded library with the embedded SAE; none: no split")] = None,
    explain: Annotated[bool, typer.Option("--explain/--no-explain", help="a score over no shifted features (cosine, lexical, grad, grad-adam) still reads the training set's SAE shift and prints its top --k features as the explanation; --no-explain skips that pass")] = True,
    gradient_sketch: Annotated[int, typer.Option(min=0, help="grad, grad-adam, grad-sign, look-fo: compare the training and domain gradients through a seeded count sketch of this dimension (LESS-style; the embedded domains' sketched sides ship with sts); 0: exact")] = defaults.GRADIENT_SKETCH,
    steps: Annotated[int, typer.Option(min=1, help="line, look, look-fo: the optimizer steps of the fine-tuning run the score looks ahead (step 1 moves nothing: the warm-up starts at lr 0)")] = defaults.LOOKAHEAD_STEPS,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="the gradient and lookahead scores: recompute activations in the backward pass (less GPU memory for 7-9B models, ~30% slower); the same numbers")] = False,
) -> None:
    """Rank downstream domains by predicted transfer from fine-tuning on a training set."""
    import time

    from sts.engine.finetuning import FinetuneSpec
    from sts.engine.generate import Generation
    from sts.engine.models import Placement
    from sts.prediction import compare, report
    from sts.prediction.compare import Comparison
    from sts.prediction.compare import predict as run_predict
    from sts.prediction.config import PredictConfig

    started = time.perf_counter()
    cfg = PredictConfig(model=model or "", sae=sae or "", train=list(train), domains=domains,
                        method=method, tuned_model=tuned_model, k=k, demos=demos, seed=seed, max_train=max_train,
                        max_examples=max_examples, max_tokens=max_tokens, max_length=max_length,
                        batch_size=batch_size, batch_tokens=batch_tokens, use_cache=cache,
                        first_token=first_token, score=score or "", domain_demos=domain_demos,
                        domain_demos_n=domain_demos_n, placement=Placement(device, dtype, device_map),
                        responses=responses, generation=Generation(temperature, max_new_tokens, seed),
                        skip_bad_lines=skip_bad_lines, library="" if library == "none" else library,
                        calibrate=[] if calibrate == ["none"] else calibrate, target=target, mix_grid=mix_grid,
                        explain=explain, gradient_sketch=gradient_sketch, steps=steps,
                        finetune=FinetuneSpec(gradient_checkpointing=gradient_checkpointing))
    _quiet_libraries()
    pred = run_predict(cfg, progress=lambda m: print(f"sts: {m}", file=sys.stderr))
    if isinstance(pred, Comparison) and len(pred.candidates) > 1:
        paths = compare.write(pred, out)
        print(compare.text(pred))
        print(f"\nwrote {', '.join(map(str, paths))} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return
    if isinstance(pred, Comparison):  # one mixture: reported as one set
        pred = pred.predictions[pred.candidates[0]]
    paths = report.write(pred, out)
    print(f"score {pred.score}: {pred.formula}")
    if pred.demonstrations:
        print(f"domain demonstrations: {report.demonstrations_text(pred)}")
    print(report.table(pred))
    print()
    print(report.features_text(pred))
    print(f"\nwrote {', '.join(map(str, paths))} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)


@app.command("scores")
def scores_verb() -> None:
    """The registered scores (`sts.scores.score.REGISTRY`, with the `sts.scores` plugins'): name, kind,
    what it reads, and its formula, as a tab-separated table."""
    from sts.scores.score import REGISTRY

    print("score\tkind\treads\tbaseline\tformula")
    for name, spec in REGISTRY.items():
        print(f"{name}\t{spec.kind.name}\t{','.join(sorted(spec.kind.reads))}\t{'yes' if spec.baseline else 'no'}\t"
              f"{spec.formula}")


@app.command("train-sae")
def train_sae(
    out: Annotated[Path, typer.Option(help="output sae_lens directory (cfg.json, sae_weights.safetensors, metrics.json)")],
    layer: Annotated[int, typer.Option(min=0, help="decoder layer whose output (resid_post) the SAE reads")],
    corpus: Annotated[list[str], typer.Option(help="training text: dataset specs, repeat (the embedded SAE's corpus is in its metrics.json `command`)")],
    heldout: Annotated[str, typer.Option(help="held-out text for the metrics (not in --corpus)")],
    model: Annotated[Optional[str], typer.Option(help="model (default: the embedded SmolLM2-135M-Instruct)")] = None,
    tokens: Annotated[int, typer.Option(min=1, help="training tokens of activations to cache")] = defaults.SAE_TOKENS,
    activations: Annotated[Optional[Path], typer.Option(help="activation cache directory (resumable; default OUT.acts)")] = None,
    architecture: Annotated[Architecture, typer.Option(help="topk or jumprelu")] = defaults.SAE_ARCHITECTURE,
    width: Annotated[int, typer.Option(min=1, help="number of SAE features")] = defaults.SAE_WIDTH,
    k: Annotated[int, typer.Option(min=1, help="active features per token (topk)")] = defaults.SAE_K,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = defaults.SAE_LR,
    epochs: Annotated[float, typer.Option(help="passes over the cached activations")] = defaults.SAE_EPOCHS,
    train_batch: Annotated[int, typer.Option(min=1, help="activations per training step")] = defaults.SAE_BATCH,
    dead_window: Annotated[int, typer.Option(min=1, help="tokens without firing after which TopK's auxiliary loss trains a feature")] = defaults.SAE_DEAD_WINDOW,
    eval_tokens: Annotated[int, typer.Option(min=1, help="held-out tokens for the metrics")] = defaults.SAE_EVAL_TOKENS,
    batch_size: Annotated[int, typer.Option(min=1, help="sequences per forward pass while caching")] = defaults.SAE_CACHE_BATCH,
    seq_len: Annotated[int, typer.Option(min=1, help="tokens per sequence while caching")] = defaults.SAE_SEQ_LEN,
    device: DeviceOpt = defaults.DEVICE,
    dtype: DtypeOpt = defaults.DTYPE,
) -> None:
    """Train a TopK/JumpReLU SAE (sae_lens trainer) on one layer's residual stream."""
    from sts.engine import train_sae as ts
    from sts.engine.models import Placement

    spec = ts.SAETrainSpec(architecture=architecture, width=width, k=k, lr=lr, batch_size=train_batch,
                           epochs=epochs, dead_window_tokens=dead_window)
    cfg = ts.TrainSAEConfig(out=out, layer=layer, corpus=corpus, heldout=heldout, model=model or "", tokens=tokens,
                            activations=activations, spec=spec, eval_tokens=eval_tokens, batch_size=batch_size,
                            seq_len=seq_len, placement=Placement(device, dtype))
    _quiet_libraries()
    metrics = ts.run(cfg, _command(), progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(metrics, indent=2))


def _command() -> str:
    import shlex

    return "sts " + shlex.join(_invoked_args)


@app.command()
def finetune(
    out: Annotated[Path, typer.Option(help="output directory: merged model (usable as --model), adapter/, finetune.json")],
    train: Annotated[list[str], typer.Option(help="training set (default: CHAMP, embedded; SPEC#category=NAME selects one domain of a file); a mixture as weighted sets, A:0.7 --train B:0.3 (--max-train records drawn by weight, seeded, reported in finetune.json)")] = [defaults.TRAIN],  # noqa: B006 (typer reads the default)
    model: Annotated[Optional[str], typer.Option(help="model to fine-tune (default: embedded SmolLM2-135M-Instruct)")] = None,
    max_train: Annotated[int, typer.Option(min=1, help="training examples used")] = defaults.FINETUNE_MAX_TRAIN,
    full: Annotated[bool, typer.Option("--full/--lora", help="full fine-tuning instead of LoRA")] = False,
    lora_r: Annotated[int, typer.Option(min=1, help="LoRA rank (all linear layers)")] = defaults.LORA_R,
    lora_alpha: Annotated[Optional[int], typer.Option(min=1, help="LoRA alpha (default: 2 x --lora-r, so that the update's scale stays put)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="learning rate (default 2e-4 LoRA, 2e-5 full)")] = None,
    max_steps: Annotated[int, typer.Option(min=1, help="optimizer steps")] = defaults.FINETUNE_STEPS,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per step (before accumulation)")] = defaults.FINETUNE_BATCH,
    grad_accum: Annotated[int, typer.Option(min=1, help="gradient accumulation steps")] = defaults.GRAD_ACCUM,
    max_length: Annotated[Optional[int], typer.Option(min=1, help="tokens per record (default: fit the data: the longest record rounded up to 64, at most 1024); records whose prompt fills it are dropped, longer ones cut, both reported")] = None,
    seed: Annotated[int, typer.Option(help="training seed")] = defaults.SEED,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="recompute activations in the backward pass: less GPU memory for 7-9B models, ~30% slower")] = False,
    report_to: Annotated[ReportTo, typer.Option(help="where the trainer logs: none, tensorboard or wandb")] = defaults.REPORT_TO,
    device: DeviceOpt = defaults.DEVICE,
    dtype: DtypeOpt = defaults.DTYPE,
    device_map: DeviceMapOpt = None,
    skip_bad_lines: Annotated[bool, typer.Option(help="skip malformed JSONL lines with a warning")] = False,
) -> None:
    """Supervised fine-tuning (TRL; LoRA by default), loss on response tokens only."""
    from sts.engine import finetuning as ft
    from sts.engine.models import Placement

    spec = ft.FinetuneSpec(lora=not full, lora_r=lora_r, lora_alpha=lora_alpha, lr=lr, batch_size=batch_size,
                           grad_accum=grad_accum, max_length=max_length, max_steps=max_steps, seed=seed,
                           gradient_checkpointing=gradient_checkpointing, report_to=report_to)
    cfg = ft.FinetuneConfig(out=out, train=list(train), model=model or "", max_train=max_train, spec=spec,
                            placement=Placement(device, dtype, device_map), skip_bad_lines=skip_bad_lines)
    _quiet_libraries()
    result, train_ds = ft.run(cfg, _command())
    first, last = result.losses[0], result.losses[-1]
    lengths = result.lengths
    print(f"--max-length {lengths.get('max_length')}: {lengths.get('dropped', 0)} records dropped, "
          f"{lengths.get('cut', 0)} cut (longest {lengths.get('longest')} tokens)")
    print(f"fine-tuned on {lengths.get('kept', len(train_ds.examples))} examples ({train_ds.spec}): {spec.max_steps} steps "
          f"in {result.seconds:.0f} s, loss {first:.3f} -> {last:.3f}; model: {out}"
          + (f", adapter: {result.adapter}" if result.adapter else ""))


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option(help="output directory: predictions.csv, accuracy.json")],
    model: Annotated[Optional[str], typer.Option(help="model (default: embedded SmolLM2-135M-Instruct)")] = None,
    domains: Annotated[str, typer.Option(help="multiple-choice questions with domain labels (MMLU, MMLU-Pro)")] = defaults.DOMAINS,
    mode: Annotated[Mode, typer.Option(help="mc: option-letter log-likelihood; cot: generate, then MMLU-Pro answer extraction")] = defaults.EVAL_MODE,
    shots: Annotated[int, typer.Option(min=0, help="demonstrations per prompt: each domain's first N questions (not scored)")] = defaults.SHOTS,
    max_examples: Annotated[Optional[int], typer.Option(min=1, help="questions scored per domain")] = defaults.EVAL_EXAMPLES,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="generation budget per question (cot)")] = defaults.EVAL_MAX_NEW_TOKENS,
    batch_size: Annotated[int, typer.Option(min=1, help="questions per generate call (cot)")] = defaults.EVAL_BATCH,
    batch_tokens: BatchTokensOpt = defaults.BATCH_TOKENS,
    train: Annotated[Optional[list[str]], typer.Option(help="training set(s) in play: their questions are left out (repeat)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="also leave out questions found in this dataset (repeat), e.g. the MMLU-Pro test set, to leave out the MMLU questions MMLU-Pro took")] = None,
    likelihoods: Annotated[bool, typer.Option("--likelihoods/--no-likelihoods", help="also measure nll, acc_norm, p_correct (option texts) and cot_nll (reference chains of thought)")] = True,
    device: DeviceOpt = defaults.DEVICE,
    dtype: DtypeOpt = defaults.DTYPE,
    device_map: DeviceMapOpt = None,
    skip_bad_lines: Annotated[bool, typer.Option(help="skip malformed JSONL lines with a warning")] = False,
) -> None:
    """Accuracy per domain, with per-question predictions (mode reference: cot_nll and cot_nll_content only)."""
    from sts.engine import evaluation
    from sts.engine.models import Placement

    cfg = evaluation.EvaluateConfig(out=out, model=model or "", domains=domains, mode=mode, shots=shots,
                                    max_examples=max_examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    batch_tokens=batch_tokens, train=list(train or []), exclude=list(exclude or []),
                                    likelihoods=likelihoods, placement=Placement(device, dtype, device_map),
                                    skip_bad_lines=skip_bad_lines)
    _quiet_libraries()
    ev = evaluation.run(cfg)
    print(evaluation.summary_table(ev))
    print(f"wrote {out / files.PREDICTIONS}, {out / files.ACCURACY}", file=sys.stderr)


@app.command()
def correlate(
    sts: Annotated[Path, typer.Option(help="STS scores: sts.json of `sts predict` (sts_samples.safetensors beside it adds the shift to the bootstrap)")],
    out: Annotated[Path, typer.Option(help="output directory for correlation.json|csv|png")] = Path("out"),
    base: Annotated[Optional[Path], typer.Option(help="`sts evaluate` output of the base model")] = None,
    tuned: Annotated[Optional[Path], typer.Option(help="`sts evaluate` output of the fine-tuned model")] = None,
    table: Annotated[Optional[Path], typer.Option(help="per-question prediction table (question_id + one column per model)")] = None,
    questions: Annotated[Optional[str], typer.Option(help="question file for --table (ids, domains, answers), e.g. MMLU-Pro test")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="base model column of --table")] = None,
    tuned_model: Annotated[Optional[str], typer.Option(help="fine-tuned model column of --table")] = None,
    replicates: Annotated[int, typer.Option(min=1, help="bootstrap replicates")] = defaults.REPLICATES,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = defaults.SEED,
    name: Annotated[str, typer.Option(help="output file stem")] = "correlation",
    protocol: Annotated[Protocol, typer.Option(help="signed (all domains, signed change; default), abs (all domains, absolute change), paper (absolute change, 4 largest + 4 smallest: chosen from the outcome)")] = defaults.PROTOCOL,
    metric: Annotated[Metric, typer.Option(help="ground truth (--base/--tuned): acc, nll, acc_norm, p_correct, cot_nll or cot_nll_content (cot_nll after MMLU-Pro's templated opening)")] = defaults.METRIC,
) -> None:
    """Pearson/Spearman between STS and the accuracy change, bootstrap 95% CI, scatter plot."""
    from sts.analysis import correlate as co

    cfg = co.CorrelateConfig(sts=sts, out=out, base=base, tuned=tuned, table=table, questions=questions,
                             base_model=base_model, tuned_model=tuned_model, replicates=replicates, seed=seed,
                             name=name, protocol=protocol, metric=metric)
    result = co.run(cfg)
    corr = result.correlation
    print(f"protocol {cfg.protocol}: {corr.protocol_note}; domains: {', '.join(corr.domains_used)}")
    for r in co.rows({d: result.scores[d] for d in corr.domains_used}, result.changes):
        print(f"{r['domain']:<18} STS {r['sts']:.6g}  change {r['delta']:+8.4g} ({r['questions']} questions)")
    print(co.summary(corr))
    print(f"wrote {', '.join(map(str, result.paths))}", file=sys.stderr)


@app.command()
def validate(
    out: Annotated[Path, typer.Option(help="results folder (a rerun resumes: finished stages are verified and reused)")] = Path("validate"),
    train: Annotated[Optional[list[str]], typer.Option(help="training set; repeat for a transfer matrix (default: CHAMP, embedded; SPEC#category=NAME selects one domain of a file)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="also leave out domain questions found in this dataset (repeat), e.g. the MMLU-Pro test set when training on MMLU-Pro data and evaluating on MMLU")] = None,
    metric: Annotated[Metric, typer.Option(help="primary ground truth: acc, nll, acc_norm, p_correct, cot_nll or cot_nll_content; every measured metric is reported")] = defaults.METRIC,
    domains: Annotated[str, typer.Option(help="multiple-choice questions with domain labels")] = defaults.DOMAINS,
    model: Annotated[Optional[str], typer.Option(help="model (default: embedded SmolLM2-135M-Instruct)")] = None,
    sae: Annotated[Optional[str], typer.Option(help="SAE (default: the embedded SmolLM2 SAE)")] = None,
    max_train: Annotated[int, typer.Option(min=1, help="training examples (shift and fine-tuning)")] = defaults.FINETUNE_MAX_TRAIN,
    predict_examples: Annotated[int, typer.Option(min=1, help="questions per domain for STS")] = defaults.PREDICT_MAX_EXAMPLES,
    eval_examples: Annotated[int, typer.Option(min=1, help="questions per domain for accuracy")] = defaults.EVAL_EXAMPLES,
    k: Annotated[int, typer.Option(min=1, help="number of shifted features")] = DEFAULT_K,
    demos: Annotated[int, typer.Option(min=1, help="in-context demonstrations (icl shift)")] = defaults.DEMOS,
    max_steps: Annotated[int, typer.Option(min=1, help="fine-tuning steps")] = defaults.FINETUNE_STEPS,
    ft_batch_size: Annotated[int, typer.Option(min=1, help="fine-tuning examples per step")] = defaults.FINETUNE_BATCH,
    lr: Annotated[Optional[float], typer.Option(help="fine-tuning learning rate (default 2e-4 LoRA)")] = None,
    full: Annotated[bool, typer.Option("--full/--lora", help="full fine-tuning instead of LoRA")] = False,
    ft_max_length: Annotated[Optional[int], typer.Option(min=1, help="fine-tuning tokens per record (default: fit the data, at most 1024)")] = None,
    shots: Annotated[int, typer.Option(min=0, help="evaluation demonstrations per prompt")] = defaults.SHOTS,
    replicates: Annotated[int, typer.Option(min=1, help="bootstrap replicates")] = defaults.REPLICATES,
    seed: Annotated[int, typer.Option(help="seed (demonstrations, fine-tuning, bootstrap)")] = defaults.SEED,
    batch_size: BatchSizeOpt = None,
    first_token: Annotated[bool, typer.Option("--first-token/--no-first-token", help="count each domain question's first token (the attention sink; left out by default)")] = defaults.PREDICT_FIRST_TOKEN,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse cached extraction")] = True,
    score: Annotated[str, typer.Option(metavar="SCORE", help=f"primary score (scatter plots, predict-*/), {SCORE_HELP}; every score the extraction serves is reported")] = DEFAULT_SCORE,
    protocol: Annotated[Protocol, typer.Option(help="primary correlation protocol: signed, abs or paper; every protocol is reported")] = defaults.PROTOCOL,
    domain_demos: Annotated[Optional[str], typer.Option(help="icl score: dataset with each domain's demonstrations; default: each domain's first m questions (then left out of every score)")] = None,
    domain_demos_n: Annotated[int, typer.Option(min=1, help="icl score: demonstrations per domain (m)")] = defaults.DOMAIN_DEMOS_N,
    reference: Annotated[Optional[str], typer.Option(help="cot_nll's ground truth: records with a reference chain of thought (cot_content) per domain, e.g. MMLU-Pro CoT records; records in any training set are left out")] = None,
    reference_examples: Annotated[int, typer.Option(min=1, help="reference records per domain")] = defaults.REFERENCE_EXAMPLES,
    probe_records: Annotated[int, typer.Option(min=1, help="gradient scores: records a domain their domain side reads, drawn (seeded) from the records after the evaluated ones; never an evaluated record")] = defaults.PROBE_RECORDS,
    probes: Annotated[Optional[str], typer.Option(help="gradient scores: a dataset of your own probe records per domain instead of the draw (refused where one shares a question with an evaluated record)")] = None,
    sft_shift: Annotated[bool, typer.Option("--sft-shift/--no-sft-shift", help="also predict with the tuned model's shift (sft); off: a stage less per set")] = True,
    question_evaluation: Annotated[bool, typer.Option("--question-evaluation/--no-question-evaluation", help="evaluate the multiple-choice questions (acc, nll, ...) of the base and tuned models; off: cot_nll on --reference only (needs --metric cot_nll)")] = True,
    gradients: Annotated[Optional[bool], typer.Option("--gradients/--no-gradients", help="also the gradient scores grad and grad-adam (a backward pass per training example and domain record); default: on when --score is one of them")] = None,
    batch_tokens: BatchTokensOpt = defaults.BATCH_TOKENS,
    device: DeviceOpt = defaults.DEVICE,
    dtype: DtypeOpt = defaults.DTYPE,
    device_map: DeviceMapOpt = None,
) -> None:
    """Per training set: predict (icl) -> finetune -> evaluate -> predict (sft); then the transfer matrix."""
    from sts.engine.finetuning import FinetuneSpec
    from sts.engine.models import Placement
    from sts.validation.config import ValidateConfig
    from sts.validation.validate import validate as run_validate
    from sts.validation.write import comparison_table, matrix_table, own_domain_table, signal_table, swap_table

    spec = FinetuneSpec(lora=not full, lr=lr, batch_size=ft_batch_size, max_steps=max_steps, seed=seed,
                        max_length=ft_max_length)
    cfg = ValidateConfig(out=out, train=list(train or [defaults.TRAIN]), model=model or "", sae=sae or "",
                         domains=domains, exclude=list(exclude or []), max_train=max_train, k=k, demos=demos,
                         seed=seed, predict_examples=predict_examples, eval_examples=eval_examples,
                         batch_size=batch_size, shots=shots, replicates=replicates, finetune=spec,
                         use_cache=cache, command=_command(), score=score, protocol=protocol, metric=metric, first_token=first_token,
                         domain_demos=domain_demos, domain_demos_n=domain_demos_n, reference=reference,
                         reference_examples=reference_examples, probe_records=probe_records, probes=probes,
                         batch_tokens=batch_tokens, gradients=gradients, sft_shift=sft_shift, question_evaluation=question_evaluation,
                         placement=Placement(device, dtype, device_map))
    _quiet_libraries()
    results = run_validate(cfg, progress=lambda m: print(f"sts: {m}", file=sys.stderr))
    for name, c in results.correlations.items():
        print(f"{name} ({score}, {metric}, {protocol}): Pearson {c['pearson']:+.3f} [{c['pearson_ci'][0]:+.3f}, "
              f"{c['pearson_ci'][1]:+.3f}]  Spearman {c['spearman']:+.3f} [{c['spearman_ci'][0]:+.3f}, "
              f"{c['spearman_ci'][1]:+.3f}]")
    print("\nground truth: spread of the changes across domains over their standard error")
    print(signal_table(results.signal))
    print(f"\nfirst training set, {metric}:")
    print(comparison_table(results.comparison))
    print(f"\nall {len(cfg.train)} training set(s), {metric}:")
    print(matrix_table(results.matrix, metric))
    if results.swap:
        print(f"\nswap test ({metric}, icl shift): median Pearson with each set's own scores and with another set's")
        print(swap_table(results.swap, metric))
    if results.own_domain:
        print(f"\nsets drawn from one domain: that domain's rank by the {metric} change and by each score")
        print(own_domain_table(results.own_domain))
    print(f"wrote {out}/results.json, correlations.csv, matrices/, comparison.png, heatmaps.png"
          f"{', specificity.png' if len(cfg.train) > 1 else ''} in {results.timings_s['total']:.0f} s",
          file=sys.stderr)


def _score_help(command: typer.core.TyperGroup) -> None:
    """Fill each verb's --score help with the registered scores that verb runs (what the verb's
    config accepts: `sts.scores.score.file_scores` for `sts score`, every score the extraction serves for
    `sts validate`, any for `sts predict`), read from the registry now, not when cli.py was imported."""
    from sts.scores import score as sc

    runs = {"score": sc.file_scores(), "validate": sc.statistics_scores() + sc.gradient_scores(),
            "predict": sc.names()}
    for verb, names in runs.items():
        for param in command.commands[verb].params:
            help_ = getattr(param, "help", None)  # options have help; arguments do not
            if param.name == "score" and isinstance(help_, str):
                param.help = help_.replace(SCORE_HELP, f"one of {', '.join(names)}")  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    """Run one verb and return its exit status (the `sts` script exits with it): 0, or 2 with
    one line on stderr for anything the user can fix, 130 when interrupted."""
    from sts.scores.score import load_plugins

    args = sys.argv[1:] if argv is None else argv
    global _invoked_args
    _invoked_args = list(args)
    try:
        load_plugins()
        command = typer.main.get_command(app)
        assert isinstance(command, typer.core.TyperGroup)
        _score_help(command)
        if not args:
            print(command.get_help(typer.Context(command, info_name="sts")))
            return 0
        code = command.main(args=args, prog_name="sts", standalone_mode=False)
    except UserError as exc:
        print(f"sts: error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.TyperException as exc:  # usage errors (typer vendors click's exceptions)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"sts: error: {message} (see sts --help)", file=sys.stderr)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        print("sts: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
