"""Wall time of `sts predict` on the embedded default: cold (an empty cache: the GGUF is
rebuilt into a checkpoint and every statistic not shipped with the package is computed) and
warm (unchanged inputs: everything read from the cache), side by side in one run, with the
cold run split into stages by the progress lines it prints (each line's first appearance).
Targets on 2 CPU cores: cold <= 240 s, warm <= 20 s.

    python benchmarks/predict_speed.py [extra sts predict arguments]
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


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        cold, stages, plan = run(cache, out, extra)
        warm, _, warm_plan = run(cache, out, extra)
    print(f"sts predict {' '.join(extra)} (embedded default), {os.cpu_count()} CPUs")
    print(f"cold plan line: {plan.removeprefix('sts: ')}")
    order = [("start-up (imports)", 0.0)] + sorted(stages.items(), key=lambda kv: kv[1])
    for (stage, at), nxt in zip(order, [t for _, t in order[1:]] + [cold]):
        print(f"  {stage:<20} {nxt - at:7.1f} s")
    print(f"cold (empty cache):       {cold:7.1f} s   (target <= 240 s)")
    print(f"warm (unchanged inputs):  {warm:7.1f} s   (target <= 20 s); plan line: {warm_plan.removeprefix('sts: ')}")
    print(f"warm / cold:              {warm / cold:7.3f}")


if __name__ == "__main__":
    main()
