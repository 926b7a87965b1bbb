"""Extraction on a GPU at the users' scale, side by side in one run (bf16, CUDA):

  engine     sts's Extractor: token-budget batches sorted by length, forward up to the hooked
             layer, SAE encode and statistics on the device
  bare       a bare forward pass up to the same layer (hook and stop) on the same batches
  reference  reference-style: full forward (all layers + LM head, hidden states kept), dense
             features of every token copied to the host and concatenated

Model: Llama-3-8B's shapes (hidden 4096, 32 layers, 14336 MLP, 32 heads / 8 KV heads, 128,256
vocabulary) with random weights built on the device (nothing downloaded); SAE: 65,536 wide
TopK (k = 64), random, float32 (sts's default), at layer 25 (the paper's Llama SAE layer).
Speed does not depend on the weights. For each batch token budget (8k, 32k, 128k): tokens/s
and peak GPU memory of each method; target engine >= 0.9x the bare forward's tokens/s.

    python benchmarks/gpu_extract.py                 # needs CUDA; otherwise prints "no GPU: skipped"
    python benchmarks/gpu_extract.py --smoke         # tiny shapes on the CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Shapes:
    hidden: int = 4096
    layers: int = 32
    mlp: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128_256
    sae_width: int = 65_536
    layer: int = 25


SMOKE = Shapes(hidden=64, layers=4, mlp=128, heads=4, kv_heads=2, vocab=512, sae_width=256, layer=2)


class _Tokenizer:
    """The engine reads only the pad id from a tokenizer; the benchmark feeds token ids."""

    pad_token_id = 0


def build(shapes: Shapes, device: str, dtype: torch.dtype):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sts.engine.models import HookPoint, LoadedModel
    from sts.engine.saes import LoadedSAE

    cfg = LlamaConfig(hidden_size=shapes.hidden, num_hidden_layers=shapes.layers, intermediate_size=shapes.mlp,
                      num_attention_heads=shapes.heads, num_key_value_heads=shapes.kv_heads,
                      vocab_size=shapes.vocab, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        sae = TopKSAE(TopKSAEConfig(d_in=shapes.hidden, d_sae=shapes.sae_width, k=64, device=device,
                                    metadata=SAEMetadata(hook_name=f"blocks.{shapes.layer}.hook_resid_post")))
    return LoadedModel(model, _Tokenizer(), "llama-3-8b-shapes"), LoadedSAE(sae.eval(), "random-topk-65k"), \
        HookPoint(shapes.layer)


def sequences(n_tokens: int, vocab: int, seed: int = 0) -> list:
    """Random token sequences of 64 to 2,048 tokens (the spread of SFT examples), every token counted."""
    from sts.data.inputs import ModelInput

    g = torch.Generator().manual_seed(seed)
    out, total = [], 0
    while total < n_tokens:
        n = int(torch.randint(64, 2049, (1,), generator=g))
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append(ModelInput(ids, list(range(n))))
        total += n
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def run(method: str, lm, sae, point, seqs, budget: int, device: str) -> tuple[int, float, float]:
    from sts.engine.extract import Extractor
    from sts.engine.models import ResidualReader, pad_batch

    engine = Extractor(lm, sae, point, batch_tokens=budget)
    batches = [b for _, b in engine.batches(seqs, len(seqs), method)]  # the same layout for all three
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    tokens = 0
    if method == "engine":
        tokens = engine.stats(iter(seqs)).count
    elif method == "bare":
        reader = ResidualReader(lm, point)
        for batch in batches:
            ids, mask = pad_batch([s.ids for s in batch], 0)
            reader(ids, mask)
            tokens += int(mask.sum())
    else:
        dense = []
        for batch in batches:
            ids, mask = pad_batch([s.ids for s in batch], 0)
            with torch.no_grad():
                hidden = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                                  use_cache=False).hidden_states[point.layer + 1]
            dense.append(sae.encode(hidden[mask.bool().to(device)]).cpu())
        tokens = int(torch.cat(dense).shape[0])
    sync(device)
    return tokens, time.perf_counter() - start, peak_gb(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    parser.add_argument("--budgets", default="8192,32768,131072", help="batch token budgets")
    parser.add_argument("--tokens", type=int, default=262_144, help="tokens per measurement")
    args = parser.parse_args()
    if args.smoke:
        shapes, device, dtype = SMOKE, "cpu", torch.float32
        args.tokens, budgets = 8192, [1024, 4096]
    else:
        if not torch.cuda.is_available():
            print("no GPU: skipped")
            return
        shapes, device, dtype = Shapes(), "cuda", torch.bfloat16
        budgets = [int(b) for b in args.budgets.split(",")]
    lm, sae, point = build(shapes, device, dtype)
    seqs = sequences(args.tokens, shapes.vocab)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, {dtype}, Llama-3-8B shapes{' (smoke: tiny)' if args.smoke else ''}, "
          f"SAE {shapes.sae_width} wide at layer {shapes.layer}, {sum(len(s.ids) for s in seqs)} tokens")
    run("engine", lm, sae, point, seqs[:4], budgets[0], device)  # warm-up (kernels, allocator)
    print(f"\n{'budget':>8} {'method':<10} {'tok/s':>10} {'peak GB':>8} {'x bare':>7}")
    for budget in budgets:
        rows = {m: run(m, lm, sae, point, seqs, budget, device) for m in ("bare", "engine", "reference")}
        bare = rows["bare"][0] / rows["bare"][1]
        for m, (tokens, seconds, peak) in rows.items():
            print(f"{budget:>8} {m:<10} {tokens / seconds:>10.0f} {peak:>8.1f} {tokens / seconds / bare:>7.2f}")
    print("\ntarget: engine >= 0.90x bare", file=sys.stderr)


if __name__ == "__main__":
    main()
