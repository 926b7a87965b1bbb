"""`sts evaluate`: accuracy per domain on multiple-choice questions, with per-question records.

Three modes:
- `mc` (default): log-likelihood of the option letters at the answer position. Questions are
  packed several to a forward pass with no padding and the LM head only at the answer
  position (`packed_logprobs`), so a question costs its prompt's tokens — the only answer mode
  that fits CPUs at scale.
- `cot`: generate a chain of thought and read the answer with MMLU-Pro's official extraction
  (`extract_answer`), through vLLM when it is installed and a GPU is present, transformers
  otherwise. An answer that cannot be read counts as wrong (the official script guesses at
  random instead; a wrong count keeps the evaluation deterministic).
- `reference`: no answer; only cot_nll, the likelihood of each record's reference chain of
  thought (MMLU-Pro's `cot_content`): a format-consistent ground truth for chain-of-thought
  training sets.

Results are an `Evaluation`: one `QuestionResult` per question, saved as `predictions.csv`
(question_id, domain, answer, predicted, correct[, output]) and `accuracy.json`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sts import files
from sts.choices import Metric, Mode, parse
from sts.data.examples import LETTERS, Example, question_stem, unsealed
from sts.engine.likelihoods import Scoring, packed_logprobs
from sts.engine.models import LoadedModel
from sts.engine.settings import EvaluateConfig
from sts.errors import UserError
from sts.files import atomic_path

# Ground-truth metrics per question. acc: the option letter; nll: mean per-token NLL of the
# correct option's text after "Question: q\nAnswer:" (lm-evaluation-harness's MMLU
# continuation layout); acc_norm: the option whose text has the highest log-likelihood per
# character is the correct one (lm-eval's acc_norm); p_correct: the correct option's share of
# the options' likelihoods; cot_nll: mean per-token NLL of a reference chain of thought as the
# assistant turn (records with MMLU-Pro's cot_content); cot_nll_content: the same over the tokens
# after its templated opening (`opening`), which stays in the context.
METRICS = tuple(Metric)


# MMLU-Pro's templated opening of a reference chain of thought: every record's "Let's think step
# by step.", and in the Wikipedia-templated categories (business, psychology, history, other,
# philosophy...) "We refer to Wikipedia articles on TOPIC for help."
OPENING = re.compile(r"\s*(?:A:\s*)?Let's think step by step\."
                     r"(?:\s*We refer to Wikipedia articles on [^.\n]*? for help\.)?")


COT_INSTRUCTION = ('Think step by step and then finish your answer with "the answer is (X)" '
                   "where X is the correct letter choice.")


@dataclass(frozen=True)
class QuestionResult:
    question_id: str
    domain: str
    answer: str
    predicted: str | None  # None: no answer could be read (cot), counted wrong
    output: str | None = None  # generated text (cot)
    nll: float | None = None
    acc_norm: float | None = None  # 1.0 or 0.0
    p_correct: float | None = None
    cot_nll: float | None = None  # None: the record has no reference chain of thought
    cot_nll_content: float | None = None  # cot_nll after the templated opening
    answered: bool = True  # False in mode reference: no answer was asked for, acc is not measured

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer

    def value(self, metric: str) -> float | None:
        """The question's value of a metric (None where it was not measured)."""
        if metric == "acc":
            return float(self.correct) if self.answered else None
        return getattr(self, metric)


