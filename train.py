"""Train a flower classifier: `python train.py --arch cnn|clip [...]`; `--help` lists every option."""

import sys

from flowers_fastai.cli import quiet_third_party_warnings

quiet_third_party_warnings()  # before the import below: importing fastai itself warns
from flowers_fastai.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
