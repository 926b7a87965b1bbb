"""Packed likelihoods: many (context, continuation) items in few forward passes, packed into rows
with tree attention masks and restarted positions, each continuation's log-probabilities exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sts.engine.models import LoadedModel, input_device


@dataclass(frozen=True)
class Scoring:
    """One context and the continuations whose log-likelihood after it is wanted."""

    context: list[int]
    continuations: list[list[int]]
    # per continuation (the first ones): also the sum over its tokens from this index on, as an
    # extra (sum, tokens) after the continuations' own (a scored span's tail, at no extra token)
    tails: tuple[int, ...] = ()

    def layout(self) -> tuple[list[int], list[int], list[int]]:
        """(tokens, positions, branch) of the packed item: the context (branch -1), then each
        continuation but its last token (branch i), at positions that go on from the context."""
        tokens, positions, branch = list(self.context), list(range(len(self.context))), [-1] * len(self.context)
        for i, c in enumerate(self.continuations):
            tokens += c[:-1]
            positions += range(len(self.context), len(self.context) + len(c) - 1)
            branch += [i] * (len(c) - 1)
        return tokens, positions, branch


def _tree_masks(model: Any, items: list[tuple[int, list[int], list[int]]], width: int,
                dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive 4D mask of one packed row: a token sees its own item's context up to itself
    and, in a continuation, the tokens of that continuation up to itself; nothing of another
    item. Models with sliding-window layers also get the window (per layer type where the
    model has both kinds, as transformers' `layer_types`)."""
    allowed = torch.zeros(width, width, dtype=torch.bool)
    distance = torch.zeros(width, width, dtype=torch.long)
    for start, positions, branch in items:
        n = len(positions)
        pos, br = torch.tensor(positions), torch.tensor(branch)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        same = (br[None, :] == -1) | (br[None, :] == br[:, None])
        allowed[start:start + n, start:start + n] = causal & same
        distance[start:start + n, start:start + n] = pos[:, None] - pos[None, :]
    pad = ~allowed.any(1)
    allowed[pad, pad] = True  # padding sees itself (no row without keys)
    low = torch.finfo(dtype).min

    def additive(keep: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, 1, width, width, dtype=dtype).masked_fill(~keep, low)

    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    kinds = set(getattr(cfg, "layer_types", None) or [])
    if window and "sliding_attention" in kinds:
        return {"full_attention": additive(allowed),
                "sliding_attention": additive(allowed & (distance < window))}
    if window and getattr(cfg, "use_sliding_window", True):
        return additive(allowed & (distance < window))
    return additive(allowed)


ROW_TOKENS = 512  # tokens per packed row: longer rows pay attention over unrelated items


