"""`sts score`'s settings (`ScoreConfig`), each field with its option's help (`sts.options`);
torch-free, so that the command line builds its options from them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sts import defaults
from sts.choices import Method, parse
from sts.defaults import REFERENCE_K, REFERENCE_SCORE
from sts.errors import UserError, check_positive
from sts.options import option
from sts.scores.score import LEXICAL, REGISTRY, check_score, file_scores, spec_of


def is_dense(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".pt", ".pth")


@dataclass
class ScoreConfig:
    """One `sts score` run: shifted features from paired statistics (`shift_stats`) or from
    the reference's dense tensors (`base`, `shifted`), then a score per domain (`domains`:
    name -> .pt tensor, statistics file, or a dataset for the lexical score)."""

    out: Path = option(help="scores JSON")
    domains: dict[str, str] = option(
        flag="--domain", cli_type=list[str], help="NAME=FILE (.pt dense tensor or statistics file; a dataset for "
        "--score lexical); repeat per domain")
    # the reference's score and k, not DEFAULT_*: this verb scores the reference's dense tensors too
    score: str = option(REFERENCE_SCORE, metavar="SCORE", help="{choices} (`sts scores` lists each one's formula)")
    method: Method | None = option(None, help="paper for --base/--shifted .pt tensors; with --shift-stats, read from "
                                   "the file")
    base: Path | None = option(None, help="dense base features (.pt)")
    shifted: Path | None = option(None, help="dense shifted features (.pt)")
    shift_stats: Path | None = option(None, help="paired statistics from `sts extract --shift ...` (--readout raw for "
                                      "raw-act, raw-sq, cosine)")
    train: str | None = option(None, help="training set (dataset spec) for --score lexical")
    k: int = option(REFERENCE_K, min=1, help="number of shifted features (the reference: 100)")
    max_tokens: int = option(defaults.DENSE_ROWS, min=1, help="rows of each dense tensor used (the reference's N)")

    def __post_init__(self) -> None:
        if isinstance(self.domains, list):  # the command line's NAME=FILE options
            self.domains = parse_domains(self.domains)
        self.score = check_score(self.score)
        spec = spec_of(self.score)
        if self.score not in file_scores():
            raise UserError(f"--score {self.score} reads the model ({', '.join(sorted(spec.kind.reads))}), not "
                            f"statistics files: use `sts predict --score {self.score}`")
        self.method = None if self.method is None else parse(Method, self.method, "--method")
        check_positive({"--k": self.k, "--max-tokens": self.max_tokens})
        if not self.domains:
            raise UserError("give at least one --domain NAME=FILE")
        if spec.kind is LEXICAL:
            if self.train is None:
                raise UserError(f"--score {self.score} compares texts: give --train SPEC and --domain NAME=DATASET")
            if self.shift_stats is not None or self.base is not None or self.shifted is not None:
                raise UserError(f"--score {self.score} reads texts only: drop --shift-stats, --base and --shifted")
        elif self.train is not None:
            raise UserError("--train gives the lexical score its text; other scores read statistics: drop it")
        elif self.shift_stats is not None:
            if self.base is not None or self.shifted is not None:
                raise UserError("give either --shift-stats or --base/--shifted, not both")
            if not self.shift_stats.is_file():
                raise UserError(f"shift statistics file not found: {self.shift_stats}")
        else:
            if self.base is None or self.shifted is None:
                raise UserError("give --base and --shifted (.pt feature tensors), or --shift-stats")
            if self.method not in (None, Method.PAPER):
                raise UserError(f"--base/--shifted tensors are scored with --method paper (got {self.method})")
            if spec.dense_power is None:
                dense = ", ".join(n for n, s in REGISTRY.items() if s.dense_power is not None)
                raise UserError(f"dense .pt tensors give the {dense} scores; --score {self.score} needs "
                                "statistics files (`sts extract`)")
        ignored = [name for name, unused in (
            ("--k", self.k != REFERENCE_K and not spec.uses_shift),
            ("--max-tokens", self.max_tokens != defaults.DENSE_ROWS and self.base is None
             and not any(is_dense(p) for p in self.domains.values()))) if unused]
        if ignored:
            raise UserError(f"{', '.join(ignored)} would change nothing here (--k: scores over shifted features; "
                            "--max-tokens: dense .pt tensors); drop it")


def parse_domains(specs: list[str]) -> dict[str, str]:
    """NAME=FILE options as a mapping, each name once."""
    domains: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--domain expects NAME=FILE (got {spec!r})")
        if name in domains:
            raise UserError(f"domain {name!r} is given twice")
        domains[name] = path
    return domains
