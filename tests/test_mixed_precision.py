"""Mixed precision without a GPU: ConvNeXt V2's Global Response Norm stays finite in fp16, and bf16 training runs
on the CPU through the code path CUDA uses (flowers_learner's MixedPrecision callback, fine_tune_recipe, train.py),
so the CUDA-only branch cannot rot unseen."""

from __future__ import annotations

import json
import math
import warnings

import pandas as pd
import pytest
import torch
from conftest import TINY_CNN
from fastai.callback.core import Callback
from fastai.callback.fp16 import AMPMode, MixedPrecision
from timm.layers.grn import GlobalResponseNorm

from flowers_classifier.model import FastGlobalResponseNorm
from flowers_fastai import flowers_dataloaders, flowers_learner
from flowers_fastai.api import fine_tune_recipe
from flowers_fastai.cli import train as main
from flowers_fastai.learner import DeviceMixedPrecision, fit_only_callbacks, resolve_precision
from flowers_fastai.train import build_parser

# --------------------------------------------------------------------------- GRN in fp16

C = 16  # channels; (N, H, W, C) as in ConvNeXt V2's MLP, where the GRN sits between fc1 and fc2


class NaiveGlobalResponseNorm(FastGlobalResponseNorm):
    """Ours with the sum of squares in the input's dtype, as some ports compute it: the checks below must
    catch it, or they could not catch ours losing its fp32 squaring either."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_g = x.square().sum(dim=self.spatial_dim, keepdim=True).sqrt()
        x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)
        scale = torch.addcmul(torch.ones_like(x_n), self.weight.view(self.wb_shape), x_n)
        return torch.addcmul(self.bias.view(self.wb_shape), x, scale)


def large_activations() -> torch.Tensor:
    """A 56x56 map of activations up to 200: each square fits fp16 (<= 40000 < 65504), their spatial sum
    (~4e7) does not, its square root (~6500) does again."""
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(2, 56, 56, C, generator=gen) * 2 - 1) * 200


def trained_grn(cls: type[GlobalResponseNorm]) -> GlobalResponseNorm:
    """A GRN of `cls` with non-trivial weight and bias (timm initialises both to 0, where GRN is the identity)."""
    grn = cls(C)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        grn.weight.copy_(torch.randn(C, generator=gen))
        grn.bias.copy_(torch.randn(C, generator=gen))
    return grn


def test_the_input_overflows_a_naive_fp16_sum_of_squares():
    x = large_activations().half()
    assert x.square().isfinite().all()  # each square fits ...
    assert torch.isinf(x.square().sum(dim=(1, 2))).all()  # ... their sum over H*W does not, in every channel
    assert x.float().square().sum(dim=(1, 2)).sqrt().max() < torch.finfo(torch.float16).max  # the norm fits


def test_fast_grn_matches_timm_in_fp32_on_large_activations():
    x = large_activations()
    ours, timms = trained_grn(FastGlobalResponseNorm), trained_grn(GlobalResponseNorm)
    torch.testing.assert_close(ours(x), timms(x), rtol=1e-5, atol=1e-3)


GRNS = [pytest.param(FastGlobalResponseNorm, True, id="ours"),
        pytest.param(NaiveGlobalResponseNorm, False, id="naive-fp16-squares")]


@pytest.mark.parametrize(("cls", "safe"), GRNS)
def test_grn_in_a_half_module(cls, safe):
    x = large_activations()
    out = trained_grn(cls).half()(x.half())
    assert out.dtype == torch.float16
    assert bool(out.isfinite().all()) == safe
    if safe:  # finite and right: timm's GRN in fp32 on the same (fp16-rounded) input, to fp16's precision
        expected = trained_grn(GlobalResponseNorm)(x.half().float())
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=1.0)


@pytest.mark.parametrize(("cls", "safe"), GRNS)
def test_grn_under_fp16_autocast(cls, safe):
    """fp32 weights, fp16 activations from a Linear, as mixed precision runs the MLP: forward and backward."""
    torch.manual_seed(0)
    fc1 = torch.nn.Linear(C, C)
    with torch.no_grad():  # fc1 passes x through: the GRN sees the large activations, in fp16
        fc1.weight.copy_(torch.eye(C))
        fc1.bias.zero_()
    grn = trained_grn(cls)
    seen = []
    grn.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = large_activations().requires_grad_()
    # CPU autocast takes float16 in recent torch (bf16 has fp32's range: it would not overflow anyway). Unlike
    # CUDA autocast, CPU autocast leaves sum/pow in the input's dtype, so a naive GRN overflows here.
    with torch.autocast("cpu", dtype=torch.float16):
        out = grn(fc1(x))
    assert seen == [torch.float16]  # autocast was on: the GRN got fp16 activations
    out.float().mean().backward()
    finite = [out.isfinite().all(), x.grad.isfinite().all(), fc1.weight.grad.isfinite().all(),
              grn.weight.grad.isfinite().all()]
    assert all(finite) == safe


# --------------------------------------------------------------------------- bf16 training on the CPU

class RecordPrecision(Callback):
    """What a fit really did: per training batch the loss, the dtype of the weights after the step, and
    whether a Linear and a conv ran under autocast (forward hooks: autocast state and output dtype)."""

    order = 100  # after MixedPrecision (10): its autocast is entered in before_batch

    def __init__(self):
        self.losses, self.weight_dtypes, self.forward, self.after_training = [], set(), set(), None
        self.hooks = []

    def before_fit(self):
        if self.hooks:  # fine_tune runs two fits: hook and snapshot once
            return
        self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        probes = {"stem conv": self.model.stem[0], "block fc1": self.model.stages[3].blocks[-1].mlp.fc1,
                  "head fc": self.model.head.fc}
        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in probes.items()]

    def _hook(self, name):
        def hook(module, args, out):
            if module.training:
                device = out.device.type  # cpu here; cuda where there is a GPU: the same test, CUDA's path
                self.forward.add((name, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                                  out.dtype))
        return hook

    def after_loss(self):
        if self.training:
            self.losses.append(float(self.loss.detach()))

    def after_step(self):
        self.weight_dtypes |= {p.dtype for p in self.model.parameters()}

    def after_train(self):  # before validation, and before the checkpoint callback loads the best weights back
        self.after_training = {n: p.detach().clone() for n, p in self.model.named_parameters()}


@pytest.fixture(scope="module")
def bf16_learner(real_flowers, tmp_path_factory):
    dls = flowers_dataloaders(real_flowers, model=TINY_CNN, img_size=32, bs=16, pretrained=False,
                              run_dir=tmp_path_factory.mktemp("bf16-run"))
    learn = flowers_learner(dls, pretrained=False, precision="bf16", freeze_epochs=1, epochs=1, patience=None)
    return learn


def test_bf16_fine_tune_autocasts_keeps_fp32_weights_and_trains(bf16_learner):
    learn = bf16_learner
    mp = [cb for cb in learn.cbs if isinstance(cb, MixedPrecision)]
    assert len(mp) == 1 and isinstance(mp[0], DeviceMixedPrecision) and mp[0].amp_mode == AMPMode.BF16
    record = RecordPrecision()
    learn.add_cb(record)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*Disabling")  # autocast/GradScaler('cuda') on a CPU
            fine_tune_recipe(learn)  # both stages: the head alone, then everything
    finally:
        learn.remove_cb(record)
        for hook in record.hooks:
            hook.remove()
    # every training forward of a Linear and a conv ran under bf16 autocast and produced bf16
    assert record.forward == {(name, True, torch.bfloat16, torch.bfloat16)
                              for name in ("stem conv", "block fc1", "head fc")}
    assert len(record.losses) == 2 * len(learn.dls.train) and all(map(math.isfinite, record.losses))
    assert record.weight_dtypes == {torch.float32}  # master weights stay fp32; only activations are bf16
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    for name in ("stem.0.weight", "stages.3.blocks.1.mlp.fc1.weight", "head.fc.weight"):
        assert not torch.equal(record.after_training[name], record.initial[name]), f"{name} did not train"
    hist = pd.read_csv(learn.path / "history.csv")
    assert len(hist) == 2 and hist[["train_loss", "valid_loss"]].notna().all().all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows fastai's own callback on a machine without CUDA")
def test_fastais_own_mixed_precision_would_run_fp32_on_the_cpu(bf16_learner):
    """Why DeviceMixedPrecision exists: fastai 2.8's MixedPrecision autocasts on 'cuda' only. If this fails,
    fastai autocasts on the model's device now and DeviceMixedPrecision can go."""
    learn, dtypes = bf16_learner, []
    hook = learn.model.head.fc.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    try:
        mp = [cb for cb in learn.cbs if isinstance(cb, MixedPrecision)]
        with learn.removed_cbs(fit_only_callbacks(learn) + mp):
            with learn.added_cbs(DeviceMixedPrecision(AMPMode.BF16)):
                learn.validate()
            ours, dtypes[:] = set(dtypes), []
            with warnings.catch_warnings(record=True) as caught, learn.added_cbs(MixedPrecision(AMPMode.BF16)):
                warnings.simplefilter("always")
                learn.validate()
    finally:
        hook.remove()
    assert ours == {torch.bfloat16}
    assert set(dtypes) == {torch.float32}
    assert any("Disabling autocast" in str(w.message) for w in caught)


