"""The `sts` command line: thin verbs over the pipeline stages.

Bad input ends with one line on stderr and exit status 2 (`UserError` and click's usage
errors alike); outputs are written atomically by the stages.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sts.embedded import DEFAULT_TRAIN
from sts.errors import UserError, atomic_path

app = typer.Typer(add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="SAE-based Transferability Score: predict which domains fine-tuning helps.")


_invoked_args: list[str] = []  # the command line as given, recorded with trained artifacts


class Shift(str, Enum):
    none = "none"
    icl = "icl"
    sft = "sft"
    paper = "paper"


class Format(str, Enum):
    stats = "stats"
    pt = "pt"


class Tokens(str, Enum):
    all = "all"
    response = "response"


# Where models and SAEs load, and how much goes through the model at once (every command that
# loads a model takes these).
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on cuda, float32 elsewhere), float32, bfloat16 or float16")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(help="auto: spread a model too large for one GPU over the visible GPUs (accelerate); the SAE sits beside the hooked layer")]
BatchTokensOpt = Annotated[int, typer.Option(help="padded tokens per forward pass; sequences are sorted by length to keep padding small (raise it on a GPU: 32768 and more)")]
ResponsesOpt = Annotated[str, typer.Option(help="dataset: read features on each record's own response; generated: on the base model's answer to each prompt, as the reference extraction does (vLLM with a GPU, transformers otherwise)")]
TemperatureOpt = Annotated[float, typer.Option(help="sampling temperature of --responses generated (0: greedy)")]
MaxNewTokensOpt = Annotated[int, typer.Option(help="longest generated response (--responses generated)")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(help="at most N sequences per forward pass (default: no cap; --batch-tokens sizes batches)")]


def _placement(device: str, dtype: str, device_map: str | None = None) -> Any:
    """The options checked up front: a bad device or dtype fails in one line, before loading."""
    from sts.models import Placement

    placement = Placement(device, dtype, device_map)
    placement.resolved()
    return placement


def _check_generation(responses: str, temperature: float) -> None:
    """--responses and --temperature, checked before anything loads (extract, predict)."""
    if responses not in ("dataset", "generated"):
        raise UserError(f"unknown --responses {responses!r}; use dataset or generated")
    if temperature < 0:
        raise UserError(f"--temperature must be 0 or more (got {temperature})")


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
    format: Annotated[Optional[Format], typer.Option(help="stats (default) or pt (dense [tokens, d_sae], the reference's format)")] = None,
    shift: Annotated[Shift, typer.Option(help="paired run: icl (with/without demonstrations), sft (base vs --tuned-model), paper (index-aligned streams)")] = Shift.none,
    tuned_model: Annotated[Optional[str], typer.Option(help="fine-tuned model, the shifted side of --shift sft")] = None,
    demos: Annotated[int, typer.Option(help="in-context demonstrations per example (icl, paper)")] = 2,
    seed: Annotated[int, typer.Option(help="seed for drawing demonstrations")] = 0,
    tokens: Annotated[Optional[Tokens], typer.Option(help="tokens counted: all, or the response part of chat examples (default: response for icl/sft, all otherwise)")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="render with the tokenizer's chat template (default: for icl/sft shifts)")] = None,
    with_response: Annotated[Optional[bool], typer.Option("--with-response/--question-only", help="include each record's response (default: with for shifts, question only otherwise)")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="stop after this many counted tokens (paper: default 10000)")] = None,
    max_examples: Annotated[Optional[int], typer.Option(help="use only the first N records")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="truncate each model input to N tokens")] = None,
    batch_size: BatchSizeOpt = None,
    batch_tokens: BatchTokensOpt = 4096,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    responses: ResponsesOpt = "dataset",
    temperature: TemperatureOpt = 0.6,
    max_new_tokens: MaxNewTokensOpt = 512,
    layer: Annotated[Optional[int], typer.Option(help="override the layer read from the SAE's hook name")] = None,
    first_token: Annotated[bool, typer.Option("--first-token/--no-first-token", help="count each sequence's first token (the attention sink); kept by default, as the reference does")] = True,
    readout: Annotated[str, typer.Option(help="sae (SAE features) or raw (the layer's residual dimensions: the raw-* and cosine baselines)")] = "sae",
    domain_demos: Annotated[Optional[str], typer.Option(help="with --shift icl: pair each record with m fixed demonstrations of its own domain from this dataset (the icl score's domain statistics) instead of random demonstrations from --data")] = None,
    domain_demos_n: Annotated[int, typer.Option(help="demonstrations per domain (--domain-demos)")] = 5,
    skip_bad_lines: Annotated[bool, typer.Option(help="skip malformed JSONL lines with a warning instead of failing")] = False,
) -> None:
    """Stream SAE features of a dataset into statistics (or a dense .pt tensor)."""
    from sts import extract as ex
    from sts.data import load_dataset
    from sts.models import load_model, parse_hook_name
    from sts.saes import check_pairing, load_sae

    fmt = format or (Format.pt if out.suffix.lower() in (".pt", ".pth") else Format.stats)
    if fmt is Format.pt and shift is not Shift.none:
        raise UserError("--format pt writes one run's dense features; drop --shift (extract base "
                        "and shifted runs separately) or write statistics")
    if shift is Shift.sft and not tuned_model:
        raise UserError("--shift sft needs --tuned-model (the fine-tuned model)")
    if readout not in ex.READOUTS:
        raise UserError(f"unknown --readout {readout!r}; use sae or raw")
    _check_generation(responses, temperature)
    if domain_demos is not None and shift is not Shift.icl:
        raise UserError("--domain-demos pairs each record with its domain's demonstrations: use it with --shift icl")
    _require_positive({"--max-tokens": max_tokens, "--max-examples": max_examples,
                       "--max-length": max_length, "--demos": demos, "--domain-demos-n": domain_demos_n,
                       "--batch-size": batch_size, "--batch-tokens": batch_tokens,
                       "--max-new-tokens": max_new_tokens})
    placement = _placement(device, dtype, device_map)
    _quiet_libraries()
    dataset = load_dataset(data, skip_bad_lines=skip_bad_lines, max_examples=max_examples)
    # Domain questions with their domain's demonstrations are rendered as `sts predict` renders
    # domain questions (plain text, question only, every token); training pairs as chat turns.
    paired = shift in (Shift.icl, Shift.sft) and domain_demos is None
    render = ex.Render(
        chat=paired if chat is None else chat,
        with_response=paired or shift is Shift.paper if with_response is None else with_response,
        tokens=(tokens.value if tokens else ("response" if paired else "all")),
        skip_first=not first_token,
    )
    if render.skip_first and shift is Shift.paper:
        raise UserError("--no-first-token does not apply to --shift paper (index-aligned streams "
                        "count every token, as the reference does)")
    loaded_sae = load_sae(sae)
    point = parse_hook_name(loaded_sae.hook_name, layer)
    for spec in filter(None, (model, tuned_model if shift is Shift.sft else None)):
        ex.check_fits(loaded_sae, point, spec)
    check_pairing(loaded_sae, model)
    lm = load_model(model, placement.dtype, placement.device, placement.device_map)
    engine = ex.Extractor(lm, loaded_sae, point, batch_size, batch_tokens)
    examples, tok, n = dataset.examples, lm.tokenizer, len(dataset.examples)
    if responses == "generated":
        from sts.generate import Generation, generated_responses

        examples = generated_responses(lm, examples, Generation(temperature, max_new_tokens, seed), batch_size or 8)
        texts = out.with_name(out.name + ".generated.jsonl")  # beside the output: what was read
        with atomic_path(texts) as tmp:
            tmp.write_text("".join(json.dumps({"id": e.uid, "prompt": e.prompt, "response": e.response}) + "\n"
                                   for e in examples))
        print(f"wrote {texts}: the model's {n} responses", file=sys.stderr)
    meta = {"model": model, "sae": sae, "data": data, "hook": point.name, "shift": shift.value,
            **placement.describe(),
            "render": asdict(render), "examples": n, "readout": readout,
            "demos": demos if shift in (Shift.icl, Shift.paper) else 0, "seed": seed, "responses": responses}
    if responses == "generated":
        meta["generation"] = {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
    if fmt is Format.pt:
        feats = engine.dense(ex.sequences(examples, tok, render, max_length), n, max_tokens, readout=readout)
        _require_tokens(feats.shape[0], data)
        ex.save_dense(feats, out)
        print(f"wrote {out}: {feats.shape[0]} tokens x {feats.shape[1]} features", file=sys.stderr)
        return
    if shift is Shift.none:
        result = ex.Stats(engine.stats_many(ex.sequences(examples, tok, render, max_length), (readout,), n,
                                            max_tokens)[readout])
    elif domain_demos is not None:
        from sts.data import domain_demonstrations

        shown, left = domain_demonstrations(dataset.by_domain(), domain_demos_n, domain_demos, skip_bad_lines)
        if readout != "sae":
            raise UserError("--domain-demos statistics are read on SAE features (the icl score); drop --readout raw")
        questions = [e for exs in left.values() for e in exs]  # a demonstration is never scored
        result = ex.domain_shift_stats(engine, questions, shown.demos, render, max_length, max_tokens)
        meta["examples"] = len(questions)
        meta |= {"demos": domain_demos_n, "domain_demonstrations": shown.describe()}
    else:
        tuned = None
        if shift is Shift.sft:
            tuned = ex.Extractor(load_model(tuned_model or "", placement.dtype, placement.device, placement.device_map),
                                 loaded_sae, point, batch_size, batch_tokens)
        result = ex.shift_stats(engine, shift.value, examples, render, demos, seed, max_length,
                                max_tokens, tuned, (readout,))[readout]
    _require_tokens(result.a.count, data)
    result.meta = meta | {"tokens": result.a.count} | (
        {"truncation": result.meta["truncation"]} if "truncation" in result.meta else {})
    result.save(out)
    print(f"wrote {out}: {result.a.count} tokens, {result.a.d_sae} features", file=sys.stderr)


def _require_positive(options: dict[str, int | None]) -> None:
    for name, value in options.items():
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1 (got {value})")


def _require_tokens(count: int, data: str) -> None:
    if count == 0:
        raise UserError(f"no tokens were counted in {data} (empty records, or no aligned response "
                        "tokens); check the data, or try --tokens all")


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
    score: Annotated[str, typer.Option(help="act, icl, sq (the notebook's; default), or a baseline: raw-act, raw-sq, cosine, lexical")] = "sq",
    method: Annotated[Optional[str], typer.Option(help="paper for --base/--shifted .pt tensors; with --shift-stats, read from the file")] = None,
    base: Annotated[Optional[Path], typer.Option(help="dense base features (.pt)")] = None,
    shifted: Annotated[Optional[Path], typer.Option(help="dense shifted features (.pt)")] = None,
    shift_stats: Annotated[Optional[Path], typer.Option(help="paired statistics from `sts extract --shift ...` (--readout raw for raw-act, raw-sq, cosine)")] = None,
    train: Annotated[Optional[str], typer.Option(help="training set (dataset spec) for --score lexical")] = None,
    k: Annotated[int, typer.Option(help="number of shifted features")] = 100,
    max_tokens: Annotated[int, typer.Option(help="rows of each dense tensor used (the reference's N)")] = 10_000,
) -> None:
    """Shifted features and a score per domain; writes {score, formula, method, k, shifted_features, scores}."""
    from sts import score as sc
    from sts.extract import Stats

    _require_positive({"--max-tokens": max_tokens})
    sc.check_score(score)
    domains = _parse_domains(domain)
    features: list[int] = []
    if score == "lexical":
        from sts.data import load_dataset

        if train is None:
            raise UserError("--score lexical compares texts: give --train SPEC and --domain NAME=DATASET")
        train_ds = load_dataset(train)
        train_text = "\n\n".join(f"{e.prompt}\n{e.response or ''}" for e in train_ds.examples)
        texts = {n: "\n\n".join(e.prompt for e in load_dataset(spec).examples) for n, spec in domains.items()}
        scores, method = sc.lexical_scores(train_text, texts), None
    elif shift_stats is not None:
        if base is not None or shifted is not None:
            raise UserError("give either --shift-stats or --base/--shifted, not both")
        if not shift_stats.is_file():
            raise UserError(f"shift statistics file not found: {shift_stats}")
        stats = Stats.load(shift_stats)
        shift = sc.stats_shift(stats, str(shift_stats))
        sc.check_readout(stats, score, str(shift_stats))
        file_method = stats.meta.get("shift", "icl")
        if method is not None and method != file_method:
            raise UserError(f"{shift_stats} holds a {file_method!r} shift but --method {method} was asked")
        method = file_method
        if score == "cosine":
            domain_stats = {}
            for name, path in domains.items():
                if sc.is_dense(path) or not Path(path).is_file():
                    raise UserError(f"--score cosine needs raw statistics files per domain (got {path})")
                domain_stats[name] = Stats.load(path)
                sc.check_readout(domain_stats[name], score, path)
            train_mean = stats.a.sum / stats.a.count
            scores = {n: sc.cosine(train_mean, st.a.sum / max(st.a.count, 1)) for n, st in domain_stats.items()}
        else:
            values = {name: sc.domain_values(score, path, max_tokens) for name, path in domains.items()}
            result, scores = sc.score(shift, values, min(k, shift.shape[0]), sc.REDUCE[score])
            features = result.features
    else:
        if base is None or shifted is None:
            raise UserError("give --base and --shifted (.pt feature tensors), or --shift-stats")
        if method not in (None, "paper"):
            raise UserError(f"--base/--shifted tensors are scored with --method paper (got {method})")
        if score not in ("act", "sq"):
            raise UserError(f"dense .pt tensors give the act and sq scores; --score {score} needs "
                            "statistics files (`sts extract`)")
        method = "paper"
        shift = sc.dense_shift(sc.load_dense(base), sc.load_dense(shifted), max_tokens)
        values = {name: sc.domain_values(score, path, max_tokens) for name, path in domains.items()}
        result, scores = sc.score(shift, values, k, sc.REDUCE[score])
        features = result.features
    payload = {"score": score, "formula": sc.FORMULAS[score], "method": method, "k": k,
               "shifted_features": features, "scores": scores}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    for name, value in sorted(scores.items(), key=lambda kv: -kv[1]):
        print(f"{name}\t{value:.6g}")


@app.command()
def predict(
    train: Annotated[Optional[str], typer.Option(help="training set (default: CHAMP, 270 competition-math problems with worked solutions, embedded; `embedded:mmlu#category=math` for MMLU math questions, held out of the math domain)")] = None,
    domains: Annotated[str, typer.Option(help="downstream domains: a dataset with domain labels (MMLU-Pro categories, ...)")] = "embedded:mmlu",
    model: Annotated[Optional[str], typer.Option(help="model (default: embedded SmolLM2-135M-Instruct)")] = None,
    sae: Annotated[Optional[str], typer.Option(help="SAE (default: the embedded SmolLM2 SAE)")] = None,
    method: Annotated[str, typer.Option(help="shift method: icl, sft (with --tuned-model) or paper")] = "icl",
    tuned_model: Annotated[Optional[str], typer.Option(help="fine-tuned model for --method sft")] = None,
    k: Annotated[int, typer.Option(help="number of shifted features")] = 100,
    demos: Annotated[int, typer.Option(help="in-context demonstrations per training example")] = 2,
    seed: Annotated[int, typer.Option(help="seed for drawing demonstrations")] = 0,
    max_train: Annotated[int, typer.Option(help="training examples used (CHAMP pairs run to ~830 tokens with their 2 demonstrations: 100 keep a cold run near 10 minutes on 2 CPU cores)")] = 100,
    max_examples: Annotated[int, typer.Option(help="questions per domain")] = 100,
    max_tokens: Annotated[Optional[int], typer.Option(help="tokens per domain")] = None,
    max_length: Annotated[int, typer.Option(help="truncate each model input to N tokens (ICL pairs: the example is cut, never its demonstrations; CHAMP pairs are ~830 tokens at the median)")] = 1024,
    batch_size: BatchSizeOpt = None,
    batch_tokens: BatchTokensOpt = 4096,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    responses: ResponsesOpt = "dataset",
    temperature: TemperatureOpt = 0.6,
    max_new_tokens: MaxNewTokensOpt = 512,
    out: Annotated[Path, typer.Option(help="output directory for sts.json, sts.csv, sts.png")] = Path("out"),
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse cached extraction")] = True,
    first_token: Annotated[bool, typer.Option("--first-token/--no-first-token", help="count each domain question's first token (the attention sink; left out by default)")] = False,
    score: Annotated[str, typer.Option(help="domain score: act (STS_act), icl (STS_ICL), sq (the reference notebook's; default), or a baseline: raw-act, raw-sq, cosine, lexical")] = "sq",
    domain_demos: Annotated[Optional[str], typer.Option(help="icl score: dataset with each domain's demonstrations (MMLU-Pro records with cot_content use the chain of thought); default: each domain's first m questions, then not scored")] = None,
    domain_demos_n: Annotated[int, typer.Option(help="icl score: demonstrations per domain (m)")] = 5,
    skip_bad_lines: Annotated[bool, typer.Option(help="skip malformed JSONL lines with a warning")] = False,
) -> None:
    """Rank downstream domains by predicted transfer from fine-tuning on a training set."""
    import time

    from sts import report
    from sts.embedded import default_sae_dir
    from sts.models import default_model_dir
    from sts.prediction import PredictConfig
    from sts.prediction import predict as run_predict

    from sts.score import check_score

    from sts.generate import Generation

    _require_positive({"--max-train": max_train, "--max-examples": max_examples, "--max-tokens": max_tokens,
                       "--max-length": max_length, "--demos": demos, "--domain-demos-n": domain_demos_n,
                       "--batch-size": batch_size, "--batch-tokens": batch_tokens, "--max-new-tokens": max_new_tokens})
    check_score(score)
    _check_generation(responses, temperature)
    placement = _placement(device, dtype, device_map)
    started = time.perf_counter()
    _quiet_libraries()
    sae = sae or str(default_sae_dir())
    model = model or str(default_model_dir())
    # Demonstrations are never scored (taken from the domains' own questions, or found among
    # them): read m more questions per domain, so that --max-examples remain.
    extra = domain_demos_n if score == "icl" else 0
    train_ds, groups = _train_and_domains(train, domains, max_train, max_examples + extra, skip_bad_lines)
    cfg = PredictConfig(model=model, sae=sae, train=train_ds.spec, domains=domains, method=method,
                        tuned_model=tuned_model, k=k, demos=demos, seed=seed, max_train=max_train,
                        max_examples=max_examples, max_tokens=max_tokens, max_length=max_length,
                        batch_size=batch_size, batch_tokens=batch_tokens, use_cache=cache,
                        skip_first=not first_token, score=score, domain_demos=domain_demos,
                        domain_demos_n=domain_demos_n, placement=placement, responses=responses,
                        generation=Generation(temperature, max_new_tokens, seed))
    pred = run_predict(cfg, train_ds, groups, progress=lambda m: print(f"sts: {m}", file=sys.stderr))
    paths = report.write(pred, out)
    print(f"score {pred.score}: {pred.formula}")
    if pred.demonstrations:
        print(f"domain demonstrations: {report.demonstrations_text(pred)}")
    print(report.table(pred))
    print()
    print(report.features_text(pred))
    print(f"\nwrote {', '.join(map(str, paths))} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)




def _decontaminated(domains: str, against: list[str], per_domain: int | None,
                    skip_bad_lines: bool = False, examples: tuple[Any, ...] = ()
                    ) -> tuple[dict[str, list[Any]], dict[str, int]]:
    from sts.data import clean_questions

    return clean_questions(domains, against, per_domain, skip_bad_lines, examples)


def _train_and_domains(train: str | None, domains: str, max_train: int, max_examples: int | None,
                       skip_bad_lines: bool = False, exclude: list[str] | None = None
                       ) -> tuple[Any, dict[str, list[Any]]]:
    from sts.data import training_and_domains

    return training_and_domains(train or DEFAULT_TRAIN, domains, max_train, max_examples, skip_bad_lines, exclude)



@app.command("train-sae")
def train_sae(
    out: Annotated[Path, typer.Option(help="output sae_lens directory (cfg.json, sae_weights.safetensors, metrics.json)")],
    layer: Annotated[int, typer.Option(help="decoder layer whose output (resid_post) the SAE reads")],
    corpus: Annotated[list[str], typer.Option(help="training text: dataset specs, repeat (the embedded SAE's corpus is in its metrics.json `command`)")],
    heldout: Annotated[str, typer.Option(help="held-out text for the metrics (not in --corpus)")],
    model: Annotated[Optional[str], typer.Option(help="model (default: the embedded SmolLM2-135M-Instruct)")] = None,
    tokens: Annotated[int, typer.Option(help="training tokens of activations to cache")] = 1_000_000,
    activations: Annotated[Optional[Path], typer.Option(help="activation cache directory (resumable; default OUT.acts)")] = None,
    architecture: Annotated[str, typer.Option(help="topk or jumprelu")] = "topk",
    width: Annotated[int, typer.Option(help="number of SAE features")] = 4608,
    k: Annotated[int, typer.Option(help="active features per token (topk)")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
    epochs: Annotated[float, typer.Option(help="passes over the cached activations")] = 1.0,
    train_batch: Annotated[int, typer.Option(help="activations per training step")] = 1024,
    dead_window: Annotated[int, typer.Option(help="tokens without firing after which TopK's auxiliary loss trains a feature")] = 50_000,
    eval_tokens: Annotated[int, typer.Option(help="held-out tokens for the metrics")] = 50_000,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass while caching")] = 8,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence while caching")] = 256,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Train a TopK/JumpReLU SAE (sae_lens trainer) on one layer's residual stream."""
    from sts import train_sae as ts
    from sts.models import default_model_dir
    from sts.models import HookPoint, check_layer, load_model, model_shape

    _require_positive({"--tokens": tokens, "--width": width, "--k": k, "--train-batch": train_batch,
                       "--dead-window": dead_window, "--eval-tokens": eval_tokens})
    placement = _placement(device, dtype)
    _quiet_libraries()
    model = model or str(default_model_dir())
    point = HookPoint(layer, "post")
    check_layer(point, model_shape(model)[1], model)
    lm = load_model(model, placement.dtype, placement.device)
    acts_dir = activations or out.with_name(out.name + ".acts")
    have = ts.cache_activations(lm, point, ts.corpus_texts(corpus), acts_dir, tokens, seq_len, batch_size)
    print(f"{have} activations cached in {acts_dir}", file=sys.stderr)
    spec = ts.SAETrainSpec(architecture=architecture, width=width, k=k, lr=lr, batch_size=train_batch,
                           epochs=epochs, dead_window_tokens=dead_window)
    acts, median_norm, sinks = ts.load_activations(acts_dir)
    sae = ts.train(acts, point.name, spec, model_name=model, device=placement.resolved()[0])
    metrics = ts.evaluate_sae(lm, point, sae, ts.corpus_texts([heldout]), median_norm, eval_tokens,
                              seq_len, batch_size)
    metrics |= {"training_tokens": acts.shape[0], "training_sink_tokens_dropped": sinks}
    command = _command()
    tmp = out.with_name(out.name + ".part")
    ts.save_sae(sae, tmp, metrics, spec, command)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps(metrics, indent=2))


