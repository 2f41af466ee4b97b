"""Train a flower classifier: `python train.py --arch cnn|clip [...]`; `--help` lists every option."""

import sys

from flowers_fastai.train import main

if __name__ == "__main__":
    sys.exit(main())
