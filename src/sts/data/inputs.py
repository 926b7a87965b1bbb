"""Model inputs: examples -> token ids and the positions whose features count.

A `ModelInput` is one model input; a `Pair` two inputs whose counted positions correspond one to
one: the same example with and without in-context demonstrations (`icl`), or identical tokens
read by two models (`sft`). How an example becomes text (chat template or plain, with or
without its response, which tokens count) is a `Render`. Alignment works on character offsets,
so a tokenizer that merges across the boundary of demonstrations and example is caught and
reported (`Truncation`), never silently misaligned.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sts.choices import Method
from sts.data.examples import Example
from sts.errors import UserError, warn


@dataclass(frozen=True)
class Render:
    """How examples become text. `chat`: use the tokenizer's chat template (what an instruct
    model is fine-tuned on); `with_response`: include the response turn; `tokens`: count all
    tokens, or only the response's (what SFT trains on; examples without a response count
    all of their own tokens)."""

    chat: bool = False
    with_response: bool = True
    tokens: str = "all"
    # Leave out each sequence's first token. It is the attention sink: its residual norm is
    # tens of times the median, the SAE was trained without it (train_sae), and in
    # SmolLM2-135M it carried 99% of the domain score's mass over the shifted features, which
    # made STS a measure of 1/question length. Off for the reference's dense contract.
    skip_first: bool = False


def training_render(method: str) -> Render:
    """How a training set's shift reads its examples: chat turns counting the response (what
    SFT trains on) for the icl and sft shifts; the reference's plain streams, every token, for
    `paper`. `sts predict`, `sts validate` and `sts extract --shift` all render this way."""
    paper = method == Method.PAPER
    return Render(chat=not paper, with_response=True, tokens="all" if paper else "response")


def domain_render(first_token: bool) -> Render:
    """How domain questions are read: plain text, the question alone, every token (the first,
    the attention sink, only when `first_token`)."""
    return Render(chat=False, with_response=False, tokens="all", skip_first=not first_token)


@dataclass(frozen=True)
class ModelInput:
    ids: list[int]
    positions: list[int]  # indices into ids whose features are counted
    # Tokens before `ids`, shared by many sequences (a domain's demonstrations): read once
    # through the model's key/value cache instead of once per sequence.
    prefix: tuple[int, ...] = ()


@dataclass(frozen=True)
class Pair:
    a: ModelInput  # base
    b: ModelInput  # shifted; b.positions[i] is the same token as a.positions[i]
    cut: int = 0  # example tokens cut from the end (both sides) to fit max_length
    head: int = 0  # tokens of the shifted side before the example (demonstrations, template)


def render_text(ex: Example, tok: Any, render: Render, demos: tuple[Example, ...] = ()
          ) -> tuple[str, bool, tuple[int, int] | None]:
    """Render -> (text, add_special_tokens, char span of the example's response or None)."""
    response = ex.response if render.with_response else None
    if render.chat and getattr(tok, "chat_template", None):
        msgs: list[dict[str, str]] = []
        for d in demos:
            msgs += [{"role": "user", "content": d.prompt},
                     {"role": "assistant", "content": d.response or ""}]
        msgs += [{"role": r, "content": c} for r, c in ex.history]
        msgs.append({"role": "user", "content": ex.prompt})
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=response is None)
        special = False  # the template already holds BOS and turn markers
    else:
        parts = [d.prompt + ("\n" + d.response if d.response else "") for d in demos]
        own = ex.prompt if response is None else f"{ex.prompt}\n{response}"
        text, special = "\n\n".join(parts + [own]), True
    span = None
    if response is not None and response.strip():
        start = text.rfind(response.strip())
        if start >= 0:
            span = (start, start + len(response.strip()))
    return text, special, span