@dataclass
class Evaluation:
    model: str
    mode: str
    shots: int
    results: list[QuestionResult] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)  # per domain: questions left out (contamination)

    def accuracy(self) -> dict[str, dict[str, float | int]]:
        """Per domain (sorted by name): accuracy in [0, 1], correct count, question count."""
        out: dict[str, dict[str, float | int]] = {}
        for r in sorted(self.results, key=lambda r: r.domain):
            d = out.setdefault(r.domain, {"accuracy": 0.0, "correct": 0, "questions": 0})
            d["correct"] = int(d["correct"]) + int(r.correct)
            d["questions"] = int(d["questions"]) + 1
        for d in out.values():
            d["accuracy"] = int(d["correct"]) / int(d["questions"])
        return out

    def metrics(self) -> dict[str, dict[str, dict[str, float | int]]]:
        """Per domain, per metric measured: mean, standard error of the mean, questions."""
        import numpy as np

        out: dict[str, dict[str, dict[str, float | int]]] = {}
        for domain in sorted({r.domain for r in self.results}):
            rows = [r for r in self.results if r.domain == domain]
            out[domain] = {}
            for m in METRICS:
                values = np.array([v for r in rows if (v := r.value(m)) is not None], float)
                if len(values):
                    sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
                    out[domain][m] = {"mean": float(values.mean()), "sem": sem, "questions": len(values)}
        return out

    def save(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        pred, acc = out_dir / files.PREDICTIONS, out_dir / files.ACCURACY
        with atomic_path(pred) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["question_id", "domain", "answer", "predicted", "correct", *METRICS[1:], "output"])
            for r in self.results:
                w.writerow([r.question_id, r.domain, r.answer, r.predicted or "", int(r.correct),
                            *("" if (v := getattr(r, m)) is None else f"{v:.6g}" for m in METRICS[1:]),
                            r.output or ""])
        payload = {"model": self.model, "mode": self.mode, "shots": self.shots,
                   "questions": len(self.results),
                   "accuracy": sum(r.correct for r in self.results) / max(len(self.results), 1),
                   "domains": self.accuracy(), "metrics": self.metrics(),
                   "excluded": self.excluded}
        with atomic_path(acc) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
        return [pred, acc]

    @classmethod
    def load(cls, out_dir: Path) -> Evaluation:
        """Read back what `save` wrote (the input of `sts correlate --base/--tuned`)."""
        pred, acc = Path(out_dir) / files.PREDICTIONS, Path(out_dir) / files.ACCURACY
        if not pred.is_file() or not acc.is_file():
            raise UserError(f"{out_dir}: no predictions.csv/accuracy.json; write them with `sts evaluate`")
        meta = json.loads(acc.read_text())
        with open(pred, newline="") as fh:
            rows = list(csv.DictReader(fh))
        def num(v: str | None) -> float | None:
            return float(v) if v not in (None, "") else None

        results = [QuestionResult(r["question_id"], r["domain"], r["answer"], r["predicted"] or None,
                                  r.get("output") or None, nll=num(r.get("nll")), acc_norm=num(r.get("acc_norm")),
                                  p_correct=num(r.get("p_correct")), cot_nll=num(r.get("cot_nll")),
                                  cot_nll_content=num(r.get("cot_nll_content")))
                   for r in rows]
        mode = meta.get("mode", "mc")
        if mode == "reference":
            results = [dataclasses.replace(r, answered=False) for r in results]
        return cls(meta.get("model", ""), mode, int(meta.get("shots", 0)), results)


_ANSWER_IS = re.compile(r"answer is \(?([A-J])\)?")


_ANSWER_COLON = re.compile(r".*[aA]nswer:\s*([A-J])")  # no DOTALL: within a line, as upstream


