"""The experiment matrix runner; now the ``pocl matrix`` command (``pocl.experiments``, docs/experiments.md).

    pocl matrix examples/experiments/smollm2_dolly.yaml --dry-run
    python examples/experiments/run_matrix.py examples/experiments/smollm2_dolly.yaml --dry-run   # the same

This script stays so that existing command lines keep working: same flags, output folders and results.
"""

import sys

import pocl.cli
from pocl.experiments import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], pocl_main=pocl.cli.main))  # pocl.cli.main: for --in-process
