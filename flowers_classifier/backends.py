"""What runs a `FlowerClassifier`'s network: a backend turns a batch of normalised images into logits.

    eager       the PyTorch network (on the CPU: Linear layers as 1x1 convolutions, a ConvNeXt channels_last,
                batches in cache-sized chunks; optionally torch.compile)
    int8        the eager backend with dynamically quantised int8 Linear layers (quantize.py), CPU only
    cpu-package the AOTInductor-compiled `<name>.cpu.pt2` beside the `.pth` (aot.py), CPU only
    onnx        an exported `.onnx` graph run by ONNX Runtime, CPU only

Each variant is chosen when the backend is built (timm's `conv_mlp=` way) and never changes afterwards.
`load_model` decides which backend serves a file.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .model import Backend, replace_modules
from .payload import ModelFileError
from .quantize import quantize_int8

__all__ = ["BACKENDS", "Backend", "BackendError", "CpuPackageBackend", "EagerBackend", "Int8Backend", "OnnxBackend",
           "cpu_micro_batch"]

BACKENDS = ("eager", "int8", "cpu-package", "onnx")  # what load_model(backend=...) accepts besides "auto"
CPU_MICRO_BATCH = 2  # images per eager forward pass on the CPU at 224 px; more at smaller sizes (cpu_micro_batch)
# Images per call of a compiled CPU package at 224 px: its fused kernels make fewer passes over the activations,
# so its chunks can be larger than eager's (docs/cpu-serving.md).
PACKAGE_MICRO_BATCH = 4


class BackendError(ModelFileError):
    """A backend asked for by name cannot serve this file here; the message says why and what to do."""


def cpu_micro_batch(image_size: int, per_224: int = CPU_MICRO_BATCH) -> int:
    """Images per forward pass on the CPU: as many pixels as `per_224` images of 224 px, so that each pass's
    activations stay cache-sized without splitting small inputs for nothing."""
    return max(1, round(per_224 * (224 / image_size) ** 2))


class _Fixed:
    """Attributes set while the backend is built, never after (`_freeze` ends the build): a backend is
    another `load_model` call, not an object reconfigured in place."""

    _frozen = False

    def _freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value) -> None:
        if self._frozen:
            raise AttributeError(f"{type(self).__name__}.{name}: a backend is fixed when built; load the model again "
                                 f"(load_model(..., backend=...)) to serve it otherwise.")
        super().__setattr__(name, value)


class _Once:
    """`build()` called on first use, once, even when two threads ask at the same time."""

    def __init__(self, build: Callable[[], nn.Module]):
        self._build, self._value, self._lock = build, None, threading.Lock()

    @property
    def built(self) -> bool:
        return self._value is not None

    def __call__(self) -> nn.Module:
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value


def _chunked(forward: Callable, batch: torch.Tensor, micro_batch: int | None, device: torch.device,
             dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
    chunks = batch.split(micro_batch) if micro_batch else (batch,)
    return torch.cat([forward(c.to(device, dtype, memory_format=memory_format)) for c in chunks])


class EagerBackend(_Fixed):
    """A PyTorch network in eval mode on `device`. On the CPU it is served in its fastest equal form, set up
    here: Linear layers as 1x1 convolutions (`_LinearAsConv`), a ConvNeXt (`family` "cnn") channels_last, and
    batches in chunks of `micro_batch` images (default `cpu_micro_batch(image_size)`); fp32 whatever `dtype`.
    `compile=True` wraps the network in torch.compile (freezing), warmed up here on one image so that a missing
    C++ compiler shows at load, as a warning, and the eager network serves instead."""

    name = "eager"

    def __init__(self, net: nn.Module, family: str, image_size: int, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, micro_batch: int | None = None, compile: bool = False):
        self.device = torch.device(device)
        cpu = self.device.type == "cpu"
        self._dtype = torch.float32 if cpu else dtype  # half precision on the CPU is slower and less exact
        net = net.to(self.device, self._dtype).eval()
        if cpu:
            net = self._cpu_form(net, family)
        self._net = net
        self._memory_format = torch.channels_last if cpu and family == "cnn" else torch.preserve_format
        self._micro_batch = (micro_batch or cpu_micro_batch(image_size)) if cpu else micro_batch
        self._forward = self._compiled(net, image_size) if compile else net
        self._freeze()

    def _cpu_form(self, net: nn.Module, family: str) -> nn.Module:
        _linears_as_convs(net)
        # oneDNN's convolutions are fastest on NHWC, and ConvNeXt's MLP permutes to NHWC anyway: no copies.
        return net.to(memory_format=torch.channels_last) if family == "cnn" else net

    def _compiled(self, net: nn.Module, image_size: int) -> Callable:
        compiled = torch.compile(net, options={"freezing": True})
        try:
            with torch.inference_mode():
                self._run(compiled, torch.zeros(1, 3, image_size, image_size))
        except Exception as e:  # noqa: BLE001 - any backend failure leaves the (correct) eager network serving
            warnings.warn(f"load_model(compile=True): torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
                          f"serving the eager model. It needs a C++ compiler (gcc/g++) on PATH.", stacklevel=4)
            return net
        return compiled

    def _run(self, forward: Callable, batch: torch.Tensor) -> torch.Tensor:
        return _chunked(forward, batch, self._micro_batch, self.device, self._dtype, self._memory_format)

    @property
    def net(self) -> nn.Module:
        """The network as it serves (int8 layers included), for inspection."""
        return self._net

    @property
    def micro_batch(self) -> int | None:
        return self._micro_batch

    @property
    def compiled(self) -> bool:
        """Whether torch.compile serves (False also when it failed at load)."""
        return self._forward is not self._net

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self._run(self._forward, batch)

    def gradient_net(self) -> nn.Module:
        return self._net


class Int8Backend(EagerBackend):
    """The eager backend with the network's Linear layers (attention's and 1x1 convolutions included) dynamically
    quantised to int8 (quantize.py), CPU only. int8 layers pass no gradient, so Grad-CAM differentiates the fp32
    network of the same weights, `fp32()`, built on first use (the int8 model never holds the fp32 weights)."""

    name = "int8"

    def __init__(self, net: nn.Module, family: str, image_size: int, *, fp32: Callable[[], nn.Module],
                 micro_batch: int | None = None, compile: bool = False):
        self._fp32 = _Once(fp32)
        super().__init__(net, family, image_size, device="cpu", micro_batch=micro_batch, compile=compile)

    def _cpu_form(self, net: nn.Module, family: str) -> nn.Module:
        quantize_int8(net)  # before the swap: only the classifier head is left a plain nn.Linear
        return super()._cpu_form(net, family)

    def gradient_net(self) -> nn.Module:
        return self._fp32()


class CpuPackageBackend(_Fixed):
    """A compiled CPU package's forward (aot.load_cpu_package), fed channels_last for a ConvNeXt and in chunks of
    `micro_batch` images (default `cpu_micro_batch(image_size, PACKAGE_MICRO_BATCH)`). `eager()` builds the
    eager network of the same weights, on first use only (Grad-CAM): a prediction never pays for it."""

    name = "cpu-package"
    device = torch.device("cpu")

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], family: str, image_size: int, *,
                 eager: Callable[[], nn.Module], micro_batch: int | None = None):
        self._package, self._eager = forward, _Once(eager)
        self._memory_format = torch.channels_last if family == "cnn" else torch.preserve_format
        self._micro_batch = micro_batch or cpu_micro_batch(image_size, PACKAGE_MICRO_BATCH)
        self._freeze()

    @property
    def package(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The compiled forward (aot.PackageForward)."""
        return self._package

    @property
    def micro_batch(self) -> int:
        return self._micro_batch

    @property
    def net(self) -> nn.Module:
        """The eager network of the same weights, built on first use."""
        return self._eager()

    @property
    def eager_built(self) -> bool:
        return self._eager.built

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return _chunked(self._package, batch, self._micro_batch, self.device, torch.float32, self._memory_format)

    def gradient_net(self) -> nn.Module:
        return self.net


