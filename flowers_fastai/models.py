"""Model factory: how each backbone is built, where its weights come from, how it splits into
parameter groups, and which pixels it expects.

Two families, one entry point each:
- "cnn":  a timm ConvNeXt V2 (`convnextv2_tiny` by default) with a fresh 5-way head.
- "clip": an OpenCLIP image encoder (`ViT-L-14` by default) with a linear head on L2-normalised
          image features, optionally initialised from CLIP's own zero-shot text embeddings.

`pretrained` is resolved here and nowhere else: "hub" (timm's hub weights / open_clip's default tag),
an open_clip tag, a local file, or None for random init. Without a network and without cached weights
the hub path fails fast with a message naming `--weights` and `--no-pretrained`; it never falls back
to random init on its own. Pure torch/timm/open_clip: no fastai import (the standalone classifier
shares this module).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from .classes import CLASSES
from .preprocess import Preprocess

CNN_DEFAULT = "convnextv2_tiny"
CLIP_DEFAULT = "ViT-L-14"
CLIP_DEFAULT_TAG = "openai"
CNN_PREFERRED_TAGS = ("fcmae_ft_in22k_in1k", "fcmae_ft_in1k")  # ImageNet-22k fine-tuned where timm has it
CLIP_TEMPLATES = ("a photo of a {}, a type of flower.", "a close-up photo of a {}, a type of flower.",
                  "a cropped photo of a {}.", "a bright photo of a {}.", "a photo of the {}.")

OFFLINE_HINT = ("Pass --weights FILE to load a local weights file, or --no-pretrained to train "
                "from random init.")


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but can be neither downloaded nor found in the cache."""


class WeightsFileError(ValueError):
    """A local weights file is missing, unreadable or does not fit the architecture."""


# --------------------------------------------------------------------------- pretrained resolution