def test_precision_choices_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [resolve_precision(p) for p in ("auto", "bf16", "fp32")] == ["fp32", "bf16", "fp32"]
    with pytest.raises(ValueError, match="--precision fp16 .* CUDA GPU.* --precision bf16"):
        resolve_precision("fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100 / H100
    assert [resolve_precision(p) for p in ("auto", "fp16", "bf16")] == ["fp16", "fp16", "bf16"]


def test_bf16_is_refused_on_a_gpu_that_only_emulates_it(monkeypatch, tmp_path, capsys):
    """A T4 or V100 (compute capability < 8.0): torch's is_bf16_supported() says True there, by emulation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("fp16") == "fp16"
    with pytest.raises(ValueError, match=r"--precision bf16 \(--bf16\): this GPU has no bfloat16 hardware.*"
                                         r"--precision fp16"):
        resolve_precision("bf16")
    # train.py refuses it before scanning the photos (the folder does not even exist)
    assert main(["--bf16", "--model", TINY_CNN, "--no-pretrained", "--data", str(tmp_path / "none"),
                 "--out", str(tmp_path / "run")]) == 2
    assert "no bfloat16 hardware" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_train_cli_runs_bf16(real_flowers, tmp_path, capsys):
    assert build_parser().parse_args(["--bf16"]).precision == "bf16"
    run_dir, trained = tmp_path / "run", set()

    def hook(module, args, out):  # every module of the process: the Linears and convs that train
        if module.training and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            trained.add((torch.is_autocast_enabled(out.device.type), out.dtype))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*Disabling")
            code = main(["--model", TINY_CNN, "--no-pretrained", "--data", str(real_flowers), "--img-size", "32",
                         "--bs", "16", "--freeze-epochs", "0", "--epochs", "1", "--patience", "0", "--bf16",
                         "--out", str(run_dir), "--no-export"])
    finally:
        handle.remove()
    out = capsys.readouterr()
    assert code == 0, out.err
    assert trained == {(True, torch.bfloat16)}  # training ran under bf16 autocast, and only so
    assert ("precision bf16" if torch.cuda.is_available() else "device: cpu, precision bf16") in out.out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["recipe"]["precision"] == "bf16"
    assert pd.read_csv(run_dir / "history.csv")["train_loss"].notna().all()
    if torch.cuda.is_available():
        return
    # fp16 stays refused on the CPU, before the data scan
    assert main(["--model", TINY_CNN, "--no-pretrained", "--precision", "fp16", "--data", str(tmp_path / "none"),
                 "--out", str(tmp_path / "fp16")]) == 2
    assert "--precision fp16 (mixed precision) needs a CUDA GPU" in capsys.readouterr().err