class OnnxBackend(_Fixed):
    """An ONNX Runtime session of a graph written by `export.py --onnx` (input `image`, output `logits`), CPU."""

    name = "onnx"
    device = torch.device("cpu")

    def __init__(self, session, input_name: str = "image", output_name: str = "logits"):
        self._session, self._input, self._output = session, input_name, output_name
        self._freeze()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float().contiguous().numpy()
        return torch.from_numpy(self._session.run([self._output], {self._input: x})[0])

    def gradient_net(self) -> None:
        return None  # ONNX Runtime computes no gradients


class _LinearAsConv(nn.Module):
    """An nn.Linear over the last dim of an (N, H, W, C) or (N, L, C) tensor, computed as a 1x1 convolution
    of its channels-last view: the same arithmetic up to float rounding, but through oneDNN rather than
    MKL's sgemm, which is the slower of the two on some CPUs (docs/cpu-serving.md). Same parameters and
    state-dict keys as the Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight[:, :, None, None]
        if x.dim() == 4:  # (N, H, W, C) is an NCHW tensor in channels_last memory once permuted: no copy
            return F.conv2d(x.permute(0, 3, 1, 2), w, self.bias).permute(0, 2, 3, 1)
        if x.dim() == 3:  # (N, L, C) -> (N, C, L, 1), channels_last in memory too
            return F.conv2d(x.transpose(1, 2).unsqueeze(-1), w, self.bias).squeeze(-1).transpose(1, 2)
        return F.linear(x, self.weight, self.bias)


def _linears_as_convs(net: nn.Module) -> None:
    """Swap every nn.Linear of `net` (ConvNeXt's MLPs, the ViT blocks' MLPs, heads) for _LinearAsConv."""
    # exact type, not subclasses: attention's NonDynamicallyQuantizableLinear stays
    replace_modules(net, lambda child: _LinearAsConv(child) if type(child) is nn.Linear else None)
