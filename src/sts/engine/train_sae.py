"""Train an SAE on one layer's residual stream where none is published.

Three steps, each resumable on its own because the first is slow on a CPU:
1. `cache_activations`: run the model up to the layer over a text corpus (the forward stops
   there, as in extraction) and store the activations on disk in fp16 shards.
2. `train`: sae_lens's own `SAETrainer` with a TopK or JumpReLU training SAE, fed shuffled
   batches from the shards (the trainer is sae_lens's; only the data provider is ours,
   because sae_lens's activation store expects a TransformerLens model).
3. `evaluate_sae`: explained variance, L0 and dead features on held-out text, and the
   increase in next-token loss when the SAE's reconstruction replaces the residual stream.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sts import files
from sts.data.datasets import load_dataset
from sts.data.inputs import Render, render_text
from sts.engine.extract import chunks
from sts.engine.models import HookPoint, LoadedModel, ResidualReader, decoder_layers, pad_batch
from sts.engine.settings import SAETrainSpec, TrainSAEConfig
from sts.errors import UserError

SHARD_TOKENS = 100_000


def corpus_texts(specs: Iterable[str]) -> Iterator[str]:
    """Texts of every record of every spec (prompt and response in plain text)."""
    render = Render(chat=False, with_response=True, tokens="all")
    for spec in specs:
        for ex in load_dataset(spec).examples:
            yield render_text(ex, None, render)[0]


def windows(texts: Iterable[str], tok: Any, seq_len: int) -> Iterator[list[int]]:
    """Each text tokenized and cut into windows of seq_len tokens (short tails dropped)."""
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), seq_len):
            if len(ids) - i >= 16:
                yield ids[i:i + seq_len]


def _batched_acts(lm: LoadedModel, point: HookPoint, wins: Iterable[list[int]], batch_size: int
                  ) -> Iterator[torch.Tensor]:
    """Activations of every token but each window's first (a high-norm attention sink that
    SAE training conventionally leaves out), as [tokens, d_model] per batch of windows."""
    reader = ResidualReader(lm, point)
    pad = int(lm.tokenizer.pad_token_id or 0)
    for batch in chunks(wins, batch_size):
        ids, mask = pad_batch(batch, pad)
        acts = reader(ids, mask)
        keep = mask.bool()
        keep[:, 0] = False
        yield acts[keep.to(acts.device)]


def cache_activations(lm: LoadedModel, point: HookPoint, texts: Iterable[str], out_dir: Path,
                      n_tokens: int, seq_len: int = 256, batch_size: int = 8) -> int:
    """Write fp16 activation shards `acts_NNNN.npy` under out_dir, up to n_tokens. Existing
    complete shards are kept (resume after an interruption); returns tokens on disk."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = sorted(out_dir.glob("acts_*.npy"))
    have = sum(np.load(p, mmap_mode="r").shape[0] for p in done)
    skip = have
    buffer: list[torch.Tensor] = []
    buffered = 0
    shard = len(done)
    bar = tqdm(total=n_tokens, initial=have, desc="caching activations", unit="tok", disable=None)
    for acts in _batched_acts(lm, point, windows(texts, lm.tokenizer, seq_len), batch_size):
        if have >= n_tokens:
            break
        if skip > 0:  # the prefix already on disk (the corpus order is deterministic)
            drop = min(skip, acts.shape[0])
            acts, skip = acts[drop:], skip - drop
            if acts.shape[0] == 0:
                continue
        acts = acts[: n_tokens - have]
        buffer.append(acts.half().cpu())
        buffered += acts.shape[0]
        have += acts.shape[0]
        bar.update(acts.shape[0])
        if buffered >= SHARD_TOKENS or have >= n_tokens:
            _write_shard(out_dir, shard, torch.cat(buffer))
            shard, buffer, buffered = shard + 1, [], 0
    if buffer:
        _write_shard(out_dir, shard, torch.cat(buffer))
    bar.close()
    return have


def _write_shard(out_dir: Path, index: int, acts: torch.Tensor) -> None:
    tmp = out_dir / f".acts_{index:04d}.npy"
    np.save(tmp, acts.numpy())
    tmp.rename(out_dir / f"acts_{index:04d}.npy")


SINK_FACTOR = 10.0


