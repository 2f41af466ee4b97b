"""flowers_classifier.explain: Grad-CAM maps have the photo's size, lie in [0, 1], follow the evidence,
leave the model untouched, and work on the served CNN and ViT as load_model returns them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import flowers_classifier as fc
from flowers_classifier.explain import explain, grad_cam
from flowers_classifier.model import FlowerClassifier
from flowers_classifier.preprocess import Preprocess

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


@pytest.fixture(scope="module")
def local_model() -> FlowerClassifier:
    colours = np.eye(3)[[0, 1, 2, 0, 1]] * 2 - 0.5  # class k prefers one primary colour
    prep = Preprocess(SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 1.0)
    return FlowerClassifier(LocalEvidence(colours).eval(), "cnn", "local-evidence", fc.CLASSES, prep)


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
