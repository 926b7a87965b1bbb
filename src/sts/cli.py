"""The `sts` command line: thin verbs over the pipeline stages.

Every verb's options are built from its config dataclass (`_verb`): each field's help, flag and
bound are written once, on the field (`sts.options`), so the command line and the Python API take
the same settings with the same defaults and rules. The configs import no torch, so neither does
`sts --help`. Bad input ends with one line on stderr and exit status 2 (`UserError` and click's
usage errors alike); outputs are written atomically by the stages.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from sts import files
from sts.analysis.correlate import CorrelateConfig
from sts.engine.settings import EvaluateConfig, ExtractConfig, FinetuneConfig, TrainSAEConfig
from sts.errors import UserError, which_process
from sts.options import is_option
from sts.prediction.config import PredictConfig
from sts.prediction.select import SelectConfig
from sts.scores.settings import ScoreConfig
from sts.validation.config import ValidateConfig

# The --score options name registered scores (`sts.scores.score.REGISTRY`): their help lists the registry
# as it stands when `sts` runs (`_score_help`), after the `sts.scores` plugins registered theirs.
SCORE_HELP = "{choices}"

# A sub-config whose option fields become the verb's own options: None takes them all under their
# own names; a mapping takes the fields it names, under the option names it gives.
Flat = dict[str, dict[str, str] | None]

app = typer.Typer(add_completion=False, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="SAE-based Transferability Score: predict which domains fine-tuning helps.")


_invoked_args: list[str] = []  # the command line as given, recorded with trained artifacts


def _fields(cls: type, flat: Flat) -> list[tuple[str | None, dataclasses.Field[Any], Any, str]]:
    """(the field holding it where it is a sub-config's, the option field, its type, the option's
    name) of each option of `cls` (`sts.options.option`), a flattened sub-config's in its place;
    a config's own fields lead, then the ones it inherits (`SharedConfig`'s)."""
    hints = typing.get_type_hints(cls)
    own = set(vars(cls).get("__annotations__", {}))
    out: list[tuple[str | None, dataclasses.Field[Any], Any, str]] = []
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        if f.name in flat:
            names, sub_hints = flat[f.name], typing.get_type_hints(hints[f.name])
            out += [(f.name, g, sub_hints[g.name], g.name if names is None else names[g.name])
                    for g in dataclasses.fields(hints[f.name]) if is_option(g) and (names is None or g.name in names)]
        elif is_option(f):
            out.append((None, f, hints[f.name], f.name))
    return out


def _option(f: dataclasses.Field[Any], hint: Any, name: str) -> inspect.Parameter:
    meta = f.metadata
    kind = meta.get("cli_type", hint)
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = inspect.Parameter.empty  # a required option
    if typing.get_origin(kind) is list and default is not inspect.Parameter.empty and not isinstance(default, list):
        default = None if default is None else [default]
    if default == []:
        default = None  # typer's "not given"; the config's own default applies (`_build`)
    flag = [meta["flag"]] if "flag" in meta else []
    opt = typer.Option(*flag, help=meta["help"], min=meta.get("min"), metavar=meta.get("metavar"),
                       show_default=default not in ("", None))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, opt], default=default)


def _build(cls: type, values: dict[str, Any], flat: Flat) -> Any:
    """The config of the given option values; an option left at None takes the field's default."""
    kwargs: dict[str, Any] = {}
    subs: dict[str, dict[str, Any]] = {}
    for holder, f, _kind, name in _fields(cls, flat):
        if values.get(name) is not None:
            (subs.setdefault(holder, {}) if holder else kwargs)[f.name] = values[name]
    hints = typing.get_type_hints(cls)
    return cls(**kwargs, **{holder: hints[holder](**given) for holder, given in subs.items()})


def _verb(cls: type, flat: Flat | None = None, extra: tuple[inspect.Parameter, ...] = ()
          ) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A verb whose options are `cls`'s fields (and `extra`, the command line's own); its body
    receives the built config, and the extra options by name."""
    flat = flat or {}

    def wrap(body: Callable[..., None]) -> Callable[..., None]:
        params = [_option(f, kind, name) for _holder, f, kind, name in _fields(cls, flat)] + list(extra)

        def command(**values: Any) -> None:
            cfg = _build(cls, {k: v for k, v in values.items() if k not in {p.name for p in extra}}, flat)
            body(cfg, **{p.name: values[p.name] for p in extra})

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # typer reads it
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__doc__ = body.__name__, body.__doc__
        return command

    return wrap


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    if not sys.stderr.isatty():  # keep logs and captured stderr free of progress-bar frames
        transformers.utils.logging.disable_progress_bar()


def _command() -> str:
    import shlex

    return "sts " + shlex.join(_invoked_args)


@app.command()
@_verb(ExtractConfig, {"placement": None, "generation": None})
def extract(cfg: ExtractConfig) -> None:
    """Stream SAE features of a dataset into statistics (or a dense .pt tensor)."""
    from sts.engine import extract_stage as ex

    _quiet_libraries()
    print(ex.run(cfg), file=sys.stderr)


@app.command()
@_verb(ScoreConfig)
def score(cfg: ScoreConfig) -> None:
    """Shifted features and a score per domain; writes {score, formula, method, k, shifted_features, scores}."""
    from sts.scores import files as sc

    result = sc.run(cfg)
    for name, value in sorted(result.scores.items(), key=lambda kv: -kv[1]):
        print(f"{name}\t{value:.6g}")


PREDICT_OUT = inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=Path("out"), annotation=Annotated[
    Path, typer.Option(help="output directory for sts.json, sts.csv, sts.png")])


@app.command()
@_verb(PredictConfig, {"placement": None, "generation": None,
                       "finetune": {"gradient_checkpointing": "gradient_checkpointing"}}, (PREDICT_OUT,))
def predict(cfg: PredictConfig, out: Path) -> None:
    """Rank downstream domains by predicted transfer from fine-tuning on a training set."""
    import time

    from sts.engine.distributed import world
    from sts.prediction import compare, report
    from sts.prediction.compare import Comparison
    from sts.prediction.compare import predict as run_predict

    started = time.perf_counter()
    _quiet_libraries()
    pred = run_predict(cfg, progress=lambda m: print(f"sts: {m}", file=sys.stderr))
    if not world().main:  # launched as several processes: the main one reports and writes
        return
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
    attribution = report.attribution_text(pred)
    if attribution:  # grad's own explanation first; the SAE's reading of the set after it
        print()
        print(attribution)
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
@_verb(TrainSAEConfig, {"spec": {"architecture": "architecture", "width": "width", "k": "k", "lr": "lr",
                                 "epochs": "epochs", "batch_size": "train_batch", "dead_window_tokens": "dead_window"},
                        "placement": {"device": "device", "dtype": "dtype"}})
def train_sae(cfg: TrainSAEConfig) -> None:
    """Train a TopK/JumpReLU SAE (sae_lens trainer) on one layer's residual stream."""
    from sts.engine import train_sae as ts

    _quiet_libraries()
    metrics = ts.run(cfg, _command(), progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps(metrics, indent=2))


