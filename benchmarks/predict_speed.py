"""Wall time of `sts predict` on the embedded default: cold (an empty cache: the GGUF is
rebuilt into a checkpoint and every statistic not shipped with the package is computed) and
warm (unchanged inputs: everything read from the cache), side by side in one run, with the
cold run split into stages by the progress lines it prints (each line's first appearance).
Targets on 2 CPU cores: cold <= 240 s, warm <= 20 s.

The demo's own training side (CHAMP's first 100 problems) ships with the package like its
domains, so its cold run computes no statistic. What a user's own training set costs is measured
in the same run: a cold run on CHAMP's next 100 problems (`--train embedded:champ#rows=100:200`,
the same kind of data, nothing of it shipped; skip it with --skip-own).

    python benchmarks/predict_speed.py [--skip-own] [extra sts predict arguments]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "sts"
OWN = "embedded:champ#rows=100:200"  # a training set like the demo's, none of it shipped
# (stage, the progress text that starts it), in the order a cold run prints them
MARKS = [("model rebuild (GGUF)", "GGUF"), ("data and plan", "sts: "), ("model load", "sts: loading"),
         ("training shift", "shift ("), ("training gradients", "training examples (LoRA"),
         ("domain side", "domain "), ("top contexts", "contexts"),
         ("scoring and report", "reused ")]


def run(cache: str, out: str, extra: list[str]) -> tuple[float, dict[str, float], str]:
    """Seconds, the seconds at which each stage first showed, and the plan line."""
    env = os.environ | {"STS_CACHE": cache}
    start = time.perf_counter()
    seen: dict[str, float] = {}
    plan = ""
    proc = subprocess.Popen([str(BIN), "predict", "--out", out, *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    buffer = ""
    # os.read returns what is there as soon as it is there: a buffered read would stamp a line
    # when its buffer filled, not when it was printed
    while chunk := os.read(proc.stderr.fileno(), 4096).decode(errors="replace"):
        buffer += chunk
        *parts, buffer = re.split(r"[\r\n]", buffer)
        for line in parts:
            plan = line if "to compute:" in line or "no model pass" in line else plan
            for stage, mark in MARKS:
                if mark in line and stage not in seen:
                    seen[stage] = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"sts predict failed (exit {proc.returncode})")
    return time.perf_counter() - start, seen, plan


def report(title: str, cold: float, stages: dict[str, float], plan: str) -> None:
    print(title)
    print(f"  plan line: {plan.removeprefix('sts: ')}")
    order = [("start-up (imports)", 0.0)] + sorted(stages.items(), key=lambda kv: kv[1])
    for (stage, at), nxt in zip(order, [t for _, t in order[1:]] + [cold]):
        print(f"    {stage:<20} {nxt - at:7.1f} s")
    print(f"  cold (empty cache):       {cold:7.1f} s")


def main() -> None:
    extra = [a for a in sys.argv[1:] if a != "--skip-own"]
    own = "--skip-own" not in sys.argv[1:] and "--train" not in extra
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        cold, stages, plan = run(cache, out, extra)
        warm, _, warm_plan = run(cache, out, extra)
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        mine = run(cache, out, ["--train", OWN, *extra]) if own else None
    print(f"sts predict {' '.join(extra)} (embedded default), {os.cpu_count()} CPUs")
    report("the demo (its training side and domains shipped):", cold, stages, plan)
    print(f"  target: cold <= 240 s: {'met' if cold <= 240 else 'missed'}")
    print(f"  warm (unchanged inputs):  {warm:7.1f} s   (target <= 20 s); plan line: "
          f"{warm_plan.removeprefix('sts: ')}")
    print(f"  warm / cold:              {warm / cold:7.3f}")
    if mine is not None:
        report(f"your own training set (--train {OWN}: 100 problems, nothing of them shipped):", *mine)
        print(f"  own set cold / demo cold: {mine[0] / cold:7.2f}")


if __name__ == "__main__":
    main()
