"""The public training API, in fastai's style (`vision_learner`): a few lines from a photo folder to a
trained Learner and a served payload, in a notebook or a script. `train.py` is a CLI over these functions.

    dls = flowers_dataloaders("data/flowers", arch="cnn")         # DataBlock, seeded split, audit, eval crop
    learn = flowers_learner(dls)                                   # our model, splitter, loss, metrics, callbacks
    learn.lr_find(); learn.fine_tune(5, 1e-3)                      # fastai's own methods, through our splitter
    export_pth(learn, "models/cnn_flowers.pth")                    # the payload export.py writes, calibrated

`learn.fine_tune(epochs, base_lr)` is fastai's schedule: one frozen epoch at base_lr (pct_start=0.99), then
base_lr is halved and every group trains at `slice(base_lr/2/100, base_lr/2)` (fastai's lr_mult=100, also for
clip, where our LLRD is not used). `fine_tune_recipe(learn)` runs our recipe instead, as train.py does
(head_lr, lr_mult or llrd, pct_start, unfreeze_last, early stopping per stage).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from torch import nn

from flowers_classifier import factory
from flowers_classifier.classes import CLASSES
from flowers_classifier.files import atomic_write
from flowers_classifier.payload import FAMILIES, make_payload
from flowers_classifier.preprocess import Preprocess

from . import splitters
from .audit import AUDIT_MIN_SIZE
from .calibration import fit_payload_temperature
from .data import TEST_PCT, VALID_PCT, RGBImage, make_dataloaders, prepare_split
from .learner import Recipe, build_learner, fine_tune
from .pretrained import (
    CLIP_DEFAULT,
    CLIP_DEFAULT_TAG,
    check_cnn_pretrained,
    cnn_pretrained_tag,
    create_clip,
    create_cnn,
    is_weights_file,
)
from .recipes import SHARED, preset

DROP_PATH_PRETRAINED = 0.1  # stochastic depth when fine-tuning pretrained ConvNeXt weights (none from scratch)


def default_run_dir(arch: str) -> Path:
    """runs/<arch>-<time>: where a run writes when no folder is given (train.py --out, run_dir=)."""
    return Path("runs") / f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def cnn_drop_path(pretrained: bool) -> float:
    """The ConvNeXt's drop-path rate: DROP_PATH_PRETRAINED when fine-tuning pretrained weights, 0 from scratch
    (also what --resume rebuilds, so a resumed run regularises as it did)."""
    return DROP_PATH_PRETRAINED if pretrained else 0.0


def check_min_scale(value: float, flag: str) -> float:
    """RandomResizedCrop's smallest crop must be a fraction of the image area; `flag` names the option."""
    if not 0 < value <= 1:
        raise ValueError(f"{flag}{value}: the smallest crop is a fraction of the image area, in (0, 1].")
    return value


def _check_arch(arch: str) -> str:
    if arch not in FAMILIES:
        raise ValueError(f"arch={arch!r}: use 'cnn' (timm ConvNeXt V2) or 'clip' (OpenCLIP image encoder).")
    return arch


def _weights_source(arch: str, pretrained: bool | str | os.PathLike | None, tag: str) -> str | Path | None:
    """pretrained=True -> the hub ("hub" for timm, the open_clip `tag`), False/None -> random init, a path -> the
    weights file."""
    if pretrained is True:
        return "hub" if arch == "cnn" else tag
    if pretrained is False or pretrained is None:
        return None
    return pretrained  # a weights file (for clip, a str without a suffix that is no file is an open_clip tag)


