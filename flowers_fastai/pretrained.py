"""Where a trained model's starting weights come from: timm's hub weights, an open_clip tag, a local file, or
none (random init), and CLIP's zero-shot head (the text embeddings of the class prompts).

Training concerns, kept out of the runtime: `flowers_classifier.factory` builds the architecture a payload
names, randomly initialised, and the payload's weights are loaded next; this module builds the same
architectures from pretrained weights. Without a network and without cached weights the hub path fails fast
with a message naming `--weights` and `--no-pretrained`; it never falls back to random init on its own.
Pure torch/timm/open_clip (no fastai).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowers_classifier import factory
from flowers_classifier.classes import CLASSES
from flowers_classifier.errors import FlowersError
from flowers_classifier.hub import hub_reachable
from flowers_classifier.model import ClipClassifier, use_fast_grn

CNN_DEFAULT = "convnextv2_tiny"
CLIP_DEFAULT = "ViT-L-14"
CLIP_DEFAULT_TAG = "openai"
CNN_PREFERRED_TAGS = ("fcmae_ft_in22k_in1k", "fcmae_ft_in1k")  # ImageNet-22k fine-tuned where timm has it
CLIP_TEMPLATES = ("a photo of a {}, a type of flower.", "a close-up photo of a {}, a type of flower.",
                  "a cropped photo of a {}.", "a bright photo of a {}.", "a photo of the {}.")

OFFLINE_HINT = ("Pass --weights FILE to load a local weights file, or --no-pretrained to train "
                "from random init.")


class PretrainedWeightsUnavailable(FlowersError, RuntimeError):
    """Pretrained weights were asked for but can be neither downloaded nor found in the cache."""


class WeightsFileError(FlowersError, ValueError):
    """A local weights file is missing, unreadable or does not fit the architecture."""


# --------------------------------------------------------------------------- the hub

def _cached_in_hub(repo_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def _require_hub(repo_id: str, filenames: tuple[str, ...], what: str) -> None:
    """Make sure `repo_id` can be had: cached (then stay offline) or the hub answers; else raise."""
    if _cached_in_hub(repo_id, filenames):
        if not hub_reachable():
            from huggingface_hub import constants
            constants.HF_HUB_OFFLINE = True  # use the cache without a retry loop against a dead network
        return
    if not hub_reachable():
        raise PretrainedWeightsUnavailable(
            f"Cannot download pretrained weights for {what} (hub repo {repo_id!r}): the Hugging Face hub "
            f"is not reachable and the weights are not in the local cache. {OFFLINE_HINT}")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch state dict (plain, or under 'state_dict'/'model')."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure is the same user error
        raise WeightsFileError(f"--weights {path}: cannot read weights ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsFileError(f"--weights {path}: expected a state dict of tensors")
    return sd


# --------------------------------------------------------------------------- CNN: timm ConvNeXt V2

def cnn_pretrained_tag(model_name: str) -> str:
    """The timm tag we fine-tune from: ImageNet-22k fine-tuned where timm has one, else its default."""
    import timm
    tags = {name.split(".", 1)[1] for name in timm.list_pretrained(f"{model_name}.*")}
    for tag in CNN_PREFERRED_TAGS:
        if tag in tags:
            return tag
    if not tags:
        raise PretrainedWeightsUnavailable(f"timm has no pretrained weights for {model_name!r}. {OFFLINE_HINT}")
    return sorted(tags)[0]


def _load_backbone(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, head_prefix: str) -> None:
    """Load every backbone tensor strictly; the classifier may be dropped (other class count)."""
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.startswith(head_prefix) and k in own and v.shape != own[k].shape)}
    hint = "is it a backbone of the model given by --model?"
    shapes = [k for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if shapes:
        k = shapes[0]
        raise WeightsFileError(f"--weights {path}: tensor shapes do not match {type(model).__name__} "
                               f"(e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}); {hint}")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    if missing or result.unexpected_keys:
        raise WeightsFileError(
            f"--weights {path}: does not match {type(model).__name__} "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}); {hint}")


def check_cnn_pretrained(model_name: str, pretrained: str | os.PathLike | None) -> str:
    """Fail fast, before anything is built or downloaded (train.py calls it before its data scan): an
    unknown timm name, a missing --weights file, or hub weights neither cached nor downloadable. Returns
    the timm name to build: with its pretrained tag for "hub", else `model_name`."""
    import timm
    if not timm.is_model(model_name):
        raise ValueError(f"--model {model_name}: not a timm model name; use one of timm.list_models(), "
                         f"e.g. {CNN_DEFAULT}, convnextv2_nano, convnextv2_atto.")
    if pretrained is None:
        return model_name
    if pretrained != "hub":
        if not Path(pretrained).is_file():
            raise WeightsFileError(f"--weights {pretrained}: no such file (expected a timm state dict or "
                                   f".safetensors of {model_name}).")
        return model_name
    name = f"{model_name}.{cnn_pretrained_tag(model_name)}"
    _require_hub(timm.models.get_pretrained_cfg(name).hf_hub_id, ("model.safetensors", "pytorch_model.bin"), name)
    return name


def create_cnn(model_name: str = CNN_DEFAULT, pretrained: str | os.PathLike | None = "hub",
               num_classes: int = len(CLASSES), drop_path_rate: float = 0.0, fast_grn: bool = True) -> nn.Module:
    """A timm ConvNeXt V2 with a new `Linear(in_features, num_classes)` head.

    pretrained: "hub" for timm's hub weights, a path to a local backbone file, or None for random init.
    fast_grn: swap timm's GlobalResponseNorm for FastGlobalResponseNorm (same function, fewer passes).
    """
    import timm
    name = check_cnn_pretrained(model_name, pretrained)
    if pretrained == "hub":
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, drop_path_rate=drop_path_rate)
    else:
        model = factory.create_cnn(name, num_classes=num_classes, drop_path_rate=drop_path_rate, fast_grn=False)
        if pretrained is not None:
            path = Path(pretrained)
            _load_backbone(model, read_state_dict(path), path, head_prefix=model.pretrained_cfg["classifier"])
    return use_fast_grn(model) if fast_grn else model


# --------------------------------------------------------------------------- CLIP: OpenCLIP image encoder

def is_weights_file(pretrained: str | os.PathLike) -> bool:
    """A path (given as such, with a suffix, or existing) rather than an open_clip tag like "openai"."""
    return isinstance(pretrained, os.PathLike) or bool(Path(pretrained).suffix) or Path(pretrained).exists()


def check_clip_pretrained(model_name: str, pretrained: str | os.PathLike | None) -> dict:
    """Fail fast, before anything is built or downloaded, when `pretrained` cannot be had: a missing
    file, an unknown tag, or a tag whose weights are neither cached nor downloadable. Returns the tag's
    open_clip config ({} for a file or random init)."""
    import open_clip
    if ":" not in model_name and model_name not in open_clip.list_models():  # "hf-hub:..." names pass
        raise ValueError(f"--model {model_name}: not an open_clip model name; use one of open_clip.list_models(), "
                         f"e.g. {CLIP_DEFAULT}, ViT-L-14-336, ViT-B-16.")
    if pretrained is None:
        return {}
    if is_weights_file(pretrained):
        if not Path(pretrained).is_file():
            raise WeightsFileError(f"--weights {pretrained}: no such file (expected an open_clip checkpoint "
                                   f"of {model_name}).")
        return {}
    tag_cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained))
    if not tag_cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise PretrainedWeightsUnavailable(
            f"open_clip has no pretrained tag {pretrained!r} for --model {model_name!r} "
            f"(known: {', '.join(known) or 'none'}). Use --pretrained-tag with one of those, or: {OFFLINE_HINT}")
    if tag_cfg.get("hf_hub"):
        # "org/repo/" means open_clip's default file names; "org/repo/file.bin" names the file.
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        files = (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        _require_hub(repo, files, f"{model_name}/{pretrained}")
    return tag_cfg


def create_clip(model_name: str = CLIP_DEFAULT, pretrained: str | os.PathLike | None = CLIP_DEFAULT_TAG,
                num_classes: int = len(CLASSES), image_size: int | None = None, head_init: str = "zeroshot",
                classes: tuple[str, ...] = CLASSES, quick_gelu: bool | None = None) -> ClipClassifier:
    """The OpenCLIP image tower of `model_name` with a linear head; the text tower is dropped once the
    zero-shot head is built.

    pretrained: an open_clip tag ("openai", a LAION/DataComp tag), a local open_clip checkpoint file
    (a str with a suffix, or any os.PathLike), or None for random init. head_init: "zeroshot" (text
    embeddings of the class prompts times CLIP's logit scale) or "random". quick_gelu: None takes it
    from the tag (OpenAI's weights were trained with QuickGELU; a GELU model would silently degrade them).
    """
    import open_clip
    if head_init not in ("zeroshot", "random"):
        raise ValueError(f"--head-init must be 'zeroshot' or 'random', not {head_init!r}")
    tag_cfg = check_clip_pretrained(model_name, pretrained)
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    source = None if pretrained is None else str(pretrained)
    try:
        clip = open_clip.create_model(model_name, pretrained=source, force_image_size=image_size,
                                      force_quick_gelu=quick_gelu)
    except Exception as e:  # noqa: BLE001 - any failure to read a local file is the same user error
        if source and not tag_cfg:
            raise WeightsFileError(f"--weights {source}: not an open_clip checkpoint of {model_name} "
                                   f"({type(e).__name__}: {str(e)[:300]}). Check --model.") from e
        if source:  # a tag: the download (or the cached file) failed after the hub check passed
            raise PretrainedWeightsUnavailable(f"open_clip weights {model_name}/{source} could not be loaded "
                                               f"({type(e).__name__}: {str(e)[:300]}). {OFFLINE_HINT}") from e
        raise
    model = ClipClassifier(clip.visual, num_classes, quick_gelu)
    if head_init == "zeroshot":
        with torch.no_grad():
            model.head.weight.copy_(zero_shot_weights(clip, open_clip.get_tokenizer(model_name), classes))
            model.head.bias.zero_()
    del clip  # the text tower (and logit scale) are not needed any more: only the image tower stays alive
    return model


@torch.no_grad()
def zero_shot_weights(clip: nn.Module, tokenizer, classes: tuple[str, ...],
                      templates: tuple[str, ...] = CLIP_TEMPLATES) -> torch.Tensor:
    """(num_classes, embed_dim): per class, the mean of the normalised prompt embeddings, renormalised,
    times CLIP's logit scale, so `head(normalise(image_features))` equals CLIP's zero-shot logits."""
    clip.eval()
    rows = []
    for label in classes:
        emb = F.normalize(clip.encode_text(tokenizer([t.format(label) for t in templates])), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows) * clip.logit_scale.exp()