def _command() -> str:
    import shlex

    return "sts " + shlex.join(_invoked_args)


@app.command()
def finetune(
    out: Annotated[Path, typer.Option(help="output directory: merged model (usable as --model), adapter/, finetune.json")],
    train: Annotated[Optional[str], typer.Option(help="training set (default: CHAMP, embedded; SPEC#category=NAME selects one domain of a file)")] = None,
    model: Annotated[Optional[str], typer.Option(help="model to fine-tune (default: embedded SmolLM2-135M-Instruct)")] = None,
    max_train: Annotated[int, typer.Option(help="training examples used")] = 200,
    full: Annotated[bool, typer.Option("--full/--lora", help="full fine-tuning instead of LoRA")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank (all linear layers)")] = 16,
    lr: Annotated[Optional[float], typer.Option(help="learning rate (default 2e-4 LoRA, 2e-5 full)")] = None,
    max_steps: Annotated[int, typer.Option(help="optimizer steps")] = 60,
    batch_size: Annotated[int, typer.Option(help="examples per step (before accumulation)")] = 4,
    grad_accum: Annotated[int, typer.Option(help="gradient accumulation steps")] = 1,
    max_length: Annotated[Optional[int], typer.Option(help="tokens per record (default: fit the data: the longest record rounded up to 64, at most 1024); records whose prompt fills it are dropped, longer ones cut, both reported")] = None,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="recompute activations in the backward pass: less GPU memory for 7-9B models, ~30% slower")] = False,
    report_to: Annotated[str, typer.Option(help="where the trainer logs: none, tensorboard or wandb")] = "none",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    skip_bad_lines: Annotated[bool, typer.Option(help="skip malformed JSONL lines with a warning")] = False,
) -> None:
    """Supervised fine-tuning (TRL; LoRA by default), loss on response tokens only."""
    from sts.data import load_dataset
    from sts.models import default_model_dir
    from sts.finetuning import FinetuneSpec
    from sts.finetuning import finetune as run_finetune
    from sts.models import load_model

    from sts.finetuning import check_report_to

    _require_positive({"--max-train": max_train, "--max-steps": max_steps, "--batch-size": batch_size,
                       "--grad-accum": grad_accum, "--max-length": max_length, "--lora-r": lora_r})
    check_report_to(report_to)
    placement = _placement(device, dtype, device_map)
    _quiet_libraries()
    train_ds = load_dataset(train or DEFAULT_TRAIN, skip_bad_lines, max_train)
    spec = FinetuneSpec(lora=not full, lora_r=lora_r, lora_alpha=2 * lora_r, lr=lr, batch_size=batch_size,
                        grad_accum=grad_accum, max_length=max_length, max_steps=max_steps, seed=seed,
                        gradient_checkpointing=gradient_checkpointing, report_to=report_to)
    # Loaded in the chosen dtype for this run only: trained in place, never copied.
    lm = load_model(model or str(default_model_dir()), placement.dtype, placement.device, placement.device_map)
    result = run_finetune(lm, train_ds.examples, spec, out, _command(), in_place=True)
    first, last = result.losses[0], result.losses[-1]
    lengths = result.lengths
    print(f"--max-length {lengths.get('max_length')}: {lengths.get('dropped', 0)} records dropped, "
          f"{lengths.get('cut', 0)} cut (longest {lengths.get('longest')} tokens)")
    print(f"fine-tuned on {lengths.get('kept', len(train_ds.examples))} examples ({train_ds.spec}): {spec.max_steps} steps "
          f"in {result.seconds:.0f} s, loss {first:.3f} -> {last:.3f}; model: {out}"
          + (f", adapter: {result.adapter}" if result.adapter else ""))


