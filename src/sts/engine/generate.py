"""Text generation: the model's own responses (`--responses generated`, as the reference
extraction reads features on the base model's answers) and chains of thought (`sts evaluate
--mode cot`).

vLLM when it is installed and a GPU is present (`pip install -e .[vllm]`), transformers'
`generate` otherwise. Sampling is seeded; greedy at temperature 0.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from sts.data.examples import Example
from sts.engine.models import LoadedModel
from sts.engine.settings import Generation


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def render_prompt(tok: Any, msgs: list[dict[str, str]], fallback_suffix: str = "") -> str:
    """The chat turns up to the assistant's answer (the chat template's generation prompt),
    or plain turns and `fallback_suffix` for a tokenizer without a template."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    turns = [m["content"] + ("\n" if m["role"] == "user" else "\n\n") for m in msgs]
    return "".join(turns) + fallback_suffix


@torch.no_grad()
def generate_transformers(lm: LoadedModel, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                          temperature: float = 0.0, seed: int = 0,
                          progress: Callable[[int], None] = lambda _n: None) -> list[str]:
    tok, outputs = lm.tokenizer, []
    side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the last column of the batch
    torch.manual_seed(seed)
    sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(lm.input_device) for k, v in enc.items()}
            model: Any = lm.model  # transformers types generate() through a decorator mypy cannot follow
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sample)
            new = gen[:, enc["input_ids"].shape[1]:]
            outputs += tok.batch_decode(new, skip_special_tokens=True)
            progress(len(chunk))
    finally:
        tok.padding_side = side
    return outputs


def generate_vllm(model_path: str, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                  seed: int = 0) -> list[str]:
    from vllm import LLM, SamplingParams  # optional: only with a GPU

    llm = LLM(model=model_path, seed=seed)
    params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed)
    return [o.outputs[0].text for o in llm.generate(prompts, params)]


def generate(lm: LoadedModel, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             batch_size: int = 8, use_vllm: bool | None = None,
             progress: Callable[[int], None] = lambda _n: None) -> list[str]:
    """One completion per prompt (vLLM where available, else transformers)."""
    if use_vllm if use_vllm is not None else vllm_available():
        return generate_vllm(lm.spec, prompts, max_new_tokens, temperature, seed)
    return generate_transformers(lm, prompts, max_new_tokens, batch_size, temperature, seed, progress)


def generated_responses(lm: LoadedModel, examples: list[Example], spec: Generation, batch_size: int = 8,
                        progress: Callable[[int], None] = lambda _n: None) -> list[Example]:
    """The examples with the model's own response to each prompt in place of the dataset's."""
    prompts = [render_prompt(lm.tokenizer, [{"role": r, "content": c} for r, c in e.history]
                             + [{"role": "user", "content": e.prompt}]) for e in examples]
    texts = generate(lm, prompts, spec.max_new_tokens, spec.temperature, spec.seed, batch_size, progress=progress)
    return [dataclasses.replace(e, response=t.strip()) for e, t in zip(examples, texts)]
