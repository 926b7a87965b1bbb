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
from typing import Annotated, Optional

import typer

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
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    layer: Annotated[Optional[int], typer.Option(help="override the layer read from the SAE's hook name")] = None,
    skip_bad_lines: Annotated[bool, typer.Option(help="skip malformed JSONL lines with a warning instead of failing")] = False,
) -> None:
    """Stream SAE features of a dataset into statistics (or a dense .pt tensor)."""
    from sts import extract as ex
    from sts.data import load_dataset
    from sts.models import load_model, parse_hook_name
    from sts.saes import load_sae

    fmt = format or (Format.pt if out.suffix.lower() in (".pt", ".pth") else Format.stats)
    if fmt is Format.pt and shift is not Shift.none:
        raise UserError("--format pt writes one run's dense features; drop --shift (extract base "
                        "and shifted runs separately) or write statistics")
    if shift is Shift.sft and not tuned_model:
        raise UserError("--shift sft needs --tuned-model (the fine-tuned model)")
    _require_positive({"--max-tokens": max_tokens, "--max-examples": max_examples,
                       "--max-length": max_length, "--demos": demos})
    _quiet_libraries()
    dataset = load_dataset(data, skip_bad_lines=skip_bad_lines, max_examples=max_examples)
    paired = shift in (Shift.icl, Shift.sft)
    render = ex.Render(
        chat=paired if chat is None else chat,
        with_response=shift is not Shift.none if with_response is None else with_response,
        tokens=(tokens.value if tokens else ("response" if paired else "all")),
    )
    loaded_sae = load_sae(sae)
    point = parse_hook_name(loaded_sae.hook_name, layer)
    for spec in filter(None, (model, tuned_model if shift is Shift.sft else None)):
        ex.check_fits(loaded_sae, point, spec)
    lm = load_model(model)
    engine = ex.Extractor(lm, loaded_sae, point, batch_size)
    examples, tok, n = dataset.examples, lm.tokenizer, len(dataset.examples)
    meta = {"model": model, "sae": sae, "data": data, "hook": point.name, "shift": shift.value,
            "render": asdict(render), "examples": n,
            "demos": demos if shift in (Shift.icl, Shift.paper) else 0, "seed": seed}
    if fmt is Format.pt:
        feats = engine.dense(ex.sequences(examples, tok, render, max_length), n, max_tokens)
        _require_tokens(feats.shape[0], data)
        ex.save_dense(feats, out)
        print(f"wrote {out}: {feats.shape[0]} tokens x {feats.shape[1]} features", file=sys.stderr)
        return
    if shift is Shift.none:
        result = ex.Stats(engine.stats(ex.sequences(examples, tok, render, max_length), n, max_tokens))
    else:
        tuned = None
        if shift is Shift.sft:
            tuned = ex.Extractor(load_model(tuned_model or ""), loaded_sae, point, batch_size)
        result = ex.shift_stats(engine, shift.value, examples, render, demos, seed, max_length,
                                max_tokens, tuned)
    _require_tokens(result.a.count, data)
    result.meta = meta | {"tokens": result.a.count}
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
    domain: Annotated[list[str], typer.Option(help="NAME=FILE (.pt dense tensor or statistics file); repeat per domain")],
    method: Annotated[Optional[str], typer.Option(help="paper for --base/--shifted .pt tensors; with --shift-stats, read from the file")] = None,
    base: Annotated[Optional[Path], typer.Option(help="dense base features (.pt)")] = None,
    shifted: Annotated[Optional[Path], typer.Option(help="dense shifted features (.pt)")] = None,
    shift_stats: Annotated[Optional[Path], typer.Option(help="paired statistics from `sts extract --shift ...`")] = None,
    k: Annotated[int, typer.Option(help="number of shifted features")] = 100,
    max_tokens: Annotated[int, typer.Option(help="rows of each dense tensor used (the reference's N)")] = 10_000,
) -> None:
    """Shifted features and STS per domain; writes {method, k, shifted_features, scores}."""
    from sts import score as sc
    from sts.extract import Stats

    _require_positive({"--max-tokens": max_tokens})
    domains = _parse_domains(domain)
    if shift_stats is not None:
        if base is not None or shifted is not None:
            raise UserError("give either --shift-stats or --base/--shifted, not both")
        if not shift_stats.is_file():
            raise UserError(f"shift statistics file not found: {shift_stats}")
        stats = Stats.load(shift_stats)
        shift = sc.stats_shift(stats, str(shift_stats))
        file_method = stats.meta.get("shift", "icl")
        if method is not None and method != file_method:
            raise UserError(f"{shift_stats} holds a {file_method!r} shift but --method {method} was asked")
        method = file_method
    else:
        if base is None or shifted is None:
            raise UserError("give --base and --shifted (.pt feature tensors), or --shift-stats")
        if method not in (None, "paper"):
            raise UserError(f"--base/--shifted tensors are scored with --method paper (got {method})")
        method = "paper"
        shift = sc.dense_shift(sc.load_dense(base), sc.load_dense(shifted), max_tokens)
    mean_sq = {name: sc.domain_mean_sq(path, max_tokens) for name, path in domains.items()}
    result, scores = sc.score(shift, mean_sq, k)
    payload = {"method": method, "k": k, "shifted_features": result.features, "scores": scores}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    for name, value in sorted(scores.items(), key=lambda kv: -kv[1]):
        print(f"{name}\t{value:.6g}")