class Mode(str, Enum):
    mc = "mc"
    cot = "cot"
    reference = "reference"


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option(help="output directory: predictions.csv, accuracy.json")],
    model: Annotated[Optional[str], typer.Option(help="model (default: embedded SmolLM2-135M-Instruct)")] = None,
    domains: Annotated[str, typer.Option(help="multiple-choice questions with domain labels (MMLU, MMLU-Pro)")] = "embedded:mmlu",
    mode: Annotated[Mode, typer.Option(help="mc: option-letter log-likelihood; cot: generate, then MMLU-Pro answer extraction")] = Mode.mc,
    shots: Annotated[int, typer.Option(help="demonstrations per prompt: each domain's first N questions (not scored)")] = 0,
    max_examples: Annotated[Optional[int], typer.Option(help="questions scored per domain")] = 100,
    max_new_tokens: Annotated[int, typer.Option(help="generation budget per question (cot)")] = 256,
    batch_size: Annotated[int, typer.Option(help="questions per generate call (cot)")] = 8,
    batch_tokens: BatchTokensOpt = 4096,
    train: Annotated[Optional[list[str]], typer.Option(help="training set(s) in play: their questions are left out (repeat)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="also leave out questions found in this dataset (repeat), e.g. the MMLU-Pro test set, to leave out the MMLU questions MMLU-Pro took")] = None,
    likelihoods: Annotated[bool, typer.Option("--likelihoods/--no-likelihoods", help="also measure nll, acc_norm, p_correct (option texts) and cot_nll (reference chains of thought)")] = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    skip_bad_lines: Annotated[bool, typer.Option(help="skip malformed JSONL lines with a warning")] = False,
) -> None:
    """Accuracy per domain, with per-question predictions (mode reference: cot_nll only)."""
    from sts.models import default_model_dir
    from sts.evaluation import evaluate as run_evaluate
    from sts.evaluation import summary_table
    from sts.models import load_model

    _require_positive({"--max-examples": max_examples, "--max-new-tokens": max_new_tokens})
    placement = _placement(device, dtype, device_map)
    _quiet_libraries()
    per_domain = None if max_examples is None else max_examples + max(shots, 0)
    groups, removed = _decontaminated(domains, list(train or []) + list(exclude or []), per_domain, skip_bad_lines)
    lm = load_model(model or str(default_model_dir()), placement.dtype, placement.device, placement.device_map)
    ev = run_evaluate(lm, groups, mode.value, shots, batch_size, max_new_tokens, likelihoods=likelihoods,
                      batch_tokens=batch_tokens)
    ev.excluded = removed
    paths = ev.save(out)
    print(summary_table(ev))
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)


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
    replicates: Annotated[int, typer.Option(help="bootstrap replicates")] = 1000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    name: Annotated[str, typer.Option(help="output file stem")] = "correlation",
    protocol: Annotated[str, typer.Option(help="signed (all domains, signed change; default), abs (all domains, absolute change), paper (absolute change, 4 largest + 4 smallest: chosen from the outcome)")] = "signed",
    metric: Annotated[str, typer.Option(help="ground truth (--base/--tuned): acc, nll, acc_norm, p_correct or cot_nll")] = "acc",
) -> None:
    """Pearson/Spearman between STS and the accuracy change, bootstrap 95% CI, scatter plot."""
    from sts import correlation as co
    from sts.evaluation import Evaluation

    _require_positive({"--replicates": replicates})
    if protocol not in co.PROTOCOLS:
        raise UserError(f"unknown --protocol {protocol!r}; use {', '.join(co.PROTOCOLS)}")
    scores, resample = co.load_sts(sts)
    if table is not None:
        if base is not None or tuned is not None:
            raise UserError("give either --table (with --questions, --base-model, --tuned-model) or --base/--tuned")
        if not questions or not base_model or not tuned_model:
            raise UserError("--table needs --questions, --base-model and --tuned-model")
        changes = co.changes_from_table(table, questions, base_model, tuned_model)
        title = f"{base_model} -> {tuned_model}"
    else:
        if base is None or tuned is None:
            raise UserError("give --base and --tuned (`sts evaluate` outputs), or --table")
        changes = co.changes_from_evaluations(Evaluation.load(base), Evaluation.load(tuned), metric)
        title = f"{base.name} -> {tuned.name}"
    corr = co.correlate(scores, changes, replicates, seed, resample, protocol, metric)
    paths = co.write(corr, scores, changes, out, name, title)
    print(f"protocol {protocol}: {corr.protocol_note}; domains: {', '.join(corr.domains_used)}")
    for r in co.rows({d: scores[d] for d in corr.domains_used}, changes):
        print(f"{r['domain']:<18} STS {r['sts']:.6g}  change {r['delta']:+8.4g} ({r['questions']} questions)")
    print(co.summary(corr))
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)


