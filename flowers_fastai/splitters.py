"""Splitters: how each model family falls into fastai parameter groups (body groups from the input
upwards, the head last), and which groups each fine-tuning stage trains. The one place that rule lives:
`learner.fine_tune`, lr_find and the sanity checks all go through `stage_start`."""

from __future__ import annotations

import fnmatch

from torch import nn

from flowers_classifier.model import ClipClassifier


def cnn_param_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """[stem], [stage 0], ..., [stage 3], [norm_pre + head]: body groups first, head last."""
    groups = [list(model.stem.parameters())] + [list(s.parameters()) for s in model.stages]
    return groups + [list(model.norm_pre.parameters()) + list(model.head.parameters())]


def clip_param_groups(model: ClipClassifier) -> list[list[nn.Parameter]]:
    """[patch embedding + class/positional embeddings + ln_pre], one group per transformer block,
    [ln_post + projection (+ anything else in the tower)], [head]."""
    v = model.visual
    if not hasattr(getattr(v, "transformer", None), "resblocks"):
        raise ValueError(f"the image tower of this --model is a {type(v).__name__}, not an open_clip "
                         f"VisionTransformer; the CLIP splitter supports the ViT-* models (e.g. ViT-L-14).")
    blocks = list(v.transformer.resblocks)
    stem = [p for name, p in v.named_parameters() if name.split(".")[0] in
            ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_embed")]
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    taken = {id(p) for p in stem} | block_ids
    top = [p for p in v.parameters() if id(p) not in taken]
    return [stem] + [list(b.parameters()) for b in blocks] + [top, list(model.head.parameters())]


def unfreeze_index(model: nn.Module, last_k: int) -> int:
    """fastai `freeze_to` index that trains the last `last_k` blocks (clip: transformer blocks, cnn:
    stages) and every group above them: clip [ln_post + proj] and [head], cnn [norm_pre + head]."""
    top = 2 if isinstance(model, ClipClassifier) else 1
    n_blocks = len(param_groups(model)) - top - 1  # minus the stem group
    if not 1 <= last_k <= n_blocks:
        raise ValueError(f"--unfreeze-last {last_k}: the model has {n_blocks} blocks, so give 1..{n_blocks} "
                         f"(or leave the flag out to fine-tune the whole body).")
    return -(last_k + top)


def param_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The splitter for either family: body groups from the input upwards, the head last."""
    return clip_param_groups(model) if isinstance(model, ClipClassifier) else cnn_param_groups(model)


STAGES = ("frozen", "unfrozen")  # the linear probe (head only), then the fine-tune of the body too


def stage_start(model: nn.Module, stage: str, unfreeze_last: int | None = None) -> int:
    """The fastai `freeze_to` index of a stage: "frozen" trains the head group alone (-1, fastai's
    `freeze()`); "unfrozen" every group (0, `unfreeze()`), or with `unfreeze_last` only the last K
    blocks and everything above them."""
    if stage == "frozen":
        return -1
    if stage == "unfrozen":
        return 0 if unfreeze_last is None else unfreeze_index(model, unfreeze_last)
    raise ValueError(f"--lr-find-stage must be one of {', '.join(STAGES)}, not {stage!r}")


def no_weight_decay(model: nn.Module) -> list[nn.Parameter]:
    """The parameters AdamW must not decay, by timm's rule (timm.optim.param_groups_weight_decay): every 1-D
    one (norms, biases, attention's in_proj_bias, GRN's gamma and beta, CLIP's class embedding) and those a
    module names in its `no_weight_decay()` (open_clip's ViT: the positional embedding), prefixed by where the
    module sits, as open_clip's CLIP forwards its tower's. A scale, shift or embedding has no size worth
    shrinking: decay would only pull it off its pretrained value. Frozen ones count too (a later stage
    unfreezes them)."""
    names = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return [p for name, p in model.named_parameters()
            if p.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, n) for n in names)]
