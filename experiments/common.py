"""What the experiments share: where the reports live, the data folder, each measured training
set's own domain, the measured changes of a round, the judge of the probe-record rounds, and the
JSON files they resume from."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"  # the reports: one folder per experiment
D = "../shared/data"  # as the run.sh scripts name it: run from the repository root

# Every measured training set's own domain (the domain it is drawn from; None: a mixed set), by the
# name `sts validate` gave its folder; one table for every report (the names of the rounds differ).
OWN: dict[str, str | None] = {
    # docs/results/transfer
    "train-1-champ": "math", "train-2-alpaca-en-demo": None, "train-3-mmlu-pro-cot-train-physics": "physics",
    "train-4-mmlu-pro-cot-train-psychology": "psychology", "train-5-math500-test": "math",
    "train-6-mmlu-pro-cot-train-business": "business", "train-7-mmlu-pro-cot-train-biology": "biology",
    # docs/results/heldout
    "train-1-mmlu-pro-cot-train-computer-science": "computer science", "train-2-mmlu-pro-cot-train-history": "history",
    "train-3-math500-test-400-500": "math",
    # docs/results/beyond
    "train-1-mmlu-pro-cot-train-engineering": "engineering", "train-2-math500-test-100-200": "math",
    "train-3-alpaca-en-demo-100-200": None,
    # docs/results/content-round (the control is not a judged set)
    "train-1-control": None, "train-2-mmlu-pro-cot-train-engineering": "engineering",
    "train-3-math500-test-100-200": "math", "train-4-alpaca-en-demo-100-200": None, "train-5-physics": "physics",
    "train-6-biology": "biology", "train-7-math": "math",
}


def read_json(path: Path, default: Any = None) -> Any:
    """A resumable experiment's record, or `default` before its first stage."""
    return json.loads(path.read_text()) if path.is_file() else default


def write_json(data: Any, path: Path) -> None:
    """Written whole or not at all (`sts.files.atomic_path`): a stopped run leaves the last record."""
    from sts.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def measured(folder: Path, names: list[str], metric: str = "cot_nll") -> dict[str, Any]:
    """set -> domain -> the measured change of a round's sets (`sts validate`'s folder): the
    base and tuned reference evaluations; a set counts once its tuned evaluation is there."""
    from sts.analysis import correlation as co
    from sts.engine.evaluation import Evaluation

    base = folder / "eval-base-reference"
    out = {}
    for name in names:
        tuned = folder / name / "eval-tuned-reference"
        if base.is_dir() and tuned.is_dir():
            out[name] = co.changes_from_evaluations(Evaluation.load(base), Evaluation.load(tuned), metric)
    return out


def judge(scores: dict[str, dict[str, float]], changes: dict[str, Any], own: dict[str, dict[str, float]] | None = None,
          replicates: int = 1000, metric: str = "cot_nll") -> dict[str, Any]:
    """Per-set Pearson (median and each set) and own-domain ranks of `scores`; specificity (95%
    interval, and leaving each set out) and the swap test of `own` where given (a `+lib`
    candidate's own part), else of `scores`; over the sets with measured changes."""
    from sts.analysis import correlation as co

    sets = [n for n in scores if n in changes]
    ch = {n: changes[n] for n in sets}
    split = {n: (own or scores)[n] for n in sets}
    per_set = {n: co.correlate(scores[n], ch[n], replicates, 0, None, "signed", metric).pearson for n in sets}
    spec = co.correlate_matrix(split, ch, "specificity", replicates, 0, metric)
    loo = [co.correlate_matrix({n: split[n] for n in sets if n != out}, ch, "specificity", 20, 0, metric).pearson
           for out in sets] if len(sets) > 2 else []
    swap = co.swap_test(split, ch, replicates, 0, metric)
    ranks = {n: co.own_domain_rank(scores[n], ch[n], own_d) for n in sets if (own_d := OWN.get(n))}
    return {"median_pearson": statistics.median(per_set.values()), "per_set": per_set,
            "specificity": spec.pearson, "specificity_ci": list(spec.pearson_ci),
            "specificity_loo": [min(loo), statistics.median(loo)] if loo else None,
            "swap": {"own": swap.own, "other": swap.other, "difference": swap.difference,
                     "difference_ci": list(swap.difference_ci)}, "own_domain": ranks}


