"""Language model + tokenizer loading, and reading one layer's residual stream.

The residual stream after decoder layer L (TransformerLens `blocks.L.hook_resid_post`) is
the output of the L-th decoder block, which equals HF's `output_hidden_states[L + 1]` for
every layer but the last (HF applies the final norm there; we never do). We capture it
with a forward hook and stop the forward pass right there, so later layers and the LM head
(a third of a small model's cost) never run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sts.engine.settings import check_device_map, resolve_device, resolve_dtype
from sts.errors import UserError
from sts.files import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def input_device(model: Any) -> torch.device:
    """Where a transformers model takes its token ids: its input embedding's device."""
    return next(model.get_input_embeddings().parameters()).device


@dataclass
class LoadedModel:
    model: PreTrainedModel  # a causal LM
    tokenizer: PreTrainedTokenizerBase
    spec: str

    @property
    def input_device(self) -> torch.device:
        """Where token ids go in (the embedding's device; with a device map, the first GPU)."""
        return input_device(self.model)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)


def _source(spec: str) -> tuple[str, dict[str, Any]]:
    """Where transformers should look: (directory or hub id, extra kwargs such as gguf_file)."""
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"model not found: {spec} (no such .gguf file)")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model not found: {spec} has no config.json (expected a directory "
                            "written by save_pretrained, a .gguf file, or a hub id)")
        return str(path), {}
    if spec.startswith((".", "/", "~")):
        raise UserError(f"model not found: {spec} (no such directory or file)")
    return spec, {}


def _not_loadable(spec: str, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"model not found or not loadable: {spec} ({first})")


def model_shape(spec: str) -> tuple[int, int]:
    """(hidden size, number of layers) from the config alone: checks against the SAE run
    before minutes are spent loading a large model's weights."""
    from transformers import AutoConfig

    source, kwargs = _source(spec)
    try:
        cfg = AutoConfig.from_pretrained(source, **kwargs).get_text_config()
    except (OSError, ValueError) as exc:
        raise _not_loadable(spec, exc) from None
    return int(cfg.hidden_size), int(cfg.num_hidden_layers)


def load_model(spec: str, dtype: str | torch.dtype = "auto", device: str = "auto",
               device_map: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a `save_pretrained` directory or a
    `.gguf` file, in `dtype` on `device` (see `resolve_device`, `resolve_dtype`), or spread
    over the visible devices with `device_map="auto"`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_device_map(device_map)
    source, kwargs = _source(spec)
    if device_map:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "device_map"})
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise _not_loadable(spec, exc) from None
    if not device_map:
        model.to(device)  # type: ignore[arg-type]  # transformers types `to` through a decorator
    model.eval()
    if tokenizer.pad_token_id is None:  # padding is masked out; any id will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"  # real tokens keep positions 0..n-1 under default position ids
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec)


def layer_device(lm: LoadedModel, layer: int) -> torch.device:
    """The device of a decoder layer: where its residual stream comes out (under a device
    map, layers sit on different GPUs; the SAE belongs beside the hooked one)."""
    return next(decoder_layers(lm.model)[layer].parameters()).device


