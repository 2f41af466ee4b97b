"""flowers_classifier.explain: Grad-CAM maps have the photo's size, lie in [0, 1], follow the evidence (CNN
and ViT), leave the model untouched, work on the served CNN and ViT as load_model returns them, and a map
with nothing to draw is refused, never drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP
from PIL import Image
from torch import nn

import flowers_classifier as fc
from flowers_classifier import factory
from flowers_classifier.backends import EagerBackend
from flowers_classifier.explain import ExplainError, explain, grad_cam
from flowers_classifier.model import FlowerClassifier
from flowers_classifier.payload import make_payload
from flowers_classifier.preprocess import Preprocess, to_tensor
from flowers_classifier.quantize import quantize_int8

SIZE = 64
GREY = (128, 128, 128)  # normalises to ~0 with the stats below: a blank canvas carries no evidence


class LocalEvidence(nn.Module):
    """A one-stage 'CNN' whose class-k channel lights up on pixels of class k's colour, logits = spatial
    mean: evidence is exactly where the coloured pixels are, so Grad-CAM must find it there."""

    def __init__(self, colours: np.ndarray):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv2d(3, len(colours), 1)])
        with torch.no_grad():
            self.stages[0].weight.copy_(torch.as_tensor(colours, dtype=torch.float32)[:, :, None, None])
            self.stages[0].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages[-1](x).relu().mean((2, 3))


def pasted(photo: Image.Image, left: bool) -> Image.Image:
    """The photo on one half of a blank square canvas."""
    canvas = Image.new("RGB", (SIZE, SIZE), GREY)
    canvas.paste(photo.resize((SIZE // 2, SIZE // 2)), (0 if left else SIZE // 2, SIZE // 4))
    return canvas


PREP = Preprocess(SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 1.0)
COLOURS = np.eye(3)[[0, 1, 2, 0, 1]] * 2 - 0.5  # class k prefers one primary colour


@pytest.fixture(scope="module")
def local_model() -> FlowerClassifier:
    return FlowerClassifier(EagerBackend(LocalEvidence(COLOURS), "cnn", SIZE), "cnn", "local-evidence", fc.CLASSES,
                            PREP)


@pytest.mark.parametrize("left", [True, False])
def test_heat_follows_the_evidence(local_model, left):
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    heat = grad_cam(local_model, pasted(red, left), class_index=0)
    own, other = (heat[:, :SIZE // 2], heat[:, SIZE // 2:]) if left else (heat[:, SIZE // 2:], heat[:, :SIZE // 2])
    assert own.mean() > 5 * other.mean()
    assert heat.max() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def served(tiny_cnn_pth, tiny_vit_pth) -> list[FlowerClassifier]:
    return [fc.load_cnn_model(tiny_cnn_pth, "cpu"), fc.load_vit_model(tiny_vit_pth, "cpu")]


@pytest.mark.parametrize("index", [0, 1], ids=["cnn", "vit"])
def test_map_has_the_photos_aspect_and_range_and_leaves_the_model_alone(served, real_photos, index):
    model = served[index]
    photo = Image.open(real_photos["tulip"][0]).convert("RGB").resize((150, 90))  # landscape, not the crop's
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    with torch.inference_mode():  # as a server may call it: Grad-CAM must still get its gradients
        heat = grad_cam(model, photo)
    assert heat.shape == (90, 150)
    assert heat.dtype == np.float32 and heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    # the 90 px crop is centered: the strips at the sides were not seen, so they carry no heat
    assert not heat[:, :25].any() and not heat[:, -25:].any()
    assert all(p.grad is None for p in model.net.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())


def test_explain_returns_an_overlay_of_the_photo(served, real_photos):
    photo = real_photos["rose"][0]
    shown = explain(served[0], photo)
    assert shown.size == Image.open(photo).size and shown.mode == "RGB"
    assert not np.array_equal(np.asarray(shown), np.asarray(Image.open(photo).convert("RGB")))


RED, BLUE = 0, 1  # the colour-evidence ViT's classes (daisy, dandelion) and the token channels they read


def colour_evidence_vit() -> nn.Module:
    """open_clip's ViT-S-32 whose evidence is known: a patch's token holds its redness in channel RED and
    its blueness in BLUE (patch embedding), blocks 1-11 pass tokens through (residual branches zeroed), the
    last block's class token takes the mean of all tokens (q = k = 0: uniform attention; v, out = identity),
    and class RED's logit reads channel RED, class BLUE's channel BLUE. So a red patch argues for class RED
    from where it lies, and Grad-CAM on the tokens entering the last block must find it there."""
    torch.manual_seed(0)
    net = factory.create_clip(TINY_CLIP, image_size=SIZE)
    visual, eye = net.visual, torch.eye(net.visual.conv1.out_channels)
    width = len(eye)
    with torch.no_grad():
        conv = visual.conv1.weight.zero_()
        pixels = conv[0, 0].numel()
        conv[RED] = torch.tensor([1.0, -0.5, -0.5])[:, None, None] / pixels  # mean redness over the patch
        conv[BLUE] = torch.tensor([-0.5, -0.5, 1.0])[:, None, None] / pixels
        visual.class_embedding.zero_()
        visual.positional_embedding.zero_()[:, 2] = 1.0  # a grey token is a fixed direction after ln_pre, not 0
        for block in visual.transformer.resblocks:
            for layer in (block.attn.out_proj, block.mlp.c_proj):
                layer.weight.zero_()
                layer.bias.zero_()
        last = visual.transformer.resblocks[-1].attn
        last.in_proj_weight.zero_()[2 * width:] = eye
        last.in_proj_bias.zero_()
        last.out_proj.weight.copy_(eye)
        visual.proj.copy_(eye)
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.weight[RED, RED] = net.head.weight[BLUE, BLUE] = 1.0
    return net


@pytest.fixture(scope="module")
def evidence_vit(tmp_path_factory) -> FlowerClassifier:
    """The colour-evidence ViT exported and served as load_model serves a ViT (fp32 on the CPU)."""
    spec = dict(family="clip", model_name=TINY_CLIP, classes=list(fc.CLASSES), quick_gelu=False, **PREP.to_dict())
    path = tmp_path_factory.mktemp("evidence") / "vit.pth"
    torch.save(make_payload(spec, colour_evidence_vit().state_dict()), path)
    return fc.load_vit_model(path, "cpu")


def painted(*squares: tuple[int, tuple[int, int, int]]) -> Image.Image:
    """A grey canvas with each (quarter, colour) square painted: quarters 0-3 are top-left, top-right,
    bottom-left, bottom-right, one ViT-S-32 patch each at SIZE px."""
    half, canvas = SIZE // 2, Image.new("RGB", (SIZE, SIZE), GREY)
    for quarter, colour in squares:
        top, left = divmod(quarter, 2)
        canvas.paste(colour, (left * half, top * half, (left + 1) * half, (top + 1) * half))
    return canvas


def quarters(heat: np.ndarray) -> np.ndarray:
    """Mean heat of the four quarters, in `painted`'s order."""
    half = SIZE // 2
    return np.array([heat[r:r + half, c:c + half].mean() for r in (0, half) for c in (0, half)])