_LAST_LETTER = re.compile(r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """`answer is (X)`, else `Answer: X`, else the last standalone letter A-J, else None."""
    for pattern in (_ANSWER_IS, _ANSWER_COLON):
        m = pattern.search(text)
        if m:
            return m.group(1)
    m = _LAST_LETTER.search(text)
    return m.group(0) if m else None


def _question(ex: Example) -> str:
    # Example.prompt is the question followed by lettered options (data.format_choices).
    return f"Question: {ex.prompt}\nAnswer:"


def mc_prompt(ex: Example, shots: list[Example]) -> str:
    """MMLU-style few-shot prompt ending at 'Answer:'; the next token is the letter."""
    head = f"The following are multiple choice questions (with answers) about {ex.domain}.\n\n"
    demos = "".join(f"{_question(s)} {s.answer}\n\n" for s in shots)
    return head + demos + _question(ex)


def cot_messages(ex: Example, shots: list[Example]) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    for s in shots:
        msgs += [{"role": "user", "content": f"{s.prompt}\n\n{COT_INSTRUCTION}"},
                 {"role": "assistant", "content": s.response or f"The answer is ({s.answer})."}]
    msgs.append({"role": "user", "content": f"{ex.prompt}\n\n{COT_INSTRUCTION}"})
    return msgs


def split_shots(domains: dict[str, list[Example]], shots: int) -> tuple[dict[str, list[Example]],
                                                                         dict[str, list[Example]]]:
    """The first `shots` questions of each domain become its demonstrations and are not scored."""
    demos = {d: exs[:shots] for d, exs in domains.items()}
    scored = {d: exs[shots:] for d, exs in domains.items()}
    return demos, scored


def _check_mc(domains: dict[str, list[Example]]) -> None:
    for name, exs in domains.items():
        for e in exs:
            if not e.choices or e.answer is None:
                raise UserError(f"domain {name}: question {e.uid} has no options/answer; evaluation "
                                "needs multiple-choice data (MMLU, MMLU-Pro)")


def letter_tokens(tok: Any) -> tuple[str, list[int]]:
    """(prompt suffix, token id of each letter A-J) such that prompt + suffix + letter
    tokenizes with the letter as one token: ' A' after 'Answer:' for most BPE vocabularies,
    else 'A' after 'Answer: '."""
    for suffix, prefix in (("", " "), (" ", "")):
        ids = [tok.encode(prefix + letter, add_special_tokens=False) for letter in LETTERS]
        if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(LETTERS):
            return suffix, [i[0] for i in ids]
    raise UserError(f"{getattr(tok, 'name_or_path', 'the tokenizer')} has no single-token option "
                    "letters A-J; use --mode cot")


def _mc_scoring(tok: Any, ex: Example, shots: list[Example], suffix: str, letter_ids: list[int],
                max_length: int | None) -> Scoring:
    ids = tok(mc_prompt(ex, shots) + suffix)["input_ids"]
    ids = ids[-max_length:] if max_length else ids  # keep the question's end
    return Scoring(ids, [[t] for t in letter_ids[:len(ex.choices)]])


def evaluate_mc(lm: LoadedModel, domains: dict[str, list[Example]], shots: int = 0,
                max_length: int | None = 2048, progress: Callable[[int], None] = lambda _n: None,
                batch_tokens: int = 4096) -> list[QuestionResult]:
    """Argmax over the option letters of the next-token logits after 'Answer:'."""
    tok = lm.tokenizer
    suffix, letter_ids = letter_tokens(tok)
    demos, scored = split_shots(domains, shots)
    questions = [(d, e) for d, exs in scored.items() for e in exs]
    items = [_mc_scoring(tok, e, demos[d], suffix, letter_ids, max_length) for d, e in questions]
    results = []
    for (_, e), lps in zip(questions, packed_logprobs(lm, items, batch_tokens=batch_tokens, progress=progress)):
        choice = max(range(len(lps)), key=lambda i: lps[i][0])
        results.append(QuestionResult(e.uid, e.domain or "all", e.answer or "", LETTERS[choice]))
    return results


def cloze_context(ex: Example, shots: list[Example]) -> str:
    """lm-evaluation-harness's MMLU continuation layout: the question without its options,
    then "Answer:"; the continuation is " " + an option's text."""
    head = f"The following are questions (with answers) about {ex.domain}.\n\n"
    demos = "".join(f"Question: {question_stem(s).strip()}\nAnswer: {s.choices[LETTERS.index(s.answer)]}\n\n"
                    for s in shots if s.answer)
    return head + demos + f"Question: {question_stem(ex).strip()}\nAnswer:"


def _split(tok: Any, context: str, continuation: str, special: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness pairs them: the continuation
    is what the whole text's tokens add after the context's."""
    ctx = tok(context, add_special_tokens=special)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=special)["input_ids"]
    return ctx, whole[len(ctx):]


def _cloze_scoring(tok: Any, ex: Example, shots: list[Example]) -> Scoring | None:
    if not (ex.choices and ex.answer):
        return None
    context = cloze_context(ex, shots)
    pairs = [_split(tok, context, " " + str(c).strip()) for c in ex.choices]
    return Scoring(pairs[0][0], [c for _, c in pairs])


def _cot_scoring(tok: Any, ex: Example) -> Scoring | None:
    """The reference chain of thought as the chat template's assistant turn."""
    if not ex.cot:
        return None
    msgs = cot_messages(ex, [])
    context = _render_chat(tok, msgs)
    whole = context + ex.cot
    if getattr(tok, "chat_template", None):
        whole = tok.apply_chat_template(msgs + [{"role": "assistant", "content": ex.cot}], tokenize=False)
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    whole_ids = tok(whole, add_special_tokens=False)["input_ids"]
    return Scoring(ctx_ids, [whole_ids[len(ctx_ids):]], (_opening_tokens(tok, whole, ex.cot, whole_ids, len(ctx_ids)),))


def _opening_tokens(tok: Any, whole: str, cot: str, whole_ids: list[int], start: int) -> int:
    """How many of the reference's tokens (from `start` in `whole_ids`) its templated opening
    takes: the tokens of `whole` up to the opening's end, where they are a prefix of the whole's
    tokens (0 where the reference has no such opening or a token straddles its end)."""
    found = OPENING.match(cot)
    at = whole.find(cot)
    if not found or at < 0:
        return 0
    prefix = tok(whole[:at + found.end()], add_special_tokens=False)["input_ids"]
    return len(prefix) - start if len(prefix) > start and whole_ids[:len(prefix)] == prefix else 0


def likelihood_metrics(lm: LoadedModel, questions: list[tuple[Example, list[Example]]],
                       progress: Callable[[int], None] = lambda _n: None, batch_tokens: int = 4096
                       ) -> list[dict[str, float | None]]:
    """Per (question, its demonstrations): nll, acc_norm and p_correct from the options'
    texts; cot_nll from the reference chain of thought where the record has one."""
    import math

    tok = lm.tokenizer
    cloze = [_cloze_scoring(tok, e, shots) for e, shots in questions]
    cot = [_cot_scoring(tok, e) for e, _ in questions]
    wanted = [s for s in cloze + cot if s is not None]
    scored = iter(packed_logprobs(lm, wanted, batch_tokens=batch_tokens, progress=progress))
    out: list[dict[str, float | None]] = []
    for (ex, _), c, _r in zip(questions, cloze, cot):
        m: dict[str, float | None] = {"nll": None, "acc_norm": None, "p_correct": None, "cot_nll": None,
                                      "cot_nll_content": None}
        if c is not None:
            options = next(scored)
            right = LETTERS.index(ex.answer or "")  # multiple-choice questions have answers (_check_mc)
            total, n = options[right]
            m["nll"] = -total / n if n else None
            per_char = [t / max(len(" " + str(o).strip()), 1) for (t, _), o in zip(options, ex.choices)]
            m["acc_norm"] = float(max(range(len(per_char)), key=per_char.__getitem__) == right)
            top = max(t for t, _ in options)
            m["p_correct"] = math.exp(total - top) / sum(math.exp(t - top) for t, _ in options)
        out.append(m)
    for m, r in zip(out, cot):
        if r is not None:
            (total, n), (tail, tail_n) = next(scored)
            m["cot_nll"] = -total / n if n else None
            m["cot_nll_content"] = -tail / tail_n if tail_n else None
    return out


def _render_chat(tok: Any, msgs: list[dict[str, str]]) -> str:
    from sts.engine.generate import render_prompt

    return render_prompt(tok, msgs, "Answer: Let's think step by step.")


def evaluate_cot(lm: LoadedModel, domains: dict[str, list[Example]], shots: int = 0,
                 batch_size: int = 8, max_new_tokens: int = 256, use_vllm: bool | None = None,
                 progress: Callable[[int], None] = lambda _n: None) -> list[QuestionResult]:
    tok = lm.tokenizer
    demos, scored = split_shots(domains, shots)
    items = [(e, _render_chat(tok, cot_messages(e, demos[d]))) for d, exs in scored.items() for e in exs]
    from sts.engine.generate import generate

    outputs = generate(lm, [p for _, p in items], max_new_tokens, batch_size=batch_size, use_vllm=use_vllm,
                       progress=progress)
    return [QuestionResult(e.uid, e.domain or "all", e.answer or "", extract_answer(out), out)
            for (e, _), out in zip(items, outputs)]


def evaluate(lm: LoadedModel, domains: dict[str, list[Example]], mode: str = "mc", shots: int = 0,
             batch_size: int = 8, max_new_tokens: int = 256, show_progress: bool = True,
             likelihoods: bool = True, batch_tokens: int = 4096) -> Evaluation:
    """Evaluate one model on every domain's questions (the first `shots` of each are demos):
    the answer (mode mc or cot) and, with `likelihoods`, the likelihood metrics (nll,
    acc_norm, p_correct, and cot_nll where a record has a reference chain of thought)."""
    from tqdm.auto import tqdm

    mode = parse(Mode, mode, "evaluation mode")
    unsealed((e for exs in domains.values() for e in exs), "an evaluation")
    if shots < 0:
        raise UserError(f"--shots must be 0 or more (got {shots})")
    short = [d for d, exs in domains.items() if len(exs) <= shots]
    if short:
        raise UserError(f"domain(s) {', '.join(short)} have no questions left after {shots} shots; "
                        "lower --shots or raise --max-examples")
    total = sum(len(exs) - shots for exs in domains.values())
    demos, scored = split_shots(domains, shots)
    questions = [(e, demos[d]) for d, exs in scored.items() for e in exs]
    if mode != "reference":
        _check_mc(domains)  # before any progress bar: a refusal is one line on stderr
    if mode == "reference":
        if not any(e.cot for e, _ in questions):
            raise UserError("no record has a reference chain of thought (cot_content); --mode reference "
                            "measures cot_nll on records that have one")
        questions = [(e, []) for e, _ in questions if e.cot]
        with tqdm(total=len(questions), desc="reference likelihoods", unit="q", disable=not show_progress,
                  file=sys.stderr) as bar:
            extra = likelihood_metrics(lm, [(dataclasses.replace(e, choices=()), s) for e, s in questions],
                                       bar.update, batch_tokens)
        results = [QuestionResult(e.uid, e.domain or "all", e.answer or "", None, answered=False,
                                  cot_nll=m["cot_nll"], cot_nll_content=m["cot_nll_content"])
                   for (e, _), m in zip(questions, extra)]
        return Evaluation(model=lm.spec, mode=mode, shots=0, results=results)
    bar = tqdm(total=total, desc=f"evaluate ({mode})", unit="q", disable=not show_progress,
               file=sys.stderr)
    with bar:
        if mode == "mc":
            results = evaluate_mc(lm, domains, shots, progress=bar.update, batch_tokens=batch_tokens)
        else:
            results = evaluate_cot(lm, domains, shots, batch_size, max_new_tokens, progress=bar.update)
    if likelihoods:
        with tqdm(total=total, desc="likelihoods", unit="q", disable=not show_progress, file=sys.stderr) as bar:
            extra = likelihood_metrics(lm, questions, bar.update, batch_tokens)
        results = [dataclasses.replace(r, **m) for r, m in zip(results, extra)]  # type: ignore[arg-type]
    return Evaluation(model=lm.spec, mode=mode, shots=shots, results=results)


def shared(evaluate_part: Callable[[dict[str, list[Example]]], Evaluation], domains: dict[str, list[Example]],
           shots: int = 0) -> Evaluation:
    """`evaluate_part(domains)` shared by the processes a launcher started (`sts.engine.distributed`):
    each evaluates every N-th scored question of each domain (a domain's `shots` demonstrations go
    to all), and every process returns the one-process evaluation, its questions in their order."""
    from sts.engine.distributed import gather, shard, world

    w = world()
    if w.size == 1 or any(len(exs) <= shots for exs in domains.values()):
        return evaluate_part(domains)  # one process's, or the refusal of a domain with no question left
    mine = {d: exs[:shots] + shard(exs[shots:], w) for d, exs in domains.items()}
    mine = {d: exs for d, exs in mine.items() if len(exs) > shots}  # a process may have none of a domain
    parts = [ev for ev in gather(evaluate_part(mine) if mine else None, w) if ev is not None]
    if not parts:
        raise UserError("no process had a question to evaluate")
    where = {(e.domain or "all", e.uid): i for i, e in enumerate(e for exs in domains.values() for e in exs[shots:])}
    results = sorted((r for ev in parts for r in ev.results), key=lambda r: where.get((r.domain, r.question_id), -1))
    return dataclasses.replace(parts[0], results=results)


def summary_table(ev: Evaluation) -> str:
    """Per domain: accuracy, the likelihood metrics measured, questions, questions left out."""
    metrics = ev.metrics()
    shown = [m for m in METRICS[1:] if any(m in d for d in metrics.values())]
    rows = [f"{'domain':<18} {'accuracy':>8} " + " ".join(f"{m:>9}" for m in shown)
            + f" {'questions':>9} {'left out':>8}"]
    for name, d in ev.accuracy().items():
        cells = " ".join(f"{metrics[name][m]['mean']:>9.4f}" if m in metrics[name] else f"{'':>9}" for m in shown)
        rows.append(f"{name:<18} {100 * float(d['accuracy']):>7.1f}% {cells} {int(d['questions']):>9} "
                    f"{ev.excluded.get(name, 0):>8}")
    overall = sum(r.correct for r in ev.results) / max(len(ev.results), 1)
    rows.append(f"{'all':<18} {100 * overall:>7.1f}% {' ' * (10 * len(shown))}{len(ev.results):>9} "
                f"{sum(ev.excluded.values()):>8}")
    return "\n".join(rows)


def run(cfg: EvaluateConfig) -> Evaluation:
    """Read the questions, evaluate, write cfg.out (predictions.csv, accuracy.json)."""
    from sts.data.datasets import clean_questions
    from sts.engine.models import default_model_dir, load_model

    per_domain = None if cfg.max_examples is None else cfg.max_examples + cfg.shots
    groups, removed = clean_questions(cfg.domains, cfg.train + cfg.exclude, per_domain, cfg.skip_bad_lines)
    where = cfg.placement
    lm = load_model(cfg.model or str(default_model_dir()), where.dtype, where.device, where.device_map)
    ev = evaluate(lm, groups, cfg.mode, cfg.shots, cfg.batch_size, cfg.max_new_tokens, likelihoods=cfg.likelihoods,
                  batch_tokens=cfg.batch_tokens)
    ev.excluded = removed
    ev.save(cfg.out)
    return ev
