"""What every command-line entry point shares: keeping third-party warning noise out of its output.

Only the entry points call this (train.py, export.py, app.py, flowers_classifier.py and the `python -m
flowers_fastai.data|evaluate` modules), never the library on import: code that imports flowers_fastai
keeps Python's own warning filters. fastai-free and import-light, so flowers_classifier may use it.
"""

from __future__ import annotations

import sys
import warnings

# Deprecation notices from torch, timm, fastai, pandas, numpy and gradio are meant for the developers
# of those libraries (e.g. "`torch.jit.script` is deprecated", emitted while fastai is imported); a
# user of our CLIs can do nothing about them. Our own code issues neither category.
NOISE_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# UserWarnings with the same nature: about how a library is used internally, not about the user's input.
NOISE_MESSAGES = (".*mode.chained_assignment.*", ".*load_learner.*insecure pickle.*",
                  ".*copy keyword is deprecated.*")


def quiet_third_party_warnings() -> None:
    """Hide third-party deprecation noise for this process. Python's -W flag or PYTHONWARNINGS (both
    land in sys.warnoptions) turn this off, so a developer can still see every warning."""
    if sys.warnoptions:
        return
    for category in NOISE_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    for message in NOISE_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