def _encode(tok: Any, text: str, special: bool, max_length: int | None, keep_end: bool = False
            ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets, truncated to max_length: the start is kept, or the
    end (`keep_end`, for inputs with demonstrations, whose example sits at the end)."""
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if max_length is not None and len(ids) > max_length:
        cut = slice(len(ids) - max_length, None) if keep_end else slice(0, max_length)
        ids, offsets = ids[cut], offsets[cut]
    return ids, offsets


def _selected(offsets: list[tuple[int, int]], span: tuple[int, int] | None, tokens: str,
              start: int = 0) -> list[int]:
    """Positions to count: all tokens from char `start` on, or those overlapping `span`."""
    if tokens == "response" and span is not None:
        s, e = span
        return [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
    return [i for i, (a, b) in enumerate(offsets) if a >= start and (b > a or start == 0)]


def _sequence(tok: Any, text: str, special: bool, span: tuple[int, int] | None, tokens: str,
              max_length: int | None) -> ModelInput:
    if tokens == "all":  # exactly tokenizer(text)["input_ids"], every position counted
        ids = list(tok(text, add_special_tokens=special)["input_ids"])[:max_length]
        return ModelInput(ids, list(range(len(ids))))
    ids, offsets = _encode(tok, text, special, max_length)
    return ModelInput(ids, _selected(offsets, span, tokens))


def sequences(examples: Iterable[Example], tok: Any, render: Render,
              max_length: int | None = None) -> Iterator[ModelInput]:
    """One model input per example. For plain text with `tokens='all'` the ids are exactly
    `tokenizer(text)["input_ids"]` and every position counts (the reference's contract)."""
    for ex in examples:
        seq = _sequence(tok, *render_text(ex, tok, render), render.tokens, max_length)
        yield ModelInput(seq.ids, [p for p in seq.positions if p > 0]) if render.skip_first else seq


def icl_sequences(examples: list[Example], tok: Any, render: Render, n_demos: int = 2,
                  seed: int = 0, max_length: int | None = None) -> Iterator[ModelInput]:
    """Each example with `n_demos` demonstrations prepended, as one stream (method `paper`)."""
    rng = random.Random(seed)
    for i, ex in enumerate(examples):
        demos = draw_demos(examples, n_demos, i, rng)
        yield _sequence(tok, *render_text(ex, tok, render, demos), "all", max_length)


def _common_suffix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Truncation:
    """What fitting ICL pairs into `max_length` did. Demonstrations are never cut: the example
    is cut from its end, identically on both sides, so an over-long pair keeps its context
    and loses (counted) example tokens instead of silently losing its demonstrations."""

    examples: int = 0
    cut: int = 0  # examples whose end was cut
    tokens_cut: int = 0
    max_cut: int = 0
    empty: int = 0  # examples left with no aligned token
    max_demo_tokens: int = 0  # longest run of tokens before the example on the shifted side

    def add(self, pair: Pair) -> Pair:
        self.examples += 1
        self.cut += pair.cut > 0
        self.tokens_cut += pair.cut
        self.max_cut = max(self.max_cut, pair.cut)
        self.empty += not pair.a.positions
        self.max_demo_tokens = max(self.max_demo_tokens, pair.head)
        return pair

    def check(self, what: str, max_length: int | None, demos_extra: bool = False) -> None:
        """Warn about cut examples and examples left without an aligned token; stop when no
        example kept one. `demos_extra`: the demonstrations do not count against max_length
        (a domain's fixed demonstrations), so a cut is the question's own, as in its single run."""
        if self.examples and self.empty == self.examples:
            if demos_extra:
                raise UserError(f"no {what} keeps an aligned token after its demonstrations; check "
                                "the questions and the demonstrations' text")
            raise UserError(
                f"no {what} keeps an aligned token with its demonstrations in context: the "
                f"demonstrations take up to {self.max_demo_tokens} tokens of --max-length "
                f"{max_length}; raise --max-length or use fewer or shorter demonstrations")
        if self.cut and demos_extra:
            warn(f"{self.cut} of {self.examples} {what}s are longer than --max-length {max_length}: "
                 f"cut as in their single run (mean {self.tokens_cut / self.cut:.0f}, max {self.max_cut} "
                 "tokens), after their demonstrations")
        elif self.cut:
            warn(f"{self.cut} of {self.examples} {what}s did not fit --max-length {max_length} with "
                 f"their demonstrations: their ends were cut (mean {self.tokens_cut / self.cut:.0f}, "
                 f"max {self.max_cut} tokens; demonstrations kept whole)")
        if self.empty:
            warn(f"{self.empty} of {self.examples} {what}s kept no aligned token and add nothing")


def align(tok: Any, ex: Example, demos: tuple[Example, ...], render: Render,
          max_length: int | None = None, demos_extra: bool = False) -> Pair:
    """The example with and without `demos` prepended, compared on the example's own tokens:
    a token of one is matched to a token of the other when both have the same id and the same
    character span relative to the start of the example's text (the common suffix of the two
    renderings). Tokens whose split differs across the boundary simply go unmatched.

    Truncation keeps the demonstrations whole and cuts the example's end, by the same number
    of example tokens on both sides. `max_length` bounds the shifted input; with `demos_extra`
    it bounds the example alone (side a is then exactly the example's single-run input) and
    the demonstrations come on top: a domain's fixed demonstrations."""
    text_a, special, span = render_text(ex, tok, render)
    text_b, _, _ = render_text(ex, tok, render, demos)
    n = _common_suffix(text_a, text_b)
    start_a, start_b = len(text_a) - n, len(text_b) - n
    ids_a, off_a = _encode(tok, text_a, special, None)
    ids_b, off_b = _encode(tok, text_b, special, None)
    head_a = _head(off_a, start_a)  # template (and BOS) before the example
    head_b = _head(off_b, start_b)  # ... plus the demonstrations
    own_b = len(ids_b) - head_b
    keep = own_b
    if max_length is not None:
        keep = min(len(ids_a), max_length) - head_a if demos_extra else max_length - head_b
        keep = max(0, min(keep, own_b))
    full_a = len(ids_a)
    ids_a, off_a = ids_a[: head_a + keep], off_a[: head_a + keep]
    if max_length is not None and not demos_extra:
        ids_a, off_a = ids_a[:max_length], off_a[:max_length]
    ids_b, off_b = ids_b[: head_b + keep], off_b[: head_b + keep]
    # With fixed demonstrations the question is cut as in its single run (counted on side a:
    # the question may split into a token more or fewer after the demonstrations).
    cut = full_a - len(ids_a) if demos_extra else own_b - keep
    selected = set(_selected(off_a, span, render.tokens, start_a))
    if render.skip_first:
        selected.discard(0)  # the attention sink of the plain input
    index_a = {(s - start_a, e - start_a, t): i for i, ((s, e), t) in enumerate(zip(off_a, ids_a))
               if i in selected and s >= start_a}
    pos_a: list[int] = []
    pos_b: list[int] = []
    for j, ((s, e), t) in enumerate(zip(off_b, ids_b)):
        i = index_a.get((s - start_b, e - start_b, t)) if s >= start_b else None
        if i is not None:
            pos_a.append(i)
            pos_b.append(j)
    return Pair(ModelInput(ids_a, pos_a), ModelInput(ids_b, pos_b), cut=cut, head=head_b)


def _head(offsets: list[tuple[int, int]], start: int) -> int:
    """Number of leading tokens before the example's text (which begins at char `start`)."""
    return next((i for i, (s, e) in enumerate(offsets) if s >= start and e > s), len(offsets))


def domain_icl_pairs(examples: Iterable[Example], demos: dict[str, tuple[Example, ...]], tok: Any,
                     render: Render, max_length: int | None = None,
                     report: Truncation | None = None) -> Iterator[Pair]:
    """Each domain question without and with its own domain's fixed demonstrations (STS_ICL).
    `max_length` bounds the question, as in the domain's single run; demonstrations come on top."""
    report = report if report is not None else Truncation()
    for ex in examples:
        domain = ex.domain or "all"  # unlabelled records form one domain, as Dataset.by_domain
        if domain not in demos:
            raise UserError(f"no demonstrations for domain {domain!r}; give --domain-demos with "
                            "records of every domain")
        yield shared_prefix(report.add(align(tok, ex, demos[domain], render, max_length, demos_extra=True)))


def shared_prefix(pair: Pair) -> Pair:
    """Side b with its tokens before the example (demonstrations and template) moved into
    `prefix`: identical tokens, so identical features, at a fraction of the cost when many
    questions share the same demonstrations."""
    b, head = pair.b, pair.head
    if head == 0 or any(p < head for p in b.positions):
        return pair
    rest = ModelInput(b.ids[head:], [p - head for p in b.positions], tuple(b.ids[:head]))
    return Pair(pair.a, rest, pair.cut, pair.head)


def same_token_pairs(examples: Iterable[Example], tok: Any, render: Render,
                     max_length: int | None = None) -> Iterator[Pair]:
    """Identical tokens on both sides (method `sft`: base model vs fine-tuned model)."""
    for seq in sequences(examples, tok, render, max_length):
        yield Pair(seq, seq)


def draw_demos(pool: list[Example], n: int, exclude: int, rng: random.Random) -> tuple[Example, ...]:
    """n demonstrations from the pool (those with a response), never the example itself."""
    candidates = [i for i in range(len(pool)) if i != exclude and pool[i].response]
    if n > len(candidates):
        raise UserError(f"asked for {n} demonstrations but the training set has only "
                        f"{len(candidates)} other examples with a response; lower --demos")
    return tuple(pool[i] for i in rng.sample(candidates, n))


def icl_pairs(examples: list[Example], tok: Any, render: Render, n_demos: int = 2, seed: int = 0,
              max_length: int | None = None, report: Truncation | None = None) -> Iterator[Pair]:
    """Each training example without and with `n_demos` demonstrations from the same set."""
    rng = random.Random(seed)
    report = report if report is not None else Truncation()
    for i, ex in enumerate(examples):
        yield report.add(align(tok, ex, draw_demos(examples, n_demos, i, rng), render, max_length))
