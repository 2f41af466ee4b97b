"""flowers_fastai: train, evaluate and export a 5-class flower classifier with fastai, on top of the
`flowers_classifier` runtime (which it imports; never the other way round).

Importing the package imports nothing heavy: `flowers_fastai.demo` needs gradio and the runtime only,
the training modules import fastai. The public training API (`flowers_dataloaders`, `flowers_learner`,
`export_pth`, from `flowers_fastai.api`) is re-exported lazily, on first use.
"""

_API = ("flowers_dataloaders", "flowers_learner", "export_pth", "fine_tune_recipe")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:  # imported here, not at package import: `flowers_fastai.demo` must stay fastai-free
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'flowers_fastai' has no attribute {name!r}")
