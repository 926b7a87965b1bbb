"""Reading records: files (.jsonl, .json, .txt, .parquet, .csv), datasets folders, hub ids and
the embedded sets, and their schemas (MMLU, MMLU-Pro, prompt/response, instruction, chat, text)
turned into `Example`s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sts.data import embedded
from sts.data.examples import LETTERS, Dataset, Example
from sts.errors import UserError, warn

# Fields that identify each known schema, checked in this order (most specific first).
SCHEMAS: dict[str, tuple[str, ...]] = {
    "mmlu_pro": ("question", "options", "answer", "category"),
    "mmlu": ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic"),
    "limo": ("question", "solution", "answer"),
    "math": ("problem", "solution"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "text": ("text",),
}


# MMLU subject -> MMLU-Pro category, from MMLU-Pro's `src` field (see shared/DESIGN.md).
_CATEGORY_SUBJECTS: dict[str, tuple[str, ...]] = {
    "business": ("business_ethics", "marketing", "management"),
    "law": ("professional_law", "jurisprudence", "international_law"),
    "psychology": ("professional_psychology", "high_school_psychology"),
    "biology": ("high_school_biology", "college_biology"),
    "chemistry": ("high_school_chemistry", "college_chemistry"),
    "history": ("prehistory", "high_school_us_history", "high_school_european_history",
                "high_school_world_history"),
    "other": ("us_foreign_policy", "public_relations", "high_school_government_and_politics",
              "security_studies", "sociology", "human_sexuality", "global_facts",
              "miscellaneous", "professional_accounting", "high_school_geography"),
    "health": ("virology", "college_medicine", "clinical_knowledge", "human_aging",
               "medical_genetics", "anatomy", "professional_medicine", "nutrition"),
    "economics": ("high_school_macroeconomics", "high_school_microeconomics", "econometrics"),
    "math": ("abstract_algebra", "high_school_statistics", "elementary_mathematics",
             "college_mathematics", "high_school_mathematics"),
    "physics": ("astronomy", "college_physics", "high_school_physics", "conceptual_physics"),
    "computer science": ("high_school_computer_science", "college_computer_science",
                         "machine_learning", "computer_security"),
    # moral_scenarios is not in MMLU-Pro; philosophy is its nearest category.
    "philosophy": ("formal_logic", "moral_disputes", "world_religions", "logical_fallacies",
                   "philosophy", "moral_scenarios"),
    "engineering": ("electrical_engineering",),
}


MMLU_TO_CATEGORY: dict[str, str] = {
    subject: category for category, subjects in _CATEGORY_SUBJECTS.items() for subject in subjects
}


def _read_jsonl(path: Path, skip_bad_lines: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if not skip_bad_lines:
                    raise UserError(
                        f"{path}: line {lineno} is not a valid JSON object ({exc}); fix it, "
                        "or pass --skip-bad-lines to skip malformed lines with a warning"
                    ) from None
                bad.append(lineno)
                continue
            records.append(record)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        warn(f"{path}: skipped {len(bad)} malformed line(s): {shown}")
    return records


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); for one record per line use .jsonl") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}: take the first list
        lists = [v for v in data.values() if isinstance(v, list)]
        if not lists:
            raise UserError(f"{path}: expected a JSON list of records or an object holding one")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: expected a JSON list of objects (records)")
    return data


def _read_txt(path: Path, chunk_chars: int = 4000) -> list[dict[str, Any]]:
    """Plain text -> `text` records of whole lines, about chunk_chars characters each."""
    records: list[dict[str, Any]] = []
    lines: list[str] = []
    size = 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            lines.append(line)
            size += len(line)
            if size >= chunk_chars:
                records.append({"text": "".join(lines).strip()})
                lines, size = [], 0
    if "".join(lines).strip():
        records.append({"text": "".join(lines).strip()})
    return [r for r in records if r["text"]]


def _records_from_hf(ds: Any, spec: str, split: str | None) -> list[dict[str, Any]]:
    """A `datasets` Dataset or DatasetDict -> plain records (split: asked, else test, else train)."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            split = next((s for s in ("test", "train") if s in ds), names[0])
        if split not in ds:
            raise UserError(f"{spec}: no split {split!r}; splits are {', '.join(names)}")
        ds = ds[split]
    return [dict(r) for r in ds]


def _embedded_records(name: str) -> list[dict[str, Any]]:
    """Raw records of an embedded dataset: MMLU's JSONL as is; CHAMP's problems as MATH-style
    records (the problem, its solution steps joined into one worked solution, its category)."""
    path = embedded.dataset_file(name)
    if name == "mmlu":
        return _read_jsonl(path, skip_bad_lines=False)
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    return [{"problem": p["_text"], "solution": "\n".join(s["_text"] for s in p["solution"]["steps"]),
             "subject": p.get("category"), "id": key}
            for key, p in problems.items()]


def read_records(spec: str, skip_bad_lines: bool = False) -> list[dict[str, Any]]:
    """Load the raw records a spec points at."""
    if spec.startswith("embedded:"):
        return _embedded_records(spec.removeprefix("embedded:"))
    path = Path(spec)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path, skip_bad_lines)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".txt":
            return _read_txt(path)
        if suffix in (".parquet", ".csv"):
            import datasets

            return _records_from_hf(
                datasets.load_dataset(suffix[1:], data_files=str(path), split="train"), spec, None
            )
        raise UserError(f"{spec}: unsupported file type {suffix!r}; use .jsonl, .json, .txt, .parquet or .csv")
    if path.is_dir():
        import datasets

        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _records_from_hf(datasets.load_from_disk(str(path)), spec, None)
        return _records_from_hf(datasets.load_dataset(str(path)), spec, None)
    looks_like_path = spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in (
        ".jsonl", ".json", ".parquet", ".csv")
    if looks_like_path:
        raise UserError(f"dataset not found: {spec} (give an existing file or directory, or a hub id "
                        "such as TIGER-Lab/MMLU-Pro)")
    hub_id, _, split = spec.partition(":")
    try:
        import datasets

        loaded = datasets.load_dataset(hub_id, split=split or None)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise UserError(f"dataset not found: {spec} is not a local file or directory, and the hub "
                        f"could not load {hub_id!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); check the path or id") from None
    return _records_from_hf(loaded, spec, split or None)