@torch.no_grad()
def packed_logprobs(lm: LoadedModel, items: list[Scoring], row_tokens: int = ROW_TOKENS,
                    batch_tokens: int = 4096, progress: Callable[[int], None] = lambda _n: None
                    ) -> list[list[tuple[float, int]]]:
    """(sum of log-probabilities, tokens) of each continuation of each item after its context:
    the same numbers as one forward pass over context + continuation, at a fraction of the cost.

    Why not batches of padded rows: on a CPU the model is compute-bound, so what counts is
    the tokens run. Each item is laid out once in a row — its context, then its continuations
    side by side as branches of a tree (continuations predict their first token from the
    context's last position, so a one-token continuation such as an option letter adds no
    token) — and several items share a row with a block mask (`_tree_masks`) and restarted
    positions; rows of about `row_tokens` go through the model `batch_tokens // row_tokens` at
    a time (a GPU wants many). A context shared by its continuations is run once."""
    model = lm.model
    device = input_device(model)
    dtype = next(model.parameters()).dtype
    laid = [s.layout() for s in items]
    rows = _rows(laid, row_tokens)
    out: list[list[tuple[float, int]]] = [[] for _ in items]
    per_batch = max(1, batch_tokens // row_tokens)
    for b in range(0, len(rows), per_batch):
        group = rows[b:b + per_batch]
        ids, pos, masks, built = _batch(model, laid, group, dtype, device)
        # Log-probabilities only where a prediction is read: each context's last position and
        # each continuation token but the last (the union over the batch's rows).
        needed = sorted({start + len(items[i].context) - 1 for row, (_, _, spans) in zip(group, built)
                         for i, (start, _, _) in zip(row, spans)}
                        | {start + j for _, _, spans in built for start, _, br in spans
                           for j, x in enumerate(br) if x >= 0})
        at = {q: n for n, q in enumerate(needed)}
        logits = model(input_ids=ids.to(device), attention_mask=masks, position_ids=pos.to(device),
                       use_cache=False, logits_to_keep=torch.tensor(needed, device=device)).logits
        logp = torch.log_softmax(logits.float(), -1)
        for r, (members, (_, _, spans)) in enumerate(zip(group, built)):
            for i, (start, _, _) in zip(members, spans):
                out[i] += _continuations(items[i], logp[r], at, start)
            progress(len(members))
    return out


def _rows(laid: list[tuple[list[int], list[int], list[int]]], row_tokens: int) -> list[list[int]]:
    """Item indices per packed row, in order: an item joins the last row while it fits."""
    rows: list[list[int]] = []
    for i, (tokens, _, _) in enumerate(laid):
        if rows and sum(len(laid[j][0]) for j in rows[-1]) + len(tokens) <= row_tokens:
            rows[-1].append(i)
        else:
            rows.append([i])
    return rows


def _batch(model: Any, laid: list[tuple[list[int], list[int], list[int]]], group: list[list[int]], dtype: Any,
           device: Any) -> tuple[torch.Tensor, torch.Tensor, Any, list[tuple[list[int], list[int], list[Any]]]]:
    """One forward pass's input ids, positions and masks for the rows of `group`, and per row its
    tokens, positions and each item's span (start, positions, branches)."""
    built = []
    for row in group:
        row_ids: list[int] = []
        positions: list[int] = []
        spans: list[tuple[int, list[int], list[int]]] = []
        for i in row:
            t, p, br = laid[i]
            spans.append((len(row_ids), p, br))
            row_ids += t
            positions += p
        built.append((row_ids, positions, spans))
    width = max(len(t) for t, _, _ in built)
    per_row: list[Any] = [_tree_masks(model, spans, width, dtype) for _, _, spans in built]
    masks: Any
    if isinstance(per_row[0], dict):
        masks = {k: torch.cat([m[k] for m in per_row]).to(device) for k in per_row[0]}
    else:
        masks = torch.cat(per_row).to(device)
    ids = torch.zeros(len(built), width, dtype=torch.long)
    pos = torch.zeros(len(built), width, dtype=torch.long)
    for r, (row_ids, positions, _) in enumerate(built):
        ids[r, :len(row_ids)] = torch.tensor(row_ids)
        pos[r, :len(positions)] = torch.tensor(positions)
    return ids, pos, masks, built


def _continuations(s: Scoring, logp: torch.Tensor, at: dict[int, int], start: int) -> list[tuple[float, int]]:
    """(sum of log-probabilities, tokens) of each continuation of item `s` laid out at `start` of a
    row whose kept log-probabilities are `logp` (at[position] -> its row), then of its tails."""
    last = at[start + len(s.context) - 1]
    offset = start + len(s.context)
    per_token: list[list[float]] = []
    out = []
    for c in s.continuations:
        values = [float(logp[last, c[0]])] if c else []
        values += [float(logp[at[offset + j], token]) for j, token in enumerate(c[1:])]
        offset += max(len(c) - 1, 0)
        per_token.append(values)
        out.append((sum(values), len(c)))
    return out + [(sum(per_token[k][skip:]), max(len(per_token[k]) - skip, 0)) for k, skip in enumerate(s.tails)]
