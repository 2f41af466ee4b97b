"""flowers_fastai: train, evaluate and export a 5-class flower classifier with fastai, on top of the
`flowers_classifier` runtime (which it imports; never the other way round).

The public training API, fastai style: `flowers_dataloaders`, `flowers_learner`, `fine_tune_recipe`, `export_pth`
(from `flowers_fastai.api`). The command lines are in `flowers_fastai.cli`.
"""

import warnings

# fastai calls torch.jit.script while it is imported, which torch now deprecates: a notice for fastai's
# developers that our users can do nothing about. Silenced for that import only.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    from .api import export_pth, fine_tune_recipe, flowers_dataloaders, flowers_learner

__all__ = ["flowers_dataloaders", "flowers_learner", "fine_tune_recipe", "export_pth"]