def _clip_preprocess_by_name(name: str, img_size: int | None, source) -> Preprocess:
    """CLIP's eval preprocessing from open_clip's configs, without building the model (open_clip cannot build
    on the meta device): the model config's size, the tag's mean/std where it has them."""
    import open_clip
    from open_clip.transform import PreprocessCfg
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"model={name!r}: not an open_clip model name; see open_clip.list_models() (e.g. "
                         f"{CLIP_DEFAULT}, ViT-B-32).")
    cfg = asdict(PreprocessCfg()) | {"size": model_cfg["vision_cfg"]["image_size"]}
    cfg |= model_cfg.get("preprocess_cfg", {})
    if isinstance(source, str) and not is_weights_file(source):
        tag_cfg = open_clip.get_pretrained_cfg(name, source)
        cfg |= {k: tag_cfg[k] for k in ("mean", "std", "interpolation") if tag_cfg.get(k)}
    size = img_size or (cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0])
    return Preprocess(image_size=int(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      interpolation=cfg.get("interpolation", "bicubic"), crop_pct=1.0)


def preprocess_by_name(arch: str, name: str, img_size: int | None = None, pretrained=True,
                       tag: str = CLIP_DEFAULT_TAG) -> Preprocess:
    """The eval preprocessing of the model `flowers_learner` will build, read from configs (no weights)."""
    source = _weights_source(arch, pretrained, tag)
    if arch == "clip":
        return _clip_preprocess_by_name(name, img_size, source)
    import timm
    check_cnn_pretrained(name, None)  # an unknown name fails here, naming valid ones
    timm_name = f"{name}.{cnn_pretrained_tag(name)}" if source == "hub" else name  # the tag's input size
    with torch.device("meta"):  # the config without allocating weights
        return factory.cnn_preprocess(timm.create_model(timm_name, pretrained=False), img_size)


def _model_name(model: nn.Module | None) -> str | None:
    """The timm / open_clip name of a built model: create_model records it; timm models carry their own."""
    if model is None:
        return None
    return getattr(model, "flowers_name", None) or getattr(model, "pretrained_cfg", {}).get("architecture")


def flowers_dataloaders(path: str | Path = "data/flowers", arch: str = "cnn", model: str | nn.Module | None = None,
                        img_size: int | None = None, bs: int | None = None, seed: int = SHARED["seed"],
                        valid_pct: float = VALID_PCT, max_per_class: int | None = None, min_scale: float | None = None,
                        pretrained: bool | str | os.PathLike = True, num_workers: int | None = None,
                        run_dir: str | Path | None = None, split: pd.DataFrame | None = None,
                        test_pct: float = TEST_PCT) -> DataLoaders:
    """fastai DataLoaders over `path` (<class>/<images>): the data checks and audit, the seeded stratified split
    (split.csv + audit.json in `run_dir`, default runs/<arch>-<time>; copies of one photo on one side),
    RandomResizedCrop + aug_transforms for training and the serving-time resize/center crop for validation.
    `test_pct` > 0 also holds out a stratified test split, recorded in split.csv but in neither DataLoader:
    nothing trains, picks an epoch or fits the temperature on it (evaluate.evaluate_run measures it).

    The preprocessing (size, mean/std, crop) is the model's: `model` is a timm (cnn) / open_clip (clip) name
    (default: the arch's), read from configs, or an already built model. `pretrained` matters only where it
    changes them (timm's pretrained tag, CLIP's tag mean/std). Defaults of bs and min_scale are the arch's
    preset (recipes.py; from scratch with pretrained=False). MixUp/CutMix are Learner callbacks: pass
    `mixup=` to flowers_learner. `split`: an existing split table instead of scanning `path`.
    Stores what flowers_learner needs as `dls.flowers`."""
    arch = _check_arch(arch)
    defaults = preset(arch, pretrained=pretrained is not False and pretrained is not None)
    name = model if isinstance(model, str) else _model_name(model) or defaults["model"]
    prep = factory.preprocess_for(model, img_size) if isinstance(model, nn.Module) else \
        preprocess_by_name(arch, name, img_size, pretrained)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(arch)
    run_dir.mkdir(parents=True, exist_ok=True)
    min_scale = check_min_scale(defaults["min_scale"] if min_scale is None else min_scale, "min_scale=")
    if split is None:
        split = prepare_split(path, run_dir, valid_pct, seed, max_per_class, min_size=img_size or AUDIT_MIN_SIZE,
                              test_pct=test_pct)
    RGBImage.failure_log = run_dir / "skipped.csv"  # files that break after the check are reported there
    workers = num_workers if num_workers is not None else (8 if torch.cuda.is_available() else 0)
    dls = make_dataloaders(split, path, prep, bs=bs or defaults["bs"], num_workers=workers, min_scale=min_scale)
    dls.flowers = dict(arch=arch, model=name, img_size=img_size, prep=prep, run_dir=run_dir, data=Path(path),
                       split=split, min_scale=min_scale, bs=bs or defaults["bs"])
    return dls


def create_model(arch: str, name: str, pretrained=True, img_size: int | None = None,
                 head_init: str | None = None, tag: str = CLIP_DEFAULT_TAG,
                 grad_checkpointing: bool = False) -> nn.Module:
    """The model of a run: a timm ConvNeXt V2 (drop-path 0.1 when fine-tuning pretrained weights) or an OpenCLIP
    image encoder with a linear head (zero-shot init from pretrained weights, random otherwise)."""
    source = _weights_source(arch, pretrained, tag)
    if arch == "cnn":
        model = create_cnn(name, pretrained=source, drop_path_rate=cnn_drop_path(source is not None))
    else:
        if head_init is None:
            head_init = "random" if source is None else "zeroshot"
        model = create_clip(name, pretrained=source, image_size=img_size, head_init=head_init)
        if grad_checkpointing:
            model.visual.set_grad_checkpointing(True)
    model.flowers_name = name  # what the export's spec and the DataLoaders' check call it
    return model


def make_recipe(arch: str, n_groups: int, pretrained: bool = True, **overrides) -> Recipe:
    """The arch's preset (recipes.py; from scratch unless `pretrained`) with `overrides` (Recipe fields, and
    `llrd` for clip: stage 2 LR of group g is lr * llrd**(groups-1-g), i.e. fastai's slice(lr / lr_mult, lr))."""
    defaults = preset(arch, pretrained)
    names = {f.name for f in fields(Recipe)}
    unknown = set(overrides) - names - {"llrd"}
    if unknown:
        raise TypeError(f"flowers_learner: unknown recipe option(s) {sorted(unknown)}; "
                        f"the options are {sorted(names | {'llrd'})}.")
    if arch == "clip" and "lr_mult" in overrides:
        raise ValueError("lr_mult is the cnn's discriminative LR spread; for clip pass llrd (layer-wise LR decay).")
    if arch == "cnn" and overrides.get("llrd") not in (None, defaults["llrd"]):
        raise ValueError("llrd (layer-wise LR decay) is for clip; for cnn pass lr_mult.")
    values = {k: defaults[k] for k in names if k in defaults} | {"ema_decay": defaults["ema"] or None}
    llrd = overrides.pop("llrd", None) or defaults["llrd"]
    if not 0 < llrd <= 1:
        raise ValueError(f"llrd={llrd}: the decay must be in (0, 1]; 1 means one LR for all groups.")
    values |= overrides
    if arch == "clip":
        values["lr_mult"] = llrd ** -(n_groups - 1)  # fastai's slice(lr / lr_mult, lr) is then exactly the LLRD
    return Recipe(**values)


def flowers_learner(dls: DataLoaders, arch: str | None = None, model: str | nn.Module | None = None,
                    pretrained: bool | str | os.PathLike = True, head_init: str | None = None,
                    tag: str = CLIP_DEFAULT_TAG, recipe: Recipe | None = None, tensorboard: bool = False,
                    grad_checkpointing: bool = False, **overrides) -> Learner:
    """A fastai Learner on `dls` (from flowers_dataloaders) with our model, splitter (one group per ConvNeXt
    stage / CLIP block), label-smoothed loss, AdamW, accuracy and callbacks (best checkpoint, history.csv,
    early stopping, MixUp/CutMix, gradient clipping, EMA, mixed precision: precision='bf16' on CUDA or the
    CPU, 'fp16' on CUDA), writing to dls' run folder.

    model: a name (default: the one dls was built for) or a built model. pretrained: True (the hub / open_clip
    `tag`), False (random init, the CLI's --no-pretrained, with the from-scratch preset) or a weights file.
    `**overrides`: Recipe fields (epochs, lr, mixup, ...; llrd for clip), else the arch's preset; or a whole
    `recipe`. The Recipe is kept as `learn.recipe` (fine_tune_recipe(learn) runs its two stages)."""
    info = getattr(dls, "flowers", None)
    if info is None:
        raise TypeError("flowers_learner needs DataLoaders from flowers_dataloaders(...) (they carry the split, "
                        "the run folder and the preprocessing the model must match).")
    arch = _check_arch(arch or info["arch"])
    if arch != info["arch"]:
        raise ValueError(f"arch={arch!r} but the DataLoaders were made for arch={info['arch']!r}; "
                         f"call flowers_dataloaders(..., arch={arch!r}).")
    if not isinstance(model, nn.Module):
        name = model or info["model"]
        if name != info["model"]:
            raise ValueError(f"model={name!r} but the DataLoaders were made for {info['model']!r} (its image "
                             f"size and normalisation); call flowers_dataloaders(..., model={name!r}).")
        model = create_model(arch, name, pretrained, info["img_size"], head_init, tag, grad_checkpointing)
    prep = factory.preprocess_for(model, info["img_size"])
    if prep != info["prep"]:
        raise ValueError(f"the model's preprocessing {prep} differs from the DataLoaders' {info['prep']}; build "
                         f"the DataLoaders with flowers_dataloaders(..., model=<this model>).")
    if recipe is not None and overrides:
        raise TypeError(f"pass either recipe= or recipe options ({sorted(overrides)}), not both.")
    n_groups = len(splitters.param_groups(model))
    recipe = recipe or make_recipe(arch, n_groups, pretrained is not False and pretrained is not None, **overrides)
    learn = build_learner(dls, model, recipe, info["run_dir"], tensorboard=tensorboard)
    learn.recipe = recipe
    learn.flowers = dict(info, arch=arch, model=_model_name(model) or info["model"], prep=prep,
                         n_groups=n_groups)
    return learn


def fine_tune_recipe(learn: Learner) -> Learner:
    """The recipe's two stages (what train.py runs): the head alone at head_lr for freeze_epochs, then the body
    too with discriminative LRs for epochs; best weights loaded at the end."""
    return fine_tune(learn, learn.recipe)


def learner_spec(learn: Learner) -> dict:
    """Plain metadata that rebuilds the learner's architecture offline (factory.build_from_spec)."""
    info = getattr(learn, "flowers", None)
    if info is None:
        raise TypeError("export_pth needs a Learner from flowers_learner(...) (it knows the model's name and "
                        "preprocessing); for a train.py run folder use export.py RUN_DIR.")
    spec = dict(family=info["arch"], model_name=info["model"], classes=list(CLASSES), **info["prep"].to_dict())
    if info["arch"] == "clip":
        spec["quick_gelu"] = learn.model.quick_gelu
    return spec


def export_pth(learn: Learner, path: str | Path, half: bool | None = None, calibrate: bool = True) -> Path:
    """Write the learner's weights as the payload export.py writes (fp16 storage by default for clip), calibrated
    on the valid split unless `calibrate` is False. After a fit these are the best weights on valid accuracy
    (EMA ones with ema_decay): the checkpoint callback loads them back when every fit ends."""
    spec = learner_spec(learn)
    half = spec["family"] == "clip" if half is None else half
    state_dict = {k: v.detach().to("cpu", copy=True) for k, v in learn.model.state_dict().items()}
    payload = make_payload(spec, state_dict, half)
    if calibrate:
        info = learn.flowers
        valid = info["split"][info["split"]["is_valid"]].reset_index(drop=True)
        payload = make_payload(spec, state_dict, half,
                               fit_payload_temperature(payload, info["data"], valid, info["bs"])["temperature"])
    return atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))
