"""``python -m pocl`` (also ``accelerate launch -m pocl``)."""

import sys

from pocl.cli import main

sys.exit(main())
