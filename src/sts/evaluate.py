"""`sts evaluate`: accuracy per domain on multiple-choice questions, with per-question records.

Two modes:
- `mc` (default): log-likelihood of the option letters at the answer position. One forward
  pass per question, and the LM head only at that position (`logits_to_keep`), so it costs
  about one prompt's worth of body compute — the only mode that fits CPUs at scale.
- `cot`: generate a chain of thought and read the answer with MMLU-Pro's official extraction
  (`extract_answer`), through vLLM when it is installed and a GPU is present, transformers
  otherwise. An answer that cannot be read counts as wrong (the official script guesses at
  random instead; a wrong count keeps the evaluation deterministic).

Results are an `Evaluation`: one `QuestionResult` per question, saved as `predictions.csv`
(question_id, domain, answer, predicted, correct[, output]) and `accuracy.json`.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sts.data import LETTERS, Example
from sts.errors import UserError, atomic_path
from sts.models import LoadedModel, pad_batch

MODES = ("mc", "cot")
COT_INSTRUCTION = ('Think step by step and then finish your answer with "the answer is (X)" '
                   "where X is the correct letter choice.")


@dataclass(frozen=True)
class QuestionResult:
    question_id: str
    domain: str
    answer: str
    predicted: str | None  # None: no answer could be read (cot), counted wrong
    output: str | None = None  # generated text (cot)

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer


@dataclass
class Evaluation:
    model: str
    mode: str
    shots: int
    results: list[QuestionResult] = field(default_factory=list)

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

    def save(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        pred, acc = out_dir / "predictions.csv", out_dir / "accuracy.json"
        with atomic_path(pred) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["question_id", "domain", "answer", "predicted", "correct", "output"])
            for r in self.results:
                w.writerow([r.question_id, r.domain, r.answer, r.predicted or "", int(r.correct),
                            r.output or ""])
        payload = {"model": self.model, "mode": self.mode, "shots": self.shots,
                   "questions": len(self.results),
                   "accuracy": sum(r.correct for r in self.results) / max(len(self.results), 1),
                   "domains": self.accuracy()}
        with atomic_path(acc) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
        return [pred, acc]

    @classmethod
    def load(cls, out_dir: Path) -> Evaluation:
        """Read back what `save` wrote (the input of `sts correlate --base/--tuned`)."""
        pred, acc = Path(out_dir) / "predictions.csv", Path(out_dir) / "accuracy.json"
        if not pred.is_file() or not acc.is_file():
            raise UserError(f"{out_dir}: no predictions.csv/accuracy.json; write them with `sts evaluate`")
        meta = json.loads(acc.read_text())
        with open(pred, newline="") as fh:
            rows = list(csv.DictReader(fh))
        results = [QuestionResult(r["question_id"], r["domain"], r["answer"], r["predicted"] or None,
                                  r.get("output") or None) for r in rows]
        return cls(meta.get("model", ""), meta.get("mode", "mc"), int(meta.get("shots", 0)), results)


# --- answer extraction (MMLU-Pro's official order) ----------------------------------------------

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


# --- prompts -------------------------------------------------------------------------------------

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


# --- multiple choice by log-likelihood -------------------------------------------------------------

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


@torch.no_grad()
def evaluate_mc(lm: LoadedModel, domains: dict[str, list[Example]], shots: int = 0,
                batch_size: int = 8, max_length: int | None = 2048,
                progress: Callable[[int], None] = lambda _n: None) -> list[QuestionResult]:
    """Argmax over the option letters of the next-token logits after 'Answer:'."""
    _check_mc(domains)
    tok, model = lm.tokenizer, lm.model
    suffix, letter_ids = letter_tokens(tok)
    demos, scored = split_shots(domains, shots)
    items = [(e, mc_prompt(e, demos[d]) + suffix) for d, exs in scored.items() for e in exs]
    pad_id = int(tok.pad_token_id or 0)
    results: list[QuestionResult] = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        encoded = [tok(text)["input_ids"] for _, text in batch]
        encoded = [ids[-max_length:] if max_length else ids for ids in encoded]  # keep the question's end
        ids, mask = pad_batch(encoded, pad_id)
        last = torch.tensor([[len(e) - 1] for e in encoded])  # each row's answer position
        at = model(input_ids=ids, attention_mask=mask, logits_to_keep=last).logits[:, 0]
        for (e, _), row in zip(batch, at):
            n_opts = len(e.choices)
            choice = int(row[letter_ids[:n_opts]].argmax())
            results.append(QuestionResult(e.uid, e.domain or "all", e.answer or "", LETTERS[choice]))
        progress(len(batch))
    return results


# --- generative chain of thought ------------------------------------------------------------------

def _vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def _render_chat(tok: Any, msgs: list[dict[str, str]]) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    turns = [m["content"] + ("\n" if m["role"] == "user" else "\n\n") for m in msgs]
    return "".join(turns) + "Answer: Let's think step by step."


@torch.no_grad()
def _generate_transformers(lm: LoadedModel, prompts: list[str], max_new_tokens: int, batch_size: int,
                           progress: Callable[[int], None]) -> list[str]:
    tok, outputs = lm.tokenizer, []
    side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the last column of the batch
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(lm.model.device) for k, v in enc.items()}
            gen = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outputs += tok.batch_decode(new, skip_special_tokens=True)
            progress(len(chunk))
    finally:
        tok.padding_side = side
    return outputs


def _generate_vllm(model_path: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    from vllm import LLM, SamplingParams  # optional: only with a GPU

    llm = LLM(model=model_path)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    return [o.outputs[0].text for o in llm.generate(prompts, params)]


def evaluate_cot(lm: LoadedModel, domains: dict[str, list[Example]], shots: int = 0,
                 batch_size: int = 8, max_new_tokens: int = 256, use_vllm: bool | None = None,
                 progress: Callable[[int], None] = lambda _n: None) -> list[QuestionResult]:
    _check_mc(domains)
    tok = lm.tokenizer
    demos, scored = split_shots(domains, shots)
    items = [(e, _render_chat(tok, cot_messages(e, demos[d]))) for d, exs in scored.items() for e in exs]
    prompts = [p for _, p in items]
    if use_vllm if use_vllm is not None else _vllm_available():
        outputs = _generate_vllm(lm.spec, prompts, max_new_tokens)
    else:
        outputs = _generate_transformers(lm, prompts, max_new_tokens, batch_size, progress)
    return [QuestionResult(e.uid, e.domain or "all", e.answer or "", extract_answer(out), out)
            for (e, _), out in zip(items, outputs)]


def evaluate(lm: LoadedModel, domains: dict[str, list[Example]], mode: str = "mc", shots: int = 0,
             batch_size: int = 8, max_new_tokens: int = 256, show_progress: bool = True) -> Evaluation:
    """Evaluate one model on every domain's questions (the first `shots` of each are demos)."""
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise UserError(f"unknown evaluation mode {mode!r}; use {' or '.join(MODES)}")
    if shots < 0:
        raise UserError(f"--shots must be 0 or more (got {shots})")
    short = [d for d, exs in domains.items() if len(exs) <= shots]
    if short:
        raise UserError(f"domain(s) {', '.join(short)} have no questions left after {shots} shots; "
                        "lower --shots or raise --max-examples")
    total = sum(len(exs) - shots for exs in domains.values())
    bar = tqdm(total=total, desc=f"evaluate ({mode})", unit="q", disable=not show_progress,
               file=sys.stderr)
    with bar:
        if mode == "mc":
            results = evaluate_mc(lm, domains, shots, batch_size, progress=bar.update)
        else:
            results = evaluate_cot(lm, domains, shots, batch_size, max_new_tokens, progress=bar.update)
    return Evaluation(model=lm.spec, mode=mode, shots=shots, results=results)


def summary_table(ev: Evaluation) -> str:
    rows = [f"{'domain':<18} {'accuracy':>8} {'questions':>9}"]
    for name, d in ev.accuracy().items():
        rows.append(f"{name:<18} {100 * float(d['accuracy']):>7.1f}% {int(d['questions']):>9}")
    overall = sum(r.correct for r in ev.results) / max(len(ev.results), 1)
    rows.append(f"{'all':<18} {100 * overall:>7.1f}% {len(ev.results):>9}")
    return "\n".join(rows)

