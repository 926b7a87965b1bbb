"""Which library of measured runs and which calibration serve a prediction (the same model, SAE,
score, k and kind of domain side) and the shared / own split they give.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sts.analysis.library import Library, check_library, decompose, side_mismatch
from sts.errors import UserError
from sts.prediction.config import PredictConfig

if TYPE_CHECKING:
    from sts.prediction.result import Prediction


@dataclass
class Libraries:
    """What measured runs add to a prediction: the shared/own split and the calibration."""

    decomposition: Library | None
    decomposition_note: str
    calibration: Library | None
    calibration_note: str
    calibration_asked: bool = False  # --calibrate given: a library that cannot calibrate is bad input
    side: str = ""  # what the prediction's domain side reads (`library.side_label`)

    def apply(self, pred: Prediction, parts: list[str]) -> Prediction:
        """Split and calibrate `pred`, leaving the library's runs of its own sets (`parts`) out."""
        from sts.analysis.calibration import from_library, judge

        pred.side = self.side
        if self.decomposition is not None:
            pred.decomposition = decompose(self.decomposition, pred.score, pred.scores, leave_out=parts)
        pred.decomposition_note = self.decomposition_note
        pred.calibration_note = self.calibration_note
        if self.calibration is not None:
            try:
                pred.calibrations = from_library(self.calibration, pred.score, leave_out=parts)
                pred.changes = {m: c.predict(pred.scores) for m, c in pred.calibrations.items()}
                pred.calibration_checks = judge(self.calibration, pred.score, leave_out=parts)
            except UserError as exc:
                if self.calibration_asked:
                    raise
                pred.calibration_note = f"no calibration: {exc}"
        return pred


def library(cfg: PredictConfig, side: str) -> tuple[Library | None, str]:
    """The library that splits the prediction into shared and own parts (`sts.analysis.library`), or
    None and why not (the default one when it does not fit; a library asked for must fit)."""
    from sts.data.embedded import LIBRARIES, default_library

    if cfg.library == "":
        return None, ""
    path = cfg.library if cfg.library is not None else default_library(cfg.sae, cfg.domains)
    if path is None:  # with the embedded SAE, say why the shipped libraries do not serve these domains
        shipped = [d for d in LIBRARIES if default_library(cfg.sae, d) is not None]
        return None, (f"no shared/own decomposition: the shipped libraries hold scores read on {', '.join(shipped)}, "
                      f"not on {cfg.domains}; `sts validate` on your domains makes one (--library)") if shipped else ""
    lib = Library.load(path)
    why = check_library(lib, cfg.sae, cfg.score, cfg.k, cfg.model)
    if why is not None and cfg.library is not None:  # asked for: a library that cannot serve is bad input
        raise UserError(f"--library: {why}; build one with `sts validate` on this model, SAE, score and k")
    why = why or side_mismatch(lib, cfg.score, side)  # another kind of domain side: said, never mixed
    return (lib, "") if why is None else (None, f"no shared/own decomposition: {why}")


def calibration_library(cfg: PredictConfig, lib: Library | None, side: str) -> tuple[Library | None, str]:
    """The runs that calibrate this prediction: `cfg.calibrate`'s libraries merged (each must
    come from this model, SAE, score and k: else exit 2; one whose domain side is of another kind
    is left out, and said), or the decomposition's library."""
    if cfg.calibrate is None:
        return lib, ""
    if not cfg.calibrate:
        return None, ""
    merged: Library | None = None
    for path in cfg.calibrate:
        one = Library.load(path)
        why = check_library(one, cfg.sae, cfg.score, cfg.k, cfg.model)
        if why is not None:
            raise UserError(f"--calibrate: {why}; calibrate with `sts validate` runs on this model, SAE, score and k")
        if (other := side_mismatch(one, cfg.score, side)) is not None:
            return None, f"no calibration: {other}"
        if merged is None:
            merged = one
            continue
        if one.metric != merged.metric:
            raise UserError(f"--calibrate: {path} measures {one.metric}, {merged.source} {merged.metric}; "
                            "give libraries of one metric")
        for name, s in one.sets.items():
            merged.sets[name if name not in merged.sets else f"{path}:{name}"] = s
        merged.source = f"{merged.source}, {path}"
    return merged, ""
