"""flowers_fastai: train, evaluate and export a 5-class flower classifier with fastai, on top of the
`flowers_classifier` runtime (which it imports; never the other way round).

Importing the package imports nothing heavy: `flowers_fastai.demo` needs gradio and the runtime only,
the training modules import fastai.
"""
