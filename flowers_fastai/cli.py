"""Console entry points (`flowers-train`, `flowers-export`, `flowers-demo`, `flowers-data`, `flowers-evaluate`,
`flowers-experiments`;
train.py, export.py and app.py call them too).
Each keeps third-party deprecation noise out of the output *before* importing its command: importing
fastai itself warns, so the filter must come first. Only `flowers_classifier` is imported up front."""

from __future__ import annotations

from flowers_classifier.cli import quiet_third_party_warnings


def train(argv: list[str] | None = None) -> int:
    quiet_third_party_warnings()
    from .train import main
    return main(argv)


def export(argv: list[str] | None = None) -> int:
    quiet_third_party_warnings()
    from .export import main
    return main(argv)


def demo(argv: list[str] | None = None) -> int:
    quiet_third_party_warnings()
    from .demo import main
    return main(argv)


def data(argv: list[str] | None = None) -> int:
    quiet_third_party_warnings()
    from .data import main
    return main(argv)


def evaluate(argv: list[str] | None = None) -> int:
    quiet_third_party_warnings()
    from .evaluate import main
    return main(argv)


def experiments(argv: list[str] | None = None) -> int:
    quiet_third_party_warnings()
    from .experiments import main
    return main(argv)
