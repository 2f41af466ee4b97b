"""`python -m flowers_fastai COMMAND ...` (train, export, evaluate, data, experiments, wheelhouse)."""

import sys

from .cli import main

sys.exit(main())
