"""Memory and time of the gradient scores' training side per 1,000 training examples, on paper: derived
from each model's published shapes and `sts finetune`'s LoRA recipe (rank 16 on every linear layer),
not measured (issue 41, item 4). The SmolLM2-135M row can be set against the CPU measurement of
`benchmarks/gradient_speed.py`; a 7-9B row is measured only where a GPU is lent (none was for the
session that wrote this).

Rules (each an estimate, stated so it can be checked):
- compute per token: a forward pass is ~2 N FLOPs (N the parameters the token passes through, the
  input embedding excluded); the backward pass through a frozen base model computes activation
  gradients only, ~2 N more (the adapter's own weight gradients are ~1% of that); gradient
  checkpointing recomputes the forward: ~6 N in all;
- GPU time at 40% of the H100's dense bf16 peak (989 TFLOP/s): ~400 TFLOP/s;
- memory: the weights in bf16 (2 N bytes), the adapter's G and v accumulated in float64 (16 P bytes),
  each example's gradient in float32 (4 P bytes, per example of the batch), the activations kept for
  the backward pass (~(10 h + 3 i) values of 2 bytes per token and layer; with checkpointing, each
  layer's input only, h values), and the float32 logits and their gradient (8 V bytes per token).

    python benchmarks/large_models.py [--tokens-per-example 300] [--batch-tokens 4096]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

PEAK_FLOPS = 989e12 * 0.4  # H100 SXM dense bf16 at 40% utilisation
RANK = 16  # defaults.LORA_R


@dataclass(frozen=True)
class Shape:
    """A decoder's shapes, as its published config.json gives them."""

    name: str
    params: float  # all parameters
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def lora(self, rank: int = RANK) -> int:
        """Adapter parameters: rank x (in + out) for q, k, v, o, gate, up, down in every layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        pairs = [(self.hidden, q), (self.hidden, kv), (self.hidden, kv), (q, self.hidden),
                 (self.hidden, self.intermediate), (self.hidden, self.intermediate), (self.intermediate, self.hidden)]
        return rank * self.layers * sum(a + b for a, b in pairs)

    def flops_params(self) -> float:
        """Parameters a token's forward pass multiplies through: all but the input embedding's lookup
        (a tied embedding still serves as the output head)."""
        return self.params - (0 if self.tied else self.vocab * self.hidden)


MODELS = (
    Shape("SmolLM2-135M", 134.5e6, 576, 1536, 30, 9, 3, 64, 49152, True),
    Shape("Llama-3-8B", 8.03e9, 4096, 14336, 32, 32, 8, 128, 128256, False),
    Shape("Qwen2.5-7B", 7.62e9, 3584, 18944, 28, 28, 4, 128, 152064, False),
    Shape("Gemma-2-9B", 9.24e9, 3584, 14336, 42, 16, 8, 256, 256000, True),
)


def row(m: Shape, tokens: int, batch_tokens: int, checkpointing: bool) -> dict[str, float]:
    p = m.lora()
    per_token = (6 if checkpointing else 4) * m.flops_params()
    seconds = 1000 * tokens * per_token / PEAK_FLOPS
    examples = max(1, batch_tokens // tokens)
    activations = batch_tokens * m.layers * 2 * (m.hidden if checkpointing else 10 * m.hidden + 3 * m.intermediate)
    memory = 2 * m.params + 16 * p + 4 * p * examples + activations + 8 * m.vocab * batch_tokens
    return {"lora": p, "seconds": seconds, "memory": memory, "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens-per-example", type=int, default=300)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    args = parser.parse_args()
    print(f"training side per 1,000 examples of {args.tokens_per_example} tokens, batches of {args.batch_tokens} "
          f"tokens, LoRA r {RANK}, bf16 on one H100 (on paper: docstring's rules)")
    print("| model | adapter params | checkpointing | GPU time | peak memory |\n|---|---|---|---|---|")
    for m in MODELS:
        for ckpt in (False, True):
            r = row(m, args.tokens_per_example, args.batch_tokens, ckpt)
            print(f"| {m.name} | {r['lora'] / 1e6:.1f}M | {'yes' if ckpt else 'no'} | {r['seconds']:.1f} s | "
                  f"{r['memory'] / 2**30:.1f} GiB |")


if __name__ == "__main__":
    main()