def specificity_swap_axes(axes: Any, metric: str) -> None:
    """The two panels every round's figure draws, labelled alike: specificity (left) and the swap
    test (right), each against zero."""
    axes[0].set_xlabel(f"specificity ({metric}, double-centred Pearson, 95% CI)", fontsize=8)
    axes[1].set_xlabel("swap test: own minus other set's scores (median Pearson, 95% CI)", fontsize=8)
    for ax in axes:
        ax.axvline(0, color="grey", lw=0.6, ls=":")
        ax.grid(axis="x", alpha=0.3)


def finetune_and_evaluate(pl: Any, label: str, names: list[str] | None = None, base: bool = True) -> None:
    """A validation plan's fine-tuning and reference-evaluation stages only (nothing predicted): the
    base model's reference evaluation (`base`), then each set's (or those `names`) fine-tune and its
    tuned reference evaluation, each reused where its manifest verifies (`sts.validation.stages`)."""
    from sts.validation.plan import train_dir_name
    from sts.validation.stages import Stages
    from sts.validation.validate import run_evaluation, run_finetune

    c = pl.cfg
    stages = Stages(c.out, {}, lambda m: print(m, flush=True), label=label)
    model_files = sorted(Path(c.model).glob("*.safetensors"))
    if base:
        for step in pl.base_steps():
            if step.kind == "reference":
                run_evaluation(pl, stages, step, c.model, c.out / "eval-base-reference", model_files)
    for i, train in enumerate(pl.inputs.trains):
        name = train_dir_name(i, train)
        if names is not None and name not in names:
            continue
        tuned = c.out / name / "tuned"
        steps = [s for s in pl.set_steps(i, train) if s.kind in ("finetune", "reference")]
        where = c.out / name / "eval-tuned-reference"
        read = None  # as `validate`: an adapter gone on a new machine is rebuilt only where still needed
        for step in steps:
            if step.kind == "finetune":
                read = run_finetune(pl, stages, step, train, tuned, model_files,
                                    [(s.name, [where], s.settings) for s in steps if s.kind == "reference"], label)
            else:
                run_evaluation(pl, stages, step, str(tuned), where, list(tuned.glob("*.safetensors")), read)


def write_recorded(files: dict[str, list[dict[str, Any]]], folder: Path, record: Path, ids: Any) -> None:
    """A round's derived data files (JSON lines under `folder`, ignored by git) and their record
    (`record`, committed: the ids its rule chose and each file's sha256). The first build writes the
    record; a rebuild must give the same files, or nothing is trusted."""
    from sts.data.embedded import file_sha256

    known = read_json(record)
    if known is not None and known["ids"] != json.loads(json.dumps(ids)):
        raise SystemExit(f"the rule now chooses other records than {record} holds: the data changed; nothing written")
    folder.mkdir(parents=True, exist_ok=True)
    sha = {}
    for name, body in files.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in body))
        sha[name] = file_sha256(path)
    if known is None:
        write_json({"ids": ids, "sha256": sha}, record)
    elif known["sha256"] != sha:
        raise SystemExit(f"the files differ from those {record} records (sha256): the data or the rule changed")
    print(f"wrote {', '.join(f'{k} ({len(v)})' for k, v in files.items())} to {folder}")


def run_verb(verbs: dict[str, Any], argv: list[str], module: str) -> None:
    """`python -m MODULE VERB`: run the one verb named, or say which there are."""
    if len(argv) != 1 or argv[0] not in verbs:
        raise SystemExit(f"usage: python -m {module} {{{','.join(verbs)}}}")
    verbs[argv[0]]()
