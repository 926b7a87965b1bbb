"""SAE loading through sae_lens: a local sae_lens directory (`cfg.json` +
`sae_weights.safetensors`, as `SAE.save_model` writes) or `RELEASE/SAE_ID` from sae_lens's
pretrained directory (Gemma Scope, Llama Scope, ...). Encoding is sae_lens's own
`SAE.encode`, so every architecture it knows (Standard, TopK, JumpReLU, ...) works as is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sts.errors import UserError

if TYPE_CHECKING:
    from sae_lens import SAE


class LoadedSAE:
    """An SAE and the spec it was loaded from. A local directory's shape, hook and model are
    read from its cfg.json, and the SAE itself (sae_lens, whose import of transformer_lens takes
    ~13 s on 2 CPU cores) is loaded only when its weights are needed: a run whose statistics
    are all cached (or shipped) never imports it."""

    def __init__(self, sae: SAE | None, spec: str, config: dict[str, Any] | None = None,
                 loader: Callable[[], SAE] | None = None):
        if sae is None and loader is None:
            raise ValueError("give the SAE or a loader")
        self._sae, self.spec, self._config, self._loader = sae, spec, config or {}, loader

    @property
    def sae(self) -> SAE:
        if self._sae is None:
            assert self._loader is not None
            self._sae = self._loader()
        return self._sae

    def _field(self, name: str) -> Any:
        """A field of cfg.json (top level, else its metadata); None if it does not say (an SAE
        given as an object has no cfg.json: its own cfg answers)."""
        if name in self._config:
            return self._config[name]
        return (self._config.get("metadata") or {}).get(name)

    @property
    def d_in(self) -> int:
        value = self._field("d_in")
        return int(value if value is not None else self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        value = self._field("d_sae")
        return int(value if value is not None else self.sae.cfg.d_sae)

    @property
    def hook_name(self) -> str | None:
        value = self._field("hook_name")
        return value if value is not None else self.sae.cfg.metadata.hook_name

    @property
    def model_name(self) -> str | None:
        """The model the SAE was trained on, as its metadata names it."""
        if self._config:  # a cfg.json read alone: its word, or none
            return self._field("model_name")
        return getattr(self.sae.cfg.metadata, "model_name", None)

    @torch.no_grad()
    def encode(self, acts: torch.Tensor) -> torch.Tensor:
        """[..., d_in] activations -> [..., d_sae] feature activations (dense, float32)."""
        feats = self.sae.encode(acts.to(self.sae.W_enc.device, self.sae.W_enc.dtype))
        if feats.is_sparse:
            feats = feats.to_dense()
        return feats.float()


def check_width(sae: LoadedSAE, hidden_size: int, model_spec: str) -> None:
    if sae.d_in != hidden_size:
        raise UserError(f"SAE {sae.spec} reads vectors of size {sae.d_in} but {model_spec} has "
                        f"hidden size {hidden_size}; use an SAE trained on this model")


def _model_key(name: str) -> str:
    """A model's name without its organisation, path or .gguf suffix, lower case:
    'google/gemma-2-9b-it' and sae_lens's 'gemma-2-9b-it' are the same model."""
    stem = Path(name.rstrip("/")).name.lower()
    return stem[:-5] if stem.endswith(".gguf") else stem


def check_pairing(sae: LoadedSAE, model_spec: str) -> None:
    """Warn when the SAE's metadata names another model than the one it is used on: widths
    can match across a family (base vs instruct, versions), the features then mean little."""
    from sts.errors import warn

    trained_on = sae.model_name
    if not trained_on or not model_spec:
        return
    a, b = _model_key(str(trained_on)), _model_key(model_spec)
    if a != b and not b.startswith(a):  # a quantized file of the same model keeps its name first
        warn(f"SAE {sae.spec} was trained on {trained_on}, and is used on {model_spec}: its features "
             "may not mean the same on this model (use the SAE trained on it)")


def _local_config(path: Path) -> dict[str, Any] | None:
    """cfg.json when it gives the shape and the hook and the weights are beside it; else None."""
    import json

    try:
        config = json.loads((path / "cfg.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    hook = config.get("hook_name") or (config.get("metadata") or {}).get("hook_name")
    shaped = isinstance(config.get("d_in"), int) and isinstance(config.get("d_sae"), int)
    return config if shaped and isinstance(hook, str) and (path / "sae_weights.safetensors").is_file() else None


def load_sae(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedSAE:
    """The SAE on `device` (the hooked layer's: features are encoded and counted there) in
    `dtype` (float32 by default: a 16-bit encoder moves features near the TopK/JumpReLU
    thresholds in and out, for a cost the forward pass dwarfs)."""
    device = str(device)
    dtype_name = str(dtype).removeprefix("torch.")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "cfg.json").exists():
            raise UserError(f"SAE not found: {spec} has no cfg.json (expected a directory written "
                            "by sae_lens SAE.save_model)")

        def load() -> SAE:
            from sae_lens import SAE

            try:
                return SAE.load_from_disk(path, device=device, dtype=dtype_name).eval()
            except Exception as exc:  # sae_lens raises KeyError/ValueError/OSError for bad dirs
                raise UserError(f"SAE at {spec} could not be loaded ({type(exc).__name__}: {exc})") from None

        config = _local_config(path)
        if config is None:  # a cfg.json this module cannot read alone: sae_lens reads it now
            return LoadedSAE(load(), spec)
        return LoadedSAE(None, spec, config, load)
    if path.exists() or spec.startswith((".", "/", "~")) or "/" not in spec:
        raise UserError(f"SAE not found: {spec} (give a sae_lens directory, or RELEASE/SAE_ID "
                        "from sae_lens's pretrained directory, e.g. gemma-scope-2b-pt-res/"
                        "layer_20/width_16k/average_l0_71)")
    from sae_lens import SAE

    release, sae_id = spec.split("/", 1)
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise UserError(f"SAE not found: no sae_lens release named {release!r} (see "
                        "sae_lens's pretrained_saes.yaml for the names)")
    known_ids = directory[release].saes_map
    if sae_id not in known_ids:
        examples = ", ".join(list(known_ids)[:3])
        raise UserError(f"SAE not found: release {release!r} has no SAE {sae_id!r} "
                        f"(ids look like: {examples})")
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype_name)
    except Exception as exc:  # network / hub errors come in many types
        raise UserError(f"could not download SAE {spec} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); check the network or "
                        "use a local sae_lens directory") from None
    return LoadedSAE(sae.eval(), spec)
