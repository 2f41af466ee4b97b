"""Training presets as data: the one place a run's defaults live. `train.py`'s flags read their defaults
and help text from here, and `learner.Recipe`'s field defaults are the CNN preset.

- "cnn": fine-tune a pretrained ConvNeXt V2: a short linear probe, then discriminative LRs
  (fastai's `lr=slice(lr/lr_mult, lr)`), label smoothing and MixUp.
- "clip": the LP-FT recipe: a linear probe at a high head LR, then a gentle full fine-tune with
  layer-wise LR decay (`llrd`) and milder label smoothing.
- SCRATCH, laid over either with `--no-pretrained`: no frozen stage and one LR for all groups. The short
  from-scratch runs this project makes (tests, bench/accuracy_proxy.py) underfit: without MixUp and label
  smoothing, with crops of at least 60% of the photo (rather than 35%) and lr 2e-3 they ended best in
  bench/RESULTS.md's recipe search, by less than the spread between seeds.
"""

from __future__ import annotations

from .pretrained import CLIP_DEFAULT, CNN_DEFAULT

SHARED = dict(bs=32, wd=0.05, min_scale=0.35, cutmix=0.0, mix_prob=1.0, switch_prob=0.5, grad_clip=1.0,
              patience=3, ema=0.0, seed=42, deterministic=False, precision="auto", lr_mult=100.0, llrd=1.0,
              pct_start=0.25)
PRESETS = {
    "cnn": SHARED | dict(model=CNN_DEFAULT, epochs=5, freeze_epochs=1, head_lr=2e-3, lr=1e-3,
                         label_smoothing=0.1, mixup=0.2),
    "clip": SHARED | dict(model=CLIP_DEFAULT, epochs=3, freeze_epochs=2, head_lr=1e-3, lr=1e-5, llrd=0.75,
                          label_smoothing=0.05, mixup=0.0),
}
SCRATCH = dict(freeze_epochs=0, lr_mult=1.0, llrd=1.0, lr=2e-3, mixup=0.0, label_smoothing=0.0, min_scale=0.6)


def preset(arch: str, pretrained: bool = True) -> dict:
    """The defaults of an `arch` run, from scratch when not `pretrained`."""
    return PRESETS[arch] | ({} if pretrained else SCRATCH)


def describe(key: str) -> str:
    """The defaults of `key` in words for --help, e.g. 'cnn 0.2, clip 0; 0 with --no-pretrained'."""
    cnn, clip = PRESETS["cnn"][key], PRESETS["clip"][key]
    text = f"{cnn:g}" if cnn == clip else f"cnn {cnn:g}, clip {clip:g}"
    if key in SCRATCH and {cnn, clip} != {SCRATCH[key]}:
        text += f"; {SCRATCH[key]:g} with --no-pretrained"
    return f"default: {text}"
