"""Train a flower classifier: `python train.py --arch cnn|clip [...]`; `--help` lists every option."""

import sys

from flowers_fastai.cli import train

if __name__ == "__main__":
    sys.exit(train())