def _hub_reachable(timeout: float = 5.0) -> bool:
    """One DNS lookup + TCP connect to the Hugging Face endpoint: a bounded answer, not a retry loop."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_in_hub(repo_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def _require_hub(repo_id: str, filenames: tuple[str, ...], what: str) -> None:
    """Make sure `repo_id` can be had: cached (then stay offline) or the hub answers; else raise."""
    if _cached_in_hub(repo_id, filenames):
        if not _hub_reachable():
            from huggingface_hub import constants
            constants.HF_HUB_OFFLINE = True  # use the cache without a retry loop against a dead network
        return
    if not _hub_reachable():
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
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    if missing or result.unexpected_keys:
        raise WeightsFileError(
            f"--weights {path}: does not match {type(model).__name__} "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}); is it a backbone of the model given by --model?")


def create_cnn(model_name: str = CNN_DEFAULT, pretrained: str | os.PathLike | None = "hub",
               num_classes: int = len(CLASSES), drop_path_rate: float = 0.0) -> nn.Module:
    """A timm ConvNeXt V2 with a new `Linear(in_features, num_classes)` head.

    pretrained: "hub" for timm's hub weights, a path to a local backbone file, or None for random init.
    """
    import timm
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate)
    if pretrained == "hub":
        tag = cnn_pretrained_tag(model_name)
        model = timm.create_model(f"{model_name}.{tag}", pretrained=False, **kwargs)
        _require_hub(model.pretrained_cfg["hf_hub_id"], ("model.safetensors", "pytorch_model.bin"),
                     f"{model_name}.{tag}")
        return timm.create_model(f"{model_name}.{tag}", pretrained=True, **kwargs)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if pretrained is not None:
        path = Path(pretrained)
        _load_backbone(model, read_state_dict(path), path, head_prefix=model.pretrained_cfg["classifier"])
    return model


def cnn_preprocess(model: nn.Module, image_size: int | None = None) -> Preprocess:
    cfg = model.pretrained_cfg
    return Preprocess(image_size=image_size or cfg["input_size"][-1], mean=tuple(cfg["mean"]),
                      std=tuple(cfg["std"]), interpolation=cfg.get("interpolation", "bicubic"),
                      crop_pct=cfg.get("crop_pct", 0.875))


def cnn_param_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """[stem], [stage 0], ..., [stage 3], [norm_pre + head]: body groups first, head last."""
    groups = [list(model.stem.parameters())] + [list(s.parameters()) for s in model.stages]
    return groups + [list(model.norm_pre.parameters()) + list(model.head.parameters())]


# --------------------------------------------------------------------------- CLIP: OpenCLIP image encoder

class ClipClassifier(nn.Module):
    """CLIP image encoder + linear head on L2-normalised features (a zero-shot head keeps its meaning)."""

    def __init__(self, visual: nn.Module, num_classes: int = len(CLASSES), quick_gelu: bool = False):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(visual.output_dim, num_classes)
        self.quick_gelu = quick_gelu  # architecture detail the export must record (openai weights use it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(x), dim=-1))


def _clip_tag_config(model_name: str, tag: str | None) -> dict:
    import open_clip
    return open_clip.get_pretrained_cfg(model_name, tag) if tag else {}


def create_clip(model_name: str = CLIP_DEFAULT, pretrained: str | os.PathLike | None = CLIP_DEFAULT_TAG,
                num_classes: int = len(CLASSES), image_size: int | None = None, head_init: str = "zeroshot",
                classes: tuple[str, ...] = CLASSES, quick_gelu: bool | None = None) -> ClipClassifier:
    """The OpenCLIP image tower of `model_name` with a linear head; the text tower is dropped once the
    zero-shot head is built.

    pretrained: an open_clip tag ("openai", a LAION/DataComp tag), a local open_clip checkpoint file,
    or None for random init. head_init: "zeroshot" (text embeddings of the class prompts times CLIP's
    logit scale) or "random".
    """
    import open_clip
    tag_cfg, source = {}, None
    if pretrained is not None:
        if Path(pretrained).suffix or Path(pretrained).exists():  # a file, not a tag
            if not Path(pretrained).is_file():
                raise WeightsFileError(f"--weights {pretrained}: no such file")
            source = str(pretrained)
        else:
            tag_cfg = _clip_tag_config(model_name, str(pretrained))
            if not tag_cfg:
                known = open_clip.list_pretrained_tags_by_model(model_name)
                raise PretrainedWeightsUnavailable(
                    f"open_clip has no pretrained tag {pretrained!r} for {model_name!r} "
                    f"(known: {', '.join(known) or 'none'}). Use --pretrained-tag with one of those, "
                    f"or: {OFFLINE_HINT}")
            if tag_cfg.get("hf_hub"):
                repo = tag_cfg["hf_hub"].rstrip("/")
                _require_hub(repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
                             f"{model_name}/{pretrained}")
            source = str(pretrained)
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        clip = open_clip.create_model(model_name, pretrained=source, force_image_size=image_size,
                                      force_quick_gelu=quick_gelu)
    except RuntimeError as e:
        if source and Path(source).is_file():
            raise WeightsFileError(f"--weights {source}: not an open_clip checkpoint for {model_name} ({e})") from e
        raise
    model = ClipClassifier(clip.visual, num_classes, quick_gelu)
    with torch.no_grad():
        if head_init == "zeroshot":
            model.head.weight.copy_(zero_shot_weights(clip, open_clip.get_tokenizer(model_name), classes))
            model.head.bias.zero_()
        elif head_init != "random":
            raise ValueError(f"--head-init must be 'zeroshot' or 'random', not {head_init!r}")
    return model  # the full `clip` (text tower included) goes out of scope here


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


def clip_preprocess(model: ClipClassifier) -> Preprocess:
    cfg = model.visual.preprocess_cfg
    return Preprocess(image_size=int(cfg["size"][0]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      interpolation=cfg.get("interpolation", "bicubic"), crop_pct=1.0)


def clip_param_groups(model: ClipClassifier) -> list[list[nn.Parameter]]:
    """[patch embedding + class/positional embeddings + ln_pre], one group per transformer block,
    [ln_post + projection (+ anything else in the tower)], [head]."""
    v = model.visual
    blocks = list(v.transformer.resblocks)
    stem = [p for name, p in v.named_parameters() if name.split(".")[0] in
            ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_embed")]
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    taken = {id(p) for p in stem} | block_ids
    top = [p for p in v.parameters() if id(p) not in taken]
    return [stem] + [list(b.parameters()) for b in blocks] + [top, list(model.head.parameters())]


# --------------------------------------------------------------------------- shared entry points

def param_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The splitter for either family: body groups from the input upwards, the head last."""
    return clip_param_groups(model) if isinstance(model, ClipClassifier) else cnn_param_groups(model)


def preprocess_for(model: nn.Module, image_size: int | None = None) -> Preprocess:
    return clip_preprocess(model) if isinstance(model, ClipClassifier) else cnn_preprocess(model, image_size)


def build_from_spec(spec: dict) -> nn.Module:
    """The architecture an exported payload describes, randomly initialised (never downloads)."""
    family, name, n = spec["family"], spec["model_name"], len(spec["classes"])
    if family == "cnn":
        return create_cnn(name, pretrained=None, num_classes=n)
    if family == "clip":
        return create_clip(name, pretrained=None, num_classes=n, head_init="random",
                           image_size=spec.get("image_size"), quick_gelu=spec.get("quick_gelu", False))
    raise ValueError(f"unknown model family {family!r}: expected 'cnn' or 'clip'")
