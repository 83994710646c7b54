"""`python -m leantune ...`, the entry torchrun starts: `torchrun --nproc-per-node 2 -m leantune train my.yaml`."""

import sys

from .cli.main import main

sys.exit(main())
