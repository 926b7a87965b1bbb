"""Issue 53's cost rule for the content round's candidates: each one's cold time on a user's 100
examples, beside `grad`'s in the same run, with its domain side already there (shipped).
A candidate qualifies at no more than 2x `grad`'s cold cost (docs/results/content-round).

Two measurements, each a ratio taken within itself (they are not mixed):
- in one process, model loaded once and left out (as it is for every candidate): the user-side work
  of the candidates that `experiments/content_round/candidates.py` computes outside `sts predict`
  (the gradient family on the set's first 25 examples, `rds+`'s pooled forward passes on its 100
  records, `bm25` on its 100 texts), each timed after the same warm-up; their domain sides
  (g_D, g_D^c, G_ctrl, the projection, the probe records' pooled states and BM25 statistics) are
  built before the clock starts, as a release would ship them;
- as a user runs it, `sts predict --score S` cold for the shipped scores the SAE candidates and
  `lexical` are read from (`act`, `cosine`, `lexical`) beside `grad` (which includes the shipped
  library's decomposition, `grad +lib`): a fresh cache each, a first run on two other examples to
  fill what no training set changes, then the timed run. The untemplated forms add one mask or one
  projection to `act` and `cosine` (microseconds).

    python benchmarks/content_cost.py [--json docs/results/content-round/cost.json]

About 15 minutes on 2 cores; run it with nothing else on the machine. With `--json F` each figure
is written to F as it is measured and a rerun measures only what F lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# a cold `sts predict` on the user's 100 examples (OWN), as issue 40's cost rule timed it
from candidates_cost import OWN, timed  # noqa: E402

WARM = "embedded:champ#rows=200:205"  # enough for the icl shift's 2 demonstrations
BIG = 1 << 16
GRADIENT_EXAMPLES = 25


def in_process() -> dict[str, float]:
    """Seconds of each candidate's user-side work, model loaded once beforehand."""
    import torch

    from experiments.baselines import BM25, pooled, text_of
    from sts.data.datasets import load_dataset
    from sts.engine.gradients import PerExample, adapted, training_side
    from sts.engine.models import default_model_dir, load_model
    from sts.engine.settings import FinetuneSpec

    spec = FinetuneSpec(max_steps=60, batch_size=4, seed=0)
    lm = load_model(str(default_model_dir()))
    model = adapted(lm, spec)
    user = load_dataset(OWN).examples
    warm = load_dataset(WARM).examples
    # What ships (the values do not matter to the clock, only their shapes): 14 domains' whole and
    # content sides, the control's mean gradient, a 10-direction projection, 140 pooled probe records.
    g = torch.Generator().manual_seed(0)
    whole = {f"d{i}": torch.randn(BIG, generator=g, dtype=torch.float64) for i in range(14)}
    content = {d: torch.randn(BIG, generator=g, dtype=torch.float64) for d in whole}
    g_ctrl = torch.randn(BIG, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(BIG, 10, generator=g, dtype=torch.float64)).Q.T
    hidden = lm.model.config.hidden_size
    probes = torch.nn.functional.normalize(torch.randn(140, hidden, generator=g), dim=1)
    owner = [f"d{i // 10}" for i in range(140)]
    documents = [text_of(e) for e in load_dataset("embedded:champ#rows=0:140").examples]
    bm25 = BM25(documents)

    training_side(lm, model, warm, spec, keep=PerExample(dim=BIG))  # warm-up: lazy init, allocator
    pooled(lm, warm)
    out: dict[str, float] = {}

    def clock(name: str, work: object) -> object:
        start = time.perf_counter()
        value = work()  # type: ignore[operator]
        out[name] = time.perf_counter() - start
        print(f"in process  {name:22s} {out[name]:7.1f} s", flush=True)
        return value

    side = clock("training side (25)", lambda: training_side(lm, model, user[:GRADIENT_EXAMPLES], spec,
                                                              keep=PerExample(dim=BIG)).sketched(BIG))
    G = side.mean.double()

    def project(x: torch.Tensor) -> torch.Tensor:
        y = x - basis.T @ (basis @ x)
        return y / y.norm()

    dots = {
        "grad": lambda: {d: float(G @ v) for d, v in whole.items()},
        "grad-content": lambda: {d: float(G @ v) for d, v in content.items()},
        "grad-ctrl": lambda: {d: float((G - g_ctrl) @ v) for d, v in content.items()},
        "trackstar": lambda: {d: float(project(G) @ project(v)) for d, v in content.items()},
    }
    for name, work in dots.items():
        clock(f"{name} (scoring)", work)
        out[name] = out["training side (25)"] + out[f"{name} (scoring)"]

    def rds() -> dict[str, float]:
        sims = pooled(lm, user) @ probes.T
        return {d: float(sims[:, [i for i, o in enumerate(owner) if o == d]].mean()) for d in whole}

    clock("rds+", rds)
    texts = [text_of(e) for e in user]
    clock("bm25", lambda: [sum(bm25.score(t, j) for t in texts) for j in range(len(documents))])
    return out


# cosine and lexical read the domains' text or residual means, which the sealed domains do not ship:
# they read the same probe records from a file (the round's, built from ../shared), whose side the
# warm-up run caches, so the timed run computes the user's side only, as for the shipped scores
PROBES = ROOT / "out" / "content-round" / "data" / "probes.jsonl"
NEEDS_TEXT = ("cosine", "lexical")


def as_user(done: dict[str, float], save: Any) -> dict[str, float]:
    """Cold `sts predict --score S` seconds for each shipped score (those in `done` kept), each
    saved as it is measured."""
    out = dict(done)
    with tempfile.TemporaryDirectory() as tmp:
        for score in ("grad", "act", "cosine", "lexical"):
            if score not in out:
                # act reads the SAE's features itself: its features are its explanation
                out[score] = timed(score, None, str(PROBES) if score in NEEDS_TEXT else None, Path(tmp),
                                   warm=WARM, explain=score == "act")
                save(out)
            print(f"sts predict --score {score:10s} {out[score]:7.1f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()
    path = Path(args.json) if args.json else None
    before = json.loads(path.read_text()) if path and path.is_file() else {}

    def save(user: dict[str, float]) -> None:
        if path:
            before["as_user"] = user
            write(path, before)

    if "in_process" not in before:
        before["in_process"] = in_process()
        if path:
            write(path, before)
    inside = before["in_process"]
    user = as_user(before.get("as_user", {}), save)
    ratio_in = {k: v / inside["grad"] for k, v in inside.items() if "(" not in k}
    ratio_user = {k: v / user["grad"] for k, v in user.items()}
    print(f"\ncold cost on a user's 100 examples ({OWN}), {os.cpu_count()} CPUs; ratio to `grad`'s in the same run")
    print("| measured | candidate | seconds | / grad |\n|---|---|---|---|")
    for k, r in ratio_in.items():
        print(f"| in process (model loaded) | `{k}` | {inside[k]:.1f} | {r:.2f} |")
    for k, r in ratio_user.items():
        name = "grad +lib" if k == "grad" else k
        print(f"| `sts predict` cold | `{name}` | {user[k]:.1f} | {r:.2f} |")
    if path:
        write(path, before | {"in_process_ratio": ratio_in, "as_user_ratio": ratio_user})


def write(path: Path, data: dict[str, Any]) -> None:
    """The figures so far, whole under a temporary name, then renamed (a rerun measures only what
    the file lacks)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"command": "python benchmarks/content_cost.py " + " ".join(sys.argv[1:]),
                               "cpus": os.cpu_count(), "train": OWN} | data, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
