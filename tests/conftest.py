"""Shared fixtures: the real photos (skipped cleanly when absent), synthetic image folders, and tiny
random-init exported models (convnextv2_atto / open_clip ViT-S-32) that train and load in seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowers_fastai import models  # noqa: E402
from flowers_fastai.classes import CLASSES  # noqa: E402
from flowers_fastai.export import make_payload  # noqa: E402

FLOWERS128 = Path(os.environ.get("FLOWERS128_DIR", ROOT.parent / "shared" / "datasets" / "flowers128"))
TINY_CNN, TINY_CLIP, TINY_SIZE = "convnextv2_atto", "ViT-S-32", 64


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds or trains something large (still runs in CI)")
    config.addinivalue_line("markers", "browser: drives Debian's chromium through Playwright")
    # Third-party deprecation noise (torch.jit in timm, numpy.core/pandas options in fastai and gradio).
    for pattern in ("ignore:.*torch.jit.script.*:FutureWarning", "ignore::DeprecationWarning:fastai",
                    "ignore:.*mode.chained_assignment.*", "ignore:.*load_learner.*insecure pickle.*",
                    "ignore:.*copy keyword is deprecated.*"):
        config.addinivalue_line("filterwarnings", pattern)


@pytest.fixture(scope="session")
def flowers128() -> Path:
    if not (FLOWERS128 / "rose").is_dir():
        pytest.skip(f"real photos not found at {FLOWERS128} (set FLOWERS128_DIR)")
    return FLOWERS128


@pytest.fixture(scope="session")
def real_photos(flowers128) -> dict[str, list[Path]]:
    """A few real photos per class, sorted for repeatability."""
    return {c: sorted((flowers128 / c).glob("*.jpg"))[:5] for c in CLASSES}


def make_image_folder(root: Path, per_class: int = 6, size: int = 48, seed: int = 0) -> Path:
    """<root>/<class>/<n>.jpg with a different dominant colour per class (learnable, tiny)."""
    rng = np.random.default_rng(seed)
    for i, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        base = np.array([(i * 50) % 256, (255 - i * 40) % 256, (i * 90) % 256], dtype=np.float64)
        for n in range(per_class):
            noise = rng.normal(0, 25, size=(size, size, 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / label / f"{n}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def tiny_cnn_payload_file(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = models.create_cnn(TINY_CNN, pretrained=None)
    prep = models.cnn_preprocess(net, TINY_SIZE)
    spec = dict(family="cnn", model_name=TINY_CNN, classes=list(CLASSES), **prep.to_dict())
    torch.save(make_payload(spec, net.state_dict()), path)
    return path


def tiny_clip_payload_file(path: Path, seed: int = 0, half: bool = True) -> Path:
    torch.manual_seed(seed)
    net = models.create_clip(TINY_CLIP, pretrained=None, image_size=TINY_SIZE, head_init="random")
    prep = models.clip_preprocess(net)
    spec = dict(family="clip", model_name=TINY_CLIP, classes=list(CLASSES), quick_gelu=False, **prep.to_dict())
    torch.save(make_payload(spec, net.state_dict(), half=half), path)
    return path


@pytest.fixture(scope="session")
def tiny_cnn_pth(tmp_path_factory) -> Path:
    """A random-init convnextv2_atto payload at 64 px, as export.py writes it."""
    return tiny_cnn_payload_file(tmp_path_factory.mktemp("tiny") / "cnn_flowers.pth")


@pytest.fixture(scope="session")
def tiny_vit_pth(tmp_path_factory) -> Path:
    """A random-init open_clip ViT-S-32 payload at 64 px, fp16 storage like a real CLIP export."""
    return tiny_clip_payload_file(tmp_path_factory.mktemp("tiny") / "vit_flowers.pth")

