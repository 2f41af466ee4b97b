"""flowers_fastai: train, export and serve a 5-class flower classifier with fastai, timm and open_clip.

Importing the package imports nothing heavy: `flowers_fastai.models`, `.preprocess` and `.classes` are
fastai-free (the standalone `flowers_classifier` uses them); the training modules import fastai.
"""

__version__ = "0.1.0"