@pytest.mark.parametrize("quarter", range(4), ids=["top-left", "top-right", "bottom-left", "bottom-right"])
def test_vit_heat_follows_the_evidence(evidence_vit, quarter):
    """A red patch in one quarter, a blue one in the opposite: each class's map lies on its own colour; with
    red alone, the predicted class is red's and its map lies on the red patch."""
    both = painted((quarter, (255, 0, 0)), (3 - quarter, (0, 0, 255)))
    for cls, own in ((RED, quarter), (BLUE, 3 - quarter)):
        heat = quarters(grad_cam(evidence_vit, both, class_index=cls))
        assert heat[own] > 3 * np.delete(heat, own).max(), (fc.CLASSES[cls], heat)
    red = painted((quarter, (255, 0, 0)))
    assert int(evidence_vit.probabilities(to_tensor(red, PREP)[None]).argmax()) == RED
    assert quarters(grad_cam(evidence_vit, red)).argmax() == quarter


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")  # torch: int8 has no backward
def test_a_map_with_nothing_to_draw_is_refused(local_model):
    """All zero (no evidence for the class; an int8 net that passes no gradient) or NaN: an error, no overlay."""
    blue = Image.new("RGB", (SIZE, SIZE), (0, 0, 255))
    for draw in (grad_cam, explain):
        with pytest.raises(ExplainError, match=r"for 'daisy' is all zero.*argues for that class.*class_index="):
            draw(local_model, blue, class_index=0)
    red = pasted(Image.new("RGB", (16, 16), (255, 0, 0)), left=True)
    broken = LocalEvidence(COLOURS).eval()
    with torch.no_grad():
        broken.stages[0].weight[0, 0] = float("nan")
    nan_model = FlowerClassifier(EagerBackend(broken, "cnn", SIZE), "cnn", "nan-weights", fc.CLASSES, PREP)
    with pytest.raises(ExplainError, match="not finite.*weights hold NaN or inf"):
        grad_cam(nan_model, red, class_index=0)
    torch.manual_seed(0)
    vit = factory.create_clip(TINY_CLIP, image_size=SIZE).eval()
    # built by hand, without the fp32 twin that load_model gives an int8 model (Int8Backend)
    int8 = FlowerClassifier(EagerBackend(quantize_int8(vit), "clip", SIZE), "clip", TINY_CLIP, fc.CLASSES, PREP)
    with pytest.raises(ExplainError, match=r"all zero.*int8 layers pass no gradient.*backend='eager'"):
        explain(int8, red)