def check_layer(point: HookPoint, n_layers: int, spec: str) -> None:
    if not 0 <= point.layer < n_layers:
        raise UserError(f"layer {point.layer} is out of range: {spec} has {n_layers} layers "
                        f"(0-{n_layers - 1}); check --layer or the SAE's hook name")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (model.layers for Llama/Mistral/Qwen2/Gemma2, transformer.h
    for GPT-2): the ModuleList whose length is the configured number of layers."""
    config: Any = model.config
    n = config.get_text_config().num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise UserError(f"could not find the {n} decoder layers of {type(model).__name__}")


@dataclass(frozen=True)
class HookPoint:
    """Where to read the residual stream: output ('post') or input ('pre') of decoder layer."""

    layer: int
    where: str = "post"

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_{self.where}"


_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_HF_PATH = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)$")


def parse_hook_name(hook_name: str | None, layer: int | None = None) -> HookPoint:
    """Hook point from an SAE's hook name (TransformerLens or HF module path); `layer`
    overrides the layer index."""
    if hook_name:
        m = _TL_HOOK.match(hook_name)
        if m:
            point = HookPoint(int(m.group(1)), m.group(2))
            return point if layer is None else HookPoint(layer, point.where)
        m = _HF_PATH.search(hook_name)
        if m:
            return HookPoint(int(m.group(1)) if layer is None else layer, "post")
    if layer is not None:
        return HookPoint(layer, "post")
    raise UserError(
        f"cannot tell the layer from the SAE's hook name {hook_name!r}; expected "
        "blocks.L.hook_resid_post, blocks.L.hook_resid_pre or an HF path such as model.layers.L; "
        "pass --layer L")


def pad_batch(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into (input_ids, attention_mask)."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, seq in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def prefix_cache(reader: ResidualReader, prefix: list[int]) -> Any:
    """Keys and values of a shared prefix (e.g. a domain's demonstrations) up to the hooked
    layer, to read many continuations without encoding the prefix again."""
    from transformers import DynamicCache

    cache = DynamicCache(config=reader.lm.model.config)
    ids = torch.tensor([prefix], dtype=torch.long)
    reader(ids, torch.ones_like(ids), cache)
    return cache


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass once the layer is read."""


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class ResidualReader:
    """Runs a model only up to a hook point and returns the residual stream there."""

    def __init__(self, lm: LoadedModel, point: HookPoint):
        layers = decoder_layers(lm.model)
        check_layer(point, len(layers), lm.spec)
        self.lm, self.point, self.block = lm, point, layers[point.layer]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: Any = None) -> torch.Tensor:
        """[batch, seq] ids -> [batch, seq, d_model] residual activations at the hook point.
        `past`: a transformers Cache holding the keys and values of tokens before `input_ids`
        (filled up to the hooked layer: that is all a stopped forward pass reads or writes);
        `attention_mask` then covers those tokens too."""
        captured: list[torch.Tensor] = []

        def post_hook(_m: nn.Module, _args: Any, output: Any) -> None:
            captured.append(_hidden(output))
            raise _Stop

        def pre_hook(_m: nn.Module, args: Any, kwargs: Any) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        if self.point.where == "post":
            handle = self.block.register_forward_hook(post_hook)
        else:
            handle = self.block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        device = self.lm.input_device
        try:
            self.lm.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                          past_key_values=past, use_cache=past is not None)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"hook at {self.point.name} never fired")
        return captured[0].float()


def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain transformers checkpoint, built once.

    A model loaded from GGUF is marked quantized, so save_pretrained and trainers refuse it,
    and it takes ~20 s to de-quantize at every load. Rebuilding it from its config (without
    quantization_config) and state dict gives identical logits and loads in seconds. Processes
    that need it at once (torchrun's, a test runner's workers, two terminals) take a file lock:
    the first builds it, the others wait and find it built. It is called where the model is first
    needed, after the run's input is checked, so bad input fails at once."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sts.cache import DEFAULT_MODEL_DIRNAME, cache_root
    from sts.data.embedded import gguf_path

    target = cache_root() / DEFAULT_MODEL_DIRNAME
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _complete(target):  # another process built it while this one waited
            return target
        gguf = gguf_path()
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        plain = plain_model(AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs))
        with atomic_dir(target) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target


def _complete(checkpoint: Path) -> bool:
    return (checkpoint / "config.json").exists() and (checkpoint / "model.safetensors").exists()


def plain_model(model: Any) -> Any:
    """A model loaded from GGUF is marked quantized, save_pretrained and the HF Trainer refuse it;
    rebuilt from its config without `quantization_config`, it has identical weights."""
    from transformers import AutoModelForCausalLM

    if getattr(model.config, "quantization_config", None) is None and not getattr(model, "is_quantized", False):
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    return plain
