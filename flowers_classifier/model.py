"""The modules our models add to timm's and open_clip's: the CLIP classifier (image tower + linear head),
a faster, equal ConvNeXt V2 Global Response Norm, and `FlowerClassifier`, an exported network with the
classes and preprocessing it is served with. How they are created lives in `factory`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from .classes import CLASSES
from .preprocess import Preprocess


class ClipClassifier(nn.Module):
    """CLIP image encoder + linear head on L2-normalised features (a zero-shot head keeps its meaning)."""

    def __init__(self, visual: nn.Module, num_classes: int = len(CLASSES), quick_gelu: bool = False):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(visual.output_dim, num_classes)
        self.quick_gelu = quick_gelu  # architecture detail the export must record (openai weights use it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(x), dim=-1))


class FastGlobalResponseNorm(GlobalResponseNorm):
    """timm's GlobalResponseNorm, the same function and weights, computed with fewer passes over x:
    the spatial L2 norm as sqrt(sum(x^2)) in fp32 (torch's norm over two non-contiguous dims is a slow
    CPU kernel), and x + bias + weight * x * x_n as one fused x * (1 + weight * x_n) + bias, where the
    factor is only (N, 1, 1, C). Equal up to fp32 rounding; 1.5-6.5x faster on the CPU measured by
    bench/cpu_kernels.py (bench/RESULTS.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_g = x.float().square().sum(dim=self.spatial_dim, keepdim=True).sqrt().to(x.dtype)
        x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)
        scale = torch.addcmul(torch.ones_like(x_n), self.weight.view(self.wb_shape), x_n)
        return torch.addcmul(self.bias.view(self.wb_shape), x, scale)


def replace_modules(net: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace, in place, each submodule `m` of `net` for which `swap(m)` returns a module by that module
    (modules put in are not visited); returns how many were replaced."""
    replaced = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            new = swap(child)
            if new is not None:
                setattr(module, name, new)
                replaced += 1
    return replaced


def use_fast_grn(model: nn.Module) -> nn.Module:
    """Swap every GlobalResponseNorm of `model` for FastGlobalResponseNorm in place (weights untouched)."""
    for module in model.modules():
        if type(module) is GlobalResponseNorm:
            module.__class__ = FastGlobalResponseNorm
    return model


class FlowerClassifier(nn.Module):
    """An exported network plus what it needs to be fed: classes and preprocessing."""

    channels_last = False  # load_model sets it for ConvNeXt on the CPU: inputs are then fed NHWC
    micro_batch: int | None = None  # load_model sets it on the CPU: a batch runs through the net in chunks
    temperature: float = 1.0  # logits / temperature before the softmax: load_model sets the payload's calibration
    compiled: Callable[[torch.Tensor], torch.Tensor] | None = None  # load_model sets the CPU package's forward
    int8: bool = False  # load_model sets it when it quantised the net (quantize.py)

    def __init__(self, net: nn.Module | None, family: str, model_name: str, classes: tuple[str, ...],
                 prep: Preprocess, build_net: Callable[[], nn.Module] | None = None,
                 build_gradient_net: Callable[[], nn.Module] | None = None):
        """`net` None: built by `build_net()` on first use (load_model defers it when a compiled CPU package
        serves: Grad-CAM still gets the eager network, and a plain prediction never pays for it).
        `build_gradient_net`: for a `net` whose layers pass no gradient (int8), builds the fp32 network of
        the same weights that Grad-CAM differentiates instead (explain.gradient_net); None: `net` itself."""
        super().__init__()
        self.family, self.model_name, self.classes, self.prep = family, model_name, classes, prep
        self._build_net = build_net
        self.build_gradient_net = build_gradient_net
        if net is not None:
            self.net = net

    def __getattr__(self, name: str):
        # nn.Module keeps modules in _modules, so this runs on every `.net`: build only the first time.
        if name == "net" and "net" not in self._modules and self.__dict__.get("_build_net") is not None:
            self.net = self._build_net()
        return super().__getattr__(name)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.compiled is not None else next(self.net.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, num_classes) fp32 logits on the CPU, before any temperature."""
        dtype = torch.float32 if self.compiled is not None else next(self.net.parameters()).dtype
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        chunks = batch.split(self.micro_batch) if self.micro_batch else (batch,)
        forward = self.compiled or self.net  # the compiled package computes what self.net does (aot.py)
        logits = [forward(c.to(self.device, dtype, memory_format=memory_format)) for c in chunks]
        return torch.cat(logits).float().cpu()

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, num_classes) fp32 probabilities, softmax(logits / temperature)."""
        return calibrated_softmax(self.logits(batch), self.temperature)


def calibrated_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) in fp32: T > 1 softens over-confident probabilities, and the argmax
    never changes (dividing by a positive number keeps the order)."""
    logits = logits.float()
    return (logits if temperature == 1.0 else logits / temperature).softmax(-1)