def detect_schema(fields: Iterable[str]) -> str | None:
    present = set(fields)
    for name, required in SCHEMAS.items():
        if present.issuperset(required):
            return name
    return None


def format_choices(question: str, choices: Sequence[str]) -> str:
    """Question followed by lettered options, the layout MMLU-style evaluations use."""
    lines = [question.strip()] + [f"{LETTERS[i]}. {str(c).strip()}" for i, c in enumerate(choices)]
    return "\n".join(lines)


def _mc_example(question: str, choices: Sequence[str], letter: str, domain: str | None,
                uid: str, cot: str | None = None) -> Example:
    """A multiple-choice record; its response is the chain of thought where one is given
    (MMLU-Pro's `cot_content`, "A: Let's think step by step. ... The answer is (X)."),
    else the answer itself."""
    idx = LETTERS.index(letter)
    response = f"The answer is ({letter}) {str(choices[idx]).strip()}"
    reference = None
    if cot and str(cot).strip():
        response = reference = str(cot).strip().removeprefix("A:").strip()
    return Example(prompt=format_choices(question, choices), response=response, domain=domain,
                   uid=uid, choices=tuple(str(c) for c in choices), answer=letter, cot=reference)


class _Skip(Exception):
    """A record that is malformed for its schema: reported and skipped."""


def _to_example(schema: str, r: dict[str, Any], uid: str) -> Example:
    if schema == "mmlu_pro":
        options = [o for o in r["options"] if o not in (None, "N/A")]
        letter = str(r["answer"]).strip().upper()
        if letter not in LETTERS[: len(options)]:
            raise _Skip(f"answer {r['answer']!r} is not one of the {len(options)} options")
        return _mc_example(r["question"], options, letter, str(r["category"]),
                           str(r.get("question_id", uid)), r.get("cot_content"))
    if schema == "mmlu":
        options = [r[f"answer_{c}"] for c in "abcd"]
        letter = str(r["correct_answer"]).strip().upper()
        if letter not in "ABCD" or len(letter) != 1:
            raise _Skip(f"correct_answer {r['correct_answer']!r} is not a letter A-D")
        subject = str(r["topic"]).strip().lower().replace(" ", "_")
        return _mc_example(r["question"], options, letter, MMLU_TO_CATEGORY.get(subject, subject), uid)
    if schema == "limo":
        solution = str(r["solution"]).strip()
        answer = str(r["answer"]).strip()
        if answer and answer not in solution[-200:]:
            solution += f"\n\nThe final answer is {answer}."
        return Example(str(r["question"]), solution, r.get("category") or r.get("subject"), uid)
    if schema == "math":
        return Example(str(r["problem"]), str(r["solution"]), r.get("subject") or r.get("type"), uid)
    if schema == "alpaca":
        prompt = str(r["instruction"]).strip()
        if r.get("input"):
            prompt += "\n\n" + str(r["input"]).strip()
        return Example(prompt, str(r["output"]), r.get("category"), uid)
    if schema == "chat":
        msgs = r["messages"]
        if not msgs or not isinstance(msgs, list):
            raise _Skip("empty messages")
        turns = [(str(m["role"]), str(m["content"])) for m in msgs]
        if turns[-1][0] == "assistant":
            *before, (_, response) = turns
        else:
            before, response = turns, None
        if not before:
            raise _Skip("no user turn before the assistant turn")
        *history, (_, prompt) = before
        return Example(prompt, response, r.get("domain") or r.get("category"), uid, tuple(history))
    if schema == "text":
        return Example(str(r["text"]), None, r.get("domain") or r.get("category"), uid)
    raise AssertionError(schema)


def examples_from_records(records: list[dict[str, Any]], spec: str) -> Dataset:
    return example_rows(records, spec)[0]


def example_rows(records: list[dict[str, Any]], spec: str) -> tuple[Dataset, list[int]]:
    """The records' examples, and each example's position among the records (a malformed record
    is skipped with a warning: `sts select` writes the chosen examples' own records back)."""
    if not records:
        raise UserError(f"{spec}: no records found; check the file is not empty")
    fields = tuple(records[0].keys())
    schema = detect_schema(fields)
    if schema is None:
        known = "; ".join(f"{n} ({', '.join(f)})" for n, f in SCHEMAS.items())
        raise UserError(f"{spec}: no usable fields; found {', '.join(fields) or 'none'}; "
                        f"known schemas: {known}")
    examples: list[Example] = []
    positions: list[int] = []
    skipped: list[str] = []
    for i, r in enumerate(records):
        missing = [f for f in SCHEMAS[schema] if f not in r]
        try:
            if missing:
                raise _Skip(f"missing field(s) {', '.join(missing)}")
            examples.append(_to_example(schema, r, uid=str(i)))
            positions.append(i)
        except _Skip as why:
            skipped.append(f"record {i + 1}: {why}")
    if skipped:
        warn(f"{spec}: skipped {len(skipped)} malformed {schema} record(s): "
             + "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    if not examples:
        raise UserError(f"{spec}: every record was malformed for schema {schema}")
    return Dataset(spec=spec, schema=schema, examples=examples, skipped=len(skipped), fields=fields), positions
