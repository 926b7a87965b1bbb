"""`python -m sts` runs the command line, as `python -m lm_eval` does: the form torchrun takes
(`torchrun --nproc-per-node N -m sts predict ...`)."""

import sys

from sts.cli import main

if __name__ == "__main__":
    sys.exit(main())