@app.command()
def predict(
    train: Annotated[Optional[str], typer.Option(help="training set (default: MMLU math questions, embedded; held out from the math domain)")] = None,
    domains: Annotated[str, typer.Option(help="downstream domains: a dataset with domain labels (MMLU-Pro categories, ...)")] = "embedded:mmlu",
    model: Annotated[Optional[str], typer.Option(help="model (default: embedded SmolLM2-135M-Instruct)")] = None,
    sae: Annotated[Optional[str], typer.Option(help="SAE (default: the embedded SmolLM2 SAE)")] = None,
    method: Annotated[str, typer.Option(help="shift method: icl, sft (with --tuned-model) or paper")] = "icl",
    tuned_model: Annotated[Optional[str], typer.Option(help="fine-tuned model for --method sft")] = None,
    k: Annotated[int, typer.Option(help="number of shifted features")] = 100,
    demos: Annotated[int, typer.Option(help="in-context demonstrations per training example")] = 2,
    seed: Annotated[int, typer.Option(help="seed for drawing demonstrations")] = 0,
    max_train: Annotated[int, typer.Option(help="training examples used")] = 200,
    max_examples: Annotated[int, typer.Option(help="questions per domain")] = 100,
    max_tokens: Annotated[Optional[int], typer.Option(help="tokens per domain")] = None,
    max_length: Annotated[int, typer.Option(help="truncate each model input to N tokens")] = 512,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    out: Annotated[Path, typer.Option(help="output directory for sts.json, sts.csv, sts.png")] = Path("out"),
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse cached extraction")] = True,
    skip_bad_lines: Annotated[bool, typer.Option(help="skip malformed JSONL lines with a warning")] = False,
) -> None:
    """Rank downstream domains by predicted transfer from fine-tuning on a training set."""
    import time

    from sts import report
    from sts.data import load_dataset, select, warn
    from sts.embedded import default_model_dir, default_sae_dir
    from sts.predict import PredictConfig
    from sts.predict import predict as run_predict

    _require_positive({"--max-train": max_train, "--max-examples": max_examples,
                       "--max-tokens": max_tokens, "--max-length": max_length, "--demos": demos})
    started = time.perf_counter()
    _quiet_libraries()
    sae = sae or str(default_sae_dir())
    model = model or str(default_model_dir())
    all_domains = load_dataset(domains, skip_bad_lines)
    if train is None:  # the default: math questions of the domain set itself, held out below
        train_ds = select(all_domains, max_train, keep=lambda e: e.domain == "math")
        train_ds.spec = f"{domains} (math, first {len(train_ds.examples)})"
    else:
        train_ds = load_dataset(train, skip_bad_lines, max_train)
    held_out = {e.prompt for e in train_ds.examples}  # training questions are never scored
    domain_ds = select(all_domains, max_examples, per_domain=True, keep=lambda e: e.prompt not in held_out)
    groups = domain_ds.by_domain()
    if len(groups) < 2:
        warn(f"{domains} has a single domain ({next(iter(groups))}); a ranking needs several")
    cfg = PredictConfig(model=model, sae=sae, train=train_ds.spec, domains=domains, method=method,
                        tuned_model=tuned_model, k=k, demos=demos, seed=seed, max_train=max_train,
                        max_examples=max_examples, max_tokens=max_tokens, max_length=max_length,
                        batch_size=batch_size, use_cache=cache)
    pred = run_predict(cfg, train_ds, groups, progress=lambda m: print(f"sts: {m}", file=sys.stderr))
    paths = report.write(pred, out)
    print(report.table(pred))
    print()
    print(report.features_text(pred))
    print(f"\nwrote {', '.join(map(str, paths))} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)


DEFAULT_CORPUS = ["../shared/data/wiki_demo.txt", "../shared/data/c4_demo.jsonl",
                  "../shared/data/wikitext2_valid.txt", "../shared/data/alpaca_en_demo.json",
                  "embedded:mmlu"]


@app.command("train-sae")
def train_sae(
    out: Annotated[Path, typer.Option(help="output sae_lens directory (cfg.json, sae_weights.safetensors, metrics.json)")],
    layer: Annotated[int, typer.Option(help="decoder layer whose output (resid_post) the SAE reads")],
    model: Annotated[Optional[str], typer.Option(help="model (default: the embedded SmolLM2-135M-Instruct)")] = None,
    corpus: Annotated[Optional[list[str]], typer.Option(help="training text: dataset specs, repeat (default: shared wiki, c4, wikitext-2 valid, alpaca, MMLU questions)")] = None,
    heldout: Annotated[str, typer.Option(help="held-out text for the metrics")] = "../shared/data/wikitext2_test.txt",
    tokens: Annotated[int, typer.Option(help="training tokens of activations to cache")] = 1_000_000,
    activations: Annotated[Optional[Path], typer.Option(help="activation cache directory (resumable; default OUT.acts)")] = None,
    architecture: Annotated[str, typer.Option(help="topk or jumprelu")] = "topk",
    width: Annotated[int, typer.Option(help="number of SAE features")] = 4608,
    k: Annotated[int, typer.Option(help="active features per token (topk)")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 1e-3,
    epochs: Annotated[float, typer.Option(help="passes over the cached activations")] = 1.0,
    train_batch: Annotated[int, typer.Option(help="activations per training step")] = 1024,
    eval_tokens: Annotated[int, typer.Option(help="held-out tokens for the metrics")] = 50_000,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass while caching")] = 8,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence while caching")] = 256,
) -> None:
    """Train a TopK/JumpReLU SAE (sae_lens trainer) on one layer's residual stream."""
    from sts import train_sae as ts
    from sts.embedded import default_model_dir
    from sts.models import HookPoint, check_layer, load_model, model_shape

    _quiet_libraries()
    model = model or str(default_model_dir())
    point = HookPoint(layer, "post")
    check_layer(point, model_shape(model)[1], model)
    lm = load_model(model)
    corpus = corpus or DEFAULT_CORPUS
    acts_dir = activations or out.with_name(out.name + ".acts")
    have = ts.cache_activations(lm, point, ts.corpus_texts(corpus), acts_dir, tokens, seq_len, batch_size)
    print(f"{have} activations cached in {acts_dir}", file=sys.stderr)
    spec = ts.SAETrainSpec(architecture=architecture, width=width, k=k, lr=lr, batch_size=train_batch,
                           epochs=epochs)
    acts, median_norm, sinks = ts.load_activations(acts_dir)
    sae = ts.train(acts, point.name, spec, model_name=model)
    metrics = ts.evaluate_sae(lm, point, sae, ts.corpus_texts([heldout]), median_norm, eval_tokens,
                              seq_len, batch_size)
    metrics |= {"training_tokens": acts.shape[0], "training_sink_tokens_dropped": sinks}
    import shlex

    command = "sts " + shlex.join(_invoked_args)
    tmp = out.with_name(out.name + ".part")
    ts.save_sae(sae, tmp, metrics, spec, command)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps(metrics, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line on stderr and exit 2 for anything the user can fix."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    global _invoked_args
    _invoked_args = list(args)
    if not args:
        print(command.get_help(typer.Context(command, info_name="sts")))
        sys.exit(0)
    try:
        code = command.main(args=args, prog_name="sts", standalone_mode=False)
    except UserError as exc:
        print(f"sts: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors (typer vendors click's exceptions)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"sts: error: {message} (see sts --help)", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("sts: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
