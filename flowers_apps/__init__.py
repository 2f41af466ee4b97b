"""flowers_apps: what serves an exported model to people and programs (the Gradio demo; app.py is its CLI).

The third layer: apps use `flowers_classifier`'s public API only, never the trainer `flowers_fastai`, so they
install and run without fastai (`pip install "flowers-fastai[demo]"`). Nothing is imported here: each app
needs its own extra (gradio for `flowers_apps.demo`).
"""
