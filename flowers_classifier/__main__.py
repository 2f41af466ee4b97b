"""`python -m flowers_classifier`: see `flowers_classifier.cli`."""

import sys

from .cli import main

sys.exit(main())