@app.command("select")
@_verb(SelectConfig, {"placement": None, "finetune": {"gradient_checkpointing": "gradient_checkpointing"}})
def select_verb(cfg: SelectConfig) -> None:
    """Choose the pool examples whose grad terms move the target domain(s) most; writes them and every score."""
    import time

    from sts.engine.distributed import world
    from sts.prediction import select as sel

    started = time.perf_counter()
    _quiet_libraries()
    chosen = sel.select(cfg, progress=lambda m: print(f"sts: {m}", file=sys.stderr))
    if not world().main:
        return
    paths = sel.write(cfg, chosen)
    print(sel.summary(cfg, chosen))
    print(f"\nwrote {', '.join(map(str, paths))} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


@app.command()
@_verb(FinetuneConfig, {"spec": None, "placement": None})
def finetune(cfg: FinetuneConfig) -> None:
    """Supervised fine-tuning (TRL; LoRA by default), loss on response tokens only."""
    from sts.engine import finetuning as ft
    from sts.engine.distributed import world

    spec, out = cfg.spec, cfg.out
    _quiet_libraries()
    result, train_ds = ft.run(cfg, _command())
    if not world().main:  # launched as several processes: the main one reports
        return
    first, last = result.losses[0], result.losses[-1]
    lengths = result.lengths
    print(f"--max-length {lengths.get('max_length')}: {lengths.get('dropped', 0)} records dropped, "
          f"{lengths.get('cut', 0)} cut (longest {lengths.get('longest')} tokens)")
    print(f"fine-tuned on {lengths.get('kept', len(train_ds.examples))} examples ({train_ds.spec}): {spec.max_steps} steps "
          f"in {result.seconds:.0f} s, loss {first:.3f} -> {last:.3f}; model: {out}"
          + (f", adapter: {result.adapter}" if result.adapter else ""))


@app.command()
@_verb(EvaluateConfig, {"placement": None})
def evaluate(cfg: EvaluateConfig) -> None:
    """Accuracy per domain, with per-question predictions (mode reference: cot_nll and cot_nll_content only)."""
    from sts.engine import evaluation

    out = cfg.out
    _quiet_libraries()
    ev = evaluation.run(cfg)
    print(evaluation.summary_table(ev))
    print(f"wrote {out / files.PREDICTIONS}, {out / files.ACCURACY}", file=sys.stderr)


@app.command()
@_verb(CorrelateConfig)
def correlate(cfg: CorrelateConfig) -> None:
    """Pearson/Spearman between STS and the accuracy change, bootstrap 95% CI, scatter plot."""
    from sts.analysis import correlate as co

    result = co.run(cfg)
    corr = result.correlation
    print(f"protocol {cfg.protocol}: {corr.protocol_note}; domains: {', '.join(corr.domains_used)}")
    for r in co.rows({d: result.scores[d] for d in corr.domains_used}, result.changes):
        print(f"{r['domain']:<18} STS {r['sts']:.6g}  change {r['delta']:+8.4g} ({r['questions']} questions)")
    print(co.summary(corr))
    print(f"wrote {', '.join(map(str, result.paths))}", file=sys.stderr)


@app.command()
@_verb(ValidateConfig, {"placement": None, "finetune": {"lora": "lora", "lr": "lr", "max_steps": "max_steps",
                                                        "batch_size": "ft_batch_size", "max_length": "ft_max_length"}})
def validate(cfg: ValidateConfig) -> None:
    """Per training set: predict (icl) -> finetune -> evaluate -> predict (sft); then the transfer matrix."""
    from sts.engine.distributed import world
    from sts.validation.validate import validate as run_validate
    from sts.validation.write import comparison_table, matrix_table, own_domain_table, signal_table, swap_table

    cfg.command = _command()  # recorded in results.json: the command line as given
    score, metric, protocol, out = cfg.score, cfg.metric, cfg.protocol, cfg.out
    _quiet_libraries()
    results = run_validate(cfg, progress=lambda m: print(f"sts: {m}", file=sys.stderr))
    if not world().main:  # launched as several processes: the main one reports
        return
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

    runs = {"score": sc.file_scores(), "validate": sc.validated_scores(),
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
        print(f"sts: error{which_process()}: {exc}", file=sys.stderr)
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
