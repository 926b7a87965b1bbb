"""Wall time of `sts predict` on the embedded default: cold (empty cache: the GGUF is
materialised and every extraction runs) and warm (unchanged inputs: cached extraction),
side by side in one run. Targets on 2 CPU cores: cold <= 600 s, warm <= 20 s.

    python benchmarks/predict_speed.py [extra sts predict arguments]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "sts"


def run(cache: str, out: str, extra: list[str]) -> float:
    env = os.environ | {"STS_CACHE": cache}
    start = time.perf_counter()
    subprocess.run([str(BIN), "predict", "--out", out, *extra], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        cold = run(cache, out, extra)
        warm = run(cache, out, extra)
    print(f"sts predict {' '.join(extra)} (embedded default), {os.cpu_count()} CPUs")
    print(f"cold (empty cache):       {cold:7.1f} s   (target <= 600 s)")
    print(f"warm (unchanged inputs):  {warm:7.1f} s   (target <= 20 s)")
    print(f"warm / cold:              {warm / cold:7.3f}")


if __name__ == "__main__":
    main()
