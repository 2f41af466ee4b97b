"""Web demo: `python app.py [--cnn PTH] [--vit PTH] [--host H] [--port P] [--examples DIR]`; `--help` lists
every option. The page and its API live in `flowers_apps.demo` (gradio + flowers_classifier, no fastai)."""

import sys

from flowers_apps.cli import demo

if __name__ == "__main__":
    sys.exit(demo())