@app.command()
def validate(
    out: Annotated[Path, typer.Option(help="results folder (a rerun resumes: finished stages are verified and reused)")] = Path("validate"),
    train: Annotated[Optional[list[str]], typer.Option(help="training set; repeat for a transfer matrix (default: CHAMP, embedded; SPEC#category=NAME selects one domain of a file)")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="also leave out domain questions found in this dataset (repeat), e.g. the MMLU-Pro test set when training on MMLU-Pro data and evaluating on MMLU")] = None,
    metric: Annotated[str, typer.Option(help="primary ground truth: acc, nll, acc_norm, p_correct or cot_nll; every measured metric is reported")] = "acc",
    domains: Annotated[str, typer.Option(help="multiple-choice questions with domain labels")] = "embedded:mmlu",
    model: Annotated[Optional[str], typer.Option(help="model (default: embedded SmolLM2-135M-Instruct)")] = None,
    sae: Annotated[Optional[str], typer.Option(help="SAE (default: the embedded SmolLM2 SAE)")] = None,
    max_train: Annotated[int, typer.Option(help="training examples (shift and fine-tuning)")] = 200,
    predict_examples: Annotated[int, typer.Option(help="questions per domain for STS")] = 100,
    eval_examples: Annotated[int, typer.Option(help="questions per domain for accuracy")] = 100,
    k: Annotated[int, typer.Option(help="number of shifted features")] = 100,
    demos: Annotated[int, typer.Option(help="in-context demonstrations (icl shift)")] = 2,
    max_steps: Annotated[int, typer.Option(help="fine-tuning steps")] = 60,
    ft_batch_size: Annotated[int, typer.Option(help="fine-tuning examples per step")] = 4,
    lr: Annotated[Optional[float], typer.Option(help="fine-tuning learning rate (default 2e-4 LoRA)")] = None,
    full: Annotated[bool, typer.Option("--full/--lora", help="full fine-tuning instead of LoRA")] = False,
    ft_max_length: Annotated[Optional[int], typer.Option(help="fine-tuning tokens per record (default: fit the data, at most 1024)")] = None,
    shots: Annotated[int, typer.Option(help="evaluation demonstrations per prompt")] = 0,
    replicates: Annotated[int, typer.Option(help="bootstrap replicates")] = 1000,
    seed: Annotated[int, typer.Option(help="seed (demonstrations, fine-tuning, bootstrap)")] = 0,
    batch_size: BatchSizeOpt = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse cached extraction")] = True,
    score: Annotated[str, typer.Option(help="primary score (scatter plots, predict-*/); every score and baseline is reported")] = "sq",
    protocol: Annotated[str, typer.Option(help="primary correlation protocol: signed, abs or paper; every protocol is reported")] = "signed",
    domain_demos: Annotated[Optional[str], typer.Option(help="icl score: dataset with each domain's demonstrations; default: each domain's first m questions (then left out of every score)")] = None,
    domain_demos_n: Annotated[int, typer.Option(help="icl score: demonstrations per domain (m)")] = 5,
    reference: Annotated[Optional[str], typer.Option(help="cot_nll's ground truth: records with a reference chain of thought (cot_content) per domain, e.g. MMLU-Pro CoT records; records in any training set are left out")] = None,
    reference_examples: Annotated[int, typer.Option(help="reference records per domain")] = 100,
    batch_tokens: BatchTokensOpt = 4096,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
) -> None:
    """Per training set: predict (icl) -> finetune -> evaluate -> predict (sft); then the transfer matrix."""
    from sts.data import load_dataset
    from sts.embedded import default_sae_dir
    from sts.models import default_model_dir
    from sts.finetuning import FinetuneSpec
    from sts.validation import ValidateConfig
    from sts.validation import validate as run_validate

    _require_positive({"--max-train": max_train, "--predict-examples": predict_examples,
                       "--eval-examples": eval_examples, "--max-steps": max_steps,
                       "--ft-batch-size": ft_batch_size, "--replicates": replicates, "--demos": demos,
                       "--batch-tokens": batch_tokens})
    placement = _placement(device, dtype, device_map)
    if shots < 0:
        raise UserError(f"--shots must be 0 or more (got {shots})")
    _quiet_libraries()
    sae = sae or str(default_sae_dir())
    model = model or str(default_model_dir())
    from sts.extract import check_fits
    from sts.models import parse_hook_name
    from sts.saes import load_sae

    loaded = load_sae(sae)
    check_fits(loaded, parse_hook_name(loaded.hook_name), model)
    from sts.correlation import PROTOCOLS
    from sts.evaluation import METRICS
    from sts.score import check_score
    from sts.validation import comparison_table, matrix_table, signal_table

    check_score(score)
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown --protocol {protocol!r}; use {', '.join(PROTOCOLS)}")
    if metric not in METRICS:
        raise UserError(f"unknown --metric {metric!r}; use {', '.join(METRICS)}")
    _require_positive({"--domain-demos-n": domain_demos_n, "--ft-max-length": ft_max_length})
    extra = domain_demos_n  # demonstrations are left out of the domains' questions
    specs = list(train or [DEFAULT_TRAIN])
    if len(set(specs)) < len(specs):
        raise UserError("a training set is given twice; give each --train once")
    trains = [load_dataset(t, max_examples=max_train) for t in specs]
    groups, removed = _decontaminated(domains, list(exclude or []), max(predict_examples, eval_examples + shots) + extra,
                                      examples=tuple(e for t in trains for e in t.examples))
    references: dict[str, list[Any]] = {}
    if reference:
        _require_positive({"--reference-examples": reference_examples})
        references, _ = _decontaminated(reference, [], None, examples=tuple(e for t in trains for e in t.examples))
        references = {d: [e for e in q if e.cot][:reference_examples] for d, q in references.items()}
        references = {d: q for d, q in references.items() if q}
        if not references:
            raise UserError(f"--reference {reference}: no record with a reference chain of thought (cot_content) "
                            "is left; give MMLU-Pro-style records with cot_content")
    spec = FinetuneSpec(lora=not full, lr=lr, batch_size=ft_batch_size, max_steps=max_steps, seed=seed,
                        max_length=ft_max_length)
    cfg = ValidateConfig(model=model, sae=sae, domains=domains, out=out, trains=trains, k=k, demos=demos,
                         seed=seed, predict_examples=predict_examples, eval_examples=eval_examples,
                         batch_size=batch_size, shots=shots, replicates=replicates, finetune=spec,
                         use_cache=cache, command=_command(), score=score, protocol=protocol, metric=metric,
                         domain_demos=domain_demos, domain_demos_n=domain_demos_n, excluded=removed,
                         reference=references, reference_spec=reference, batch_tokens=batch_tokens,
                         placement=placement)
    results = run_validate(cfg, groups, progress=lambda m: print(f"sts: {m}", file=sys.stderr))
    for name, c in results["correlations"].items():
        print(f"{name} ({score}, {metric}, {protocol}): Pearson {c['pearson']:+.3f} [{c['pearson_ci'][0]:+.3f}, "
              f"{c['pearson_ci'][1]:+.3f}]  Spearman {c['spearman']:+.3f} [{c['spearman_ci'][0]:+.3f}, "
              f"{c['spearman_ci'][1]:+.3f}]")
    print("\nground truth: spread of the changes across domains over their standard error")
    print(signal_table(results["signal"]))
    print(f"\nfirst training set, {metric}:")
    print(comparison_table(results["comparison"]))
    print(f"\nall {len(trains)} training set(s), {metric}:")
    print(matrix_table(results["matrix"], metric))
    print(f"wrote {out}/results.json, correlations.csv, matrices/, comparison.png, heatmaps.png"
          f"{', specificity.png' if len(trains) > 1 else ''} in {results['timings_s']['total']:.0f} s",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one verb and return its exit status (the `sts` script exits with it): 0, or 2 with
    one line on stderr for anything the user can fix, 130 when interrupted."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    global _invoked_args
    _invoked_args = list(args)
    if not args:
        print(command.get_help(typer.Context(command, info_name="sts")))
        return 0
    try:
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
