"""Console entry points (`flowers-train`, `flowers-export`, `flowers-demo`, `flowers-data`, `flowers-evaluate`,
`flowers-experiments`, `flowers-wheelhouse`; train.py, export.py and app.py call them too).

Each keeps third-party deprecation noise out of the output *before* importing its command: importing
fastai itself warns, so the filter must come first. Only `flowers_classifier` is imported up front."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from flowers_classifier.cli import quiet_third_party_warnings


def _command(module: str) -> Callable[[list[str] | None], int]:
    """The `main(argv)` of flowers_fastai.<module>, imported only once the warning filter is in place."""

    def run(argv: list[str] | None = None) -> int:
        quiet_third_party_warnings()
        return importlib.import_module(f"flowers_fastai.{module}").main(argv)

    run.__name__ = module
    return run


COMMANDS = ("train", "export", "demo", "data", "evaluate", "experiments", "wheelhouse")
train, export, demo, data, evaluate, experiments, wheelhouse = map(_command, COMMANDS)