def sink_mask(acts: torch.Tensor, median_norm: float) -> torch.Tensor:
    """Rows that are "massive activations": norm above SINK_FACTOR x the median. SmolLM2 has
    rare attention-sink tokens (besides position 0) with norms ~70x the median: one in 20k
    tokens carried 35% of all variance in a sample, so they would dominate both the SAE's
    training loss and its explained variance."""
    return acts.float().norm(dim=-1) > SINK_FACTOR * median_norm


def load_activations(out_dir: Path) -> tuple[torch.Tensor, float, int]:
    """Cached activations without sink rows; also the median norm and how many were dropped."""
    shards = sorted(out_dir.glob("acts_*.npy"))
    if not shards:
        raise UserError(f"no cached activations in {out_dir}")
    acts = torch.from_numpy(np.concatenate([np.load(p) for p in shards]))
    median = float(acts[:100_000].float().norm(dim=-1).median())
    sinks = sink_mask(acts, median)
    return acts[~sinks], median, int(sinks.sum())


def _provider(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled float32 batches from the fp16 activations in memory."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(acts.shape[0], generator=g)
        for i in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[order[i:i + batch_size]].float()


def train(acts: torch.Tensor, hook_name: str, spec: SAETrainSpec, model_name: str, device: str = "cpu") -> Any:
    """Train with sae_lens's SAETrainer on `device`; returns the training SAE (normalisation
    folded in). Activations stay on the host and go to the device batch by batch."""
    from sae_lens import (
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        SAETrainer,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(spec.seed)
    d_in = acts.shape[1]
    meta = SAEMetadata(hook_name=hook_name, model_name=model_name)
    common = dict(d_in=d_in, d_sae=spec.width, normalize_activations="expected_average_only_in",
                  metadata=meta, device=device)
    if spec.architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=spec.k, **common))
    elif spec.architecture == "jumprelu":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=spec.l0_coefficient, **common))
    else:
        raise UserError(f"unknown SAE architecture {spec.architecture!r}; use topk or jumprelu")
    total = int(acts.shape[0] * spec.epochs) // spec.batch_size * spec.batch_size
    steps = total // spec.batch_size
    cfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=spec.batch_size,
                           lr=spec.lr, lr_warm_up_steps=min(50, steps // 10),
                           lr_decay_steps=steps // 5, lr_end=spec.lr / 10,
                           n_batches_for_norm_estimate=min(100, max(1, acts.shape[0] // spec.batch_size)),
                           dead_feature_window=max(1, spec.dead_window_tokens // spec.batch_size),
                           device=device)
    return SAETrainer(cfg, sae, _provider(acts, spec.batch_size, spec.seed)).fit()


class _Recon:
    """Running sums for explained variance and L0 over a subset of tokens."""

    def __init__(self, d_in: int):
        self.sq_err = self.sum_x2 = self.l0 = 0.0
        self.count = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)

    def add(self, x: torch.Tensor, recon: torch.Tensor, feats: torch.Tensor) -> None:
        self.sq_err += float(((recon - x) ** 2).sum())
        self.sum_x += x.double().sum(0).cpu()
        self.sum_x2 += float((x.double() ** 2).sum())
        self.l0 += float((feats != 0).sum())
        self.count += x.shape[0]

    def explained_variance(self) -> float:
        total = self.sum_x2 - float((self.sum_x ** 2).sum()) / self.count  # sum ||x - mean||^2
        return 1 - self.sq_err / total


@torch.no_grad()
def evaluate_sae(lm: LoadedModel, point: HookPoint, sae: Any, texts: Iterable[str], median_norm: float,
                 n_tokens: int = 50_000, seq_len: int = 256, batch_size: int = 8) -> dict[str, float]:
    """Held-out metrics: fraction of variance explained and mean L0 (on all tokens but each
    window's first, and without sink tokens, see `sink_mask`), dead-feature fraction (never
    fires on these tokens), and next-token loss clean vs with the reconstruction spliced in."""
    wins = list(_take_windows(windows(texts, lm.tokenizer, seq_len), n_tokens))
    every, no_sinks = _Recon(sae.cfg.d_in), _Recon(sae.cfg.d_in)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for acts in tqdm(_batched_acts(lm, point, wins, batch_size), desc="SAE metrics",
                        total=math.ceil(len(wins) / batch_size), disable=None, leave=False):
        feats = sae.encode(acts)
        recon = sae.decode(feats)
        every.add(acts, recon, feats)
        keep = ~sink_mask(acts, median_norm)
        no_sinks.add(acts[keep], recon[keep], feats[keep])
        fired |= (feats != 0).any(0).cpu()
    clean, spliced = _spliced_loss(lm, point, sae, wins, batch_size, median_norm)
    return {"tokens": every.count, "sink_tokens": every.count - no_sinks.count,
            "explained_variance": no_sinks.explained_variance(), "l0": no_sinks.l0 / no_sinks.count,
            "explained_variance_with_sinks": every.explained_variance(),
            "dead_fraction": float((~fired).float().mean()), "ce_loss_clean": clean,
            "ce_loss_spliced": spliced, "ce_loss_increase": spliced - clean}


def _take_windows(wins: Iterator[list[int]], n_tokens: int) -> Iterator[list[int]]:
    total = 0
    for w in wins:
        if total >= n_tokens:
            return
        yield w
        total += len(w) - 1


def _spliced_loss(lm: LoadedModel, point: HookPoint, sae: Any, wins: list[list[int]],
                  batch_size: int, median_norm: float) -> tuple[float, float]:
    """Mean next-token loss with and without the SAE's reconstruction at the hook point
    (position 0 and sink tokens, which the SAE is not trained on, keep their activations)."""
    block = decoder_layers(lm.model)[point.layer]
    pad = int(lm.tokenizer.pad_token_id or 0)
    losses = {False: [0.0, 0], True: [0.0, 0]}

    def splice(_m: Any, _a: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        recon = sae.decode(sae.encode(hidden.float())).to(hidden.dtype)
        untouched = sink_mask(hidden, median_norm)
        untouched[:, 0] = True
        recon = torch.where(untouched[..., None], hidden, recon)
        return (recon, *output[1:]) if isinstance(output, tuple) else recon

    device = lm.input_device
    for i in range(0, len(wins), batch_size):
        batch = wins[i:i + batch_size]
        ids, mask = (t.to(device) for t in pad_batch(batch, pad))
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 1] = -100  # predicting token 1 reads the sink position only
        for spliced in (False, True):
            handle = block.register_forward_hook(splice) if spliced else None
            try:
                out = lm.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            finally:
                if handle:
                    handle.remove()
            n = int((labels[:, 1:] != -100).sum())
            losses[spliced][0] += float(out.loss) * n
            losses[spliced][1] += n
    return losses[False][0] / losses[False][1], losses[True][0] / losses[True][1]


def save_sae(training_sae: Any, out: Path, metrics: dict[str, Any], spec: SAETrainSpec,
             command: str, fp16: bool = True) -> None:
    """Inference SAE in sae_lens format (cfg.json + sae_weights.safetensors) plus metrics.json."""
    if fp16:
        training_sae = training_sae.to(torch.float16)
    training_sae.save_inference_model(out)
    if fp16:  # loads as float32 by default; fp16 is only the storage format
        cfg_path = out / files.SAE_CONFIG
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / files.SAE_METRICS).write_text(json.dumps(
        {"metrics": metrics, "train": asdict(spec), "command": command}, indent=2) + "\n")


# --- the `sts train-sae` stage -------------------------------------------------------------


def run(cfg: TrainSAEConfig, command: str = "", progress: Callable[[str], None] = lambda _m: None
        ) -> dict[str, Any]:
    """Cache activations, train, measure, and write cfg.out atomically; returns the metrics."""
    from sts.engine.models import check_layer, default_model_dir, load_model, model_shape
    from sts.files import atomic_dir

    model = cfg.model or str(default_model_dir())
    point = HookPoint(cfg.layer, "post")
    check_layer(point, model_shape(model)[1], model)
    device, dtype = cfg.placement.resolved()
    lm = load_model(model, dtype, device)
    acts_dir = cfg.activations or cfg.out.with_name(cfg.out.name + ".acts")
    have = cache_activations(lm, point, corpus_texts(cfg.corpus), acts_dir, cfg.tokens, cfg.seq_len, cfg.batch_size)
    progress(f"{have} activations cached in {acts_dir}")
    acts, median_norm, sinks = load_activations(acts_dir)
    sae = train(acts, point.name, cfg.spec, model_name=model, device=device)
    metrics = evaluate_sae(lm, point, sae, corpus_texts([cfg.heldout]), median_norm, cfg.eval_tokens,
                           cfg.seq_len, cfg.batch_size)
    metrics |= {"training_tokens": acts.shape[0], "training_sink_tokens_dropped": sinks}
    with atomic_dir(cfg.out) as tmp:
        save_sae(sae, tmp, metrics, cfg.spec, command)
    return metrics
