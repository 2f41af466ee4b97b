"""The compiled CPU package (`export.py --cpu-package`; flowers_fastai/cpu_package.py builds it,
flowers_classifier/aot.py serves it): written beside the .pth, served by load_model's defaults with the eager
model's probabilities, and refused with a warning (eager serving goes on) when it does not fit the weights, the
torch version or the CPU, or is damaged."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import types
import warnings
import zipfile

import pytest
import torch
from conftest import EXPORT_STDERR, TINY_CLIP, TINY_SIZE, builders_imported_by_serving, require, thread_cpus_after
from torch._inductor.exc import CppCompileError, InductorError, InvalidCxxCompiler

import flowers_classifier as fc
from flowers_classifier import aot, backends
from flowers_classifier import payload as payload_module
from flowers_classifier.payload import load_payload
from flowers_fastai import cli as commands
from flowers_fastai import cpu_package

pytestmark = pytest.mark.slow  # each package is a real AOTInductor compile (about a minute on 2 cores)


def _images(n: int, size: int = TINY_SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_export_writes_the_package_beside_the_pth_and_nothing_else(packaged_cnn, capsys):
    package = aot.cpu_package_path(packaged_cnn)
    assert package.name == "cnn_flowers.cpu.pt2" and package.is_file()
    assert sorted(p.name for p in packaged_cnn.parent.iterdir()) == ["cnn_flowers.cpu.pt2", "cnn_flowers.pth"]
    meta = aot.read_package_meta(package)
    assert meta["weights_sha256"] == aot.weights_sha256(load_payload(packaged_cnn))
    assert (meta["torch"], meta["cpu_features"]) == (torch.__version__, aot.cpu_features())
    assert {"avx2", "avx512_f"} & set(meta["cpu_features"]) or meta["architecture"] != "x86_64"
    load_payload(packaged_cnn)  # the .pth itself is untouched and still loads weights_only


def test_load_model_serves_the_package_with_the_eager_probabilities(packaged_cnn, real_photos):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fitting package loads without a word
        compiled = fc.load_model(packaged_cnn, device="cpu")
    eager = fc.load_model(packaged_cnn, device="cpu", backend="eager")
    assert compiled.backend.name == "cpu-package" and eager.backend.name == "eager"
    # chunks of twice eager's pixels (4 images at 224 px): at 64 px any batch up to 49 is one call
    assert compiled.backend.micro_batch == backends.cpu_micro_batch(64, backends.PACKAGE_MICRO_BATCH) == 49
    assert eager.backend.micro_batch == backends.cpu_micro_batch(64) == 24
    for n in (1, 2, 5):  # the batch axis is dynamic, micro-batches or not
        x = _images(n)
        assert torch.allclose(compiled.probabilities(x), eager.probabilities(x), atol=1e-4)
    photo = real_photos["rose"][0]
    p_compiled, p_eager = fc.predict_proba(compiled, photo), fc.predict_proba(eager, photo)
    assert max(abs(p_compiled[c] - p_eager[c]) for c in fc.CLASSES) < 1e-4
    calls, package = [], compiled.backend.package
    runner = package.batch1  # a single image's graph

    class Spy:
        def run(self, inputs):
            calls.append(inputs[0].shape)
            return runner.run(inputs)
    package.batch1 = Spy()
    fc.predict(compiled, photo)
    assert calls, "predict did not go through the compiled package"


def test_serving_the_package_imports_no_builder(packaged_cnn, real_photos):
    """Loading a package takes torch's AOTInductor runner only: not Inductor's compiler, not the trainer that
    built it (flowers_fastai.cpu_package), in a fresh interpreter (tests/test_layers.py: the other backends)."""
    assert builders_imported_by_serving([packaged_cnn], real_photos["rose"][0]) == []


@pytest.mark.skipif(len(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ()) < 2,
                    reason="a thread's CPU set can only be narrowed on Linux with 2 or more CPUs")
def test_serving_the_package_narrows_no_threads_cpus(packaged_cnn, real_photos):
    photos = [str(p) for p in real_photos["rose"] + real_photos["tulip"]]
    start, threads = thread_cpus_after(f"""
        import flowers_classifier as fc
        model = fc.load_model({str(packaged_cnn)!r})
        assert model.backend.name == "cpu-package", "the package did not serve"
        fc.predict(model, {photos[0]!r})
        fc.predict_batch(model, {photos!r}, bs=4)
    """)
    assert len(threads) > 1  # the forward's OpenMP workers are among them
    assert all(cpus == start for cpus in threads.values()), threads


def test_a_convnext_package_serves_single_images_through_its_batch1_graph(packaged_cnn):
    """Inductor prepacks convolution weights only for a static shape (aot.py): the ConvNeXt package holds a
    batch-1 graph beside the dynamic one, each batch goes to the right one, and both give eager's numbers."""
    assert aot.read_package_meta(aot.cpu_package_path(packaged_cnn))["graphs"] == [aot.MAIN_GRAPH, aot.BATCH1_GRAPH]
    model = fc.load_model(packaged_cnn, device="cpu")
    eager = fc.load_model(packaged_cnn, device="cpu", backend="eager")
    forward = model.backend.package
    assert isinstance(forward, aot.PackageForward) and forward.batch1 is not None
    calls = []

    class Spy:
        def __init__(self, name, runner):
            self.name, self.runner = name, runner

        def run(self, inputs):
            calls.append((self.name, inputs[0].shape[0]))
            return self.runner.run(inputs)
    forward.main, forward.batch1 = Spy("main", forward.main), Spy("batch1", forward.batch1)
    for n in (1, 4, 1):
        x = _images(n)
        assert torch.allclose(model.probabilities(x), eager.probabilities(x), atol=1e-4)
    assert calls == [("batch1", 1), ("main", 4), ("batch1", 1)]
    calls.clear()
    # as at 224 px, where a batch of 5 runs in chunks of PACKAGE_MICRO_BATCH: 4 + 1
    chunked = backends.CpuPackageBackend(forward, "cnn", 64, eager=lambda: eager.net, micro_batch=2)
    x = _images(5)
    chunked_model = dataclasses.replace(model, backend=chunked)
    assert torch.allclose(chunked_model.probabilities(x), eager.probabilities(x), atol=1e-4)
    assert calls == [("main", 2), ("main", 2), ("batch1", 1)]


def test_the_graphs_that_serve_batches_or_one_image_are_autotuned_a_vits_graph_is_not(
        tiny_cnn_pth, tiny_vit_pth, packaged_cnn, monkeypatch):
    """cpu_package.AUTOTUNE: a ConvNeXt's batch-1 graph (traced on one image) and its main graph, which then serves
    batches only (traced at TUNED_BATCH), are compiled with max-autotune over Inductor's C++ GEMM and oneDNN;
    a ViT's one graph, which serves single images too, is traced on 2 images and left to oneDNN. No timing
    tables are printed."""
    seen = []

    def record(module, args, kwargs, options):
        seen.append((args[0].shape[0], options))
        return []
    monkeypatch.setattr(torch._inductor, "aot_compile", record)
    for pth, graphs in ((tiny_cnn_pth, (aot.MAIN_GRAPH, aot.BATCH1_GRAPH)), (tiny_vit_pth, (aot.MAIN_GRAPH,))):
        payload = load_payload(pth)
        net = cpu_package.compiled_net(payload)
        for graph in graphs:
            cpu_package._aot_compile(net, payload, graph)
    (cnn_batch, cnn_main), (one, batch1), (vit_batch, vit_main) = seen
    assert (cnn_batch, one, vit_batch) == (cpu_package.TUNED_BATCH, 1, 2)
    assert cnn_main["freezing"] and batch1["freezing"] and vit_main["freezing"]
    for options in (cnn_main, batch1):
        assert options["max_autotune"] and set(options["max_autotune_gemm_backends"].split(",")) == {"CPP", "ATEN"}
    assert "max_autotune" not in vit_main
    printed = EXPORT_STDERR[packaged_cnn]  # the real export of the fixture, both graphs autotuned
    assert "AUTOTUNE" not in printed and "Autotune Choices" not in printed, printed[-2000:]


def test_load_model_maps_the_pth_and_reads_its_weights_only_for_the_eager_network(packaged_cnn, monkeypatch):
    """With the package serving, the .pth's tensors are mapped, never read (ViT-L/14: 1.2 GB neither read nor
    held); without it, the eager network gets them read into memory, not left mapped to the file."""
    loads, read = [], payload_module._torch_load
    monkeypatch.setattr(payload_module, "_torch_load", lambda path, mmap=False: loads.append(mmap) or read(path, mmap))
    assert fc.load_model(packaged_cnn, device="cpu").backend.name == "cpu-package"
    assert loads == [True]
    loads.clear()
    assert fc.load_model(packaged_cnn, device="cpu", backend="eager").backend.name == "eager"
    assert loads == [True, False]


def test_a_pth_in_torchs_legacy_format_still_loads(tiny_cnn_pth, tmp_path):
    """torch maps only its zip format: a .pth saved in the older one is read as before."""
    legacy = tmp_path / "cnn_flowers.pth"
    torch.save(load_payload(tiny_cnn_pth), legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    x = _images(2)
    assert torch.allclose(fc.load_model(legacy, device="cpu").probabilities(x),
                          fc.load_model(tiny_cnn_pth, device="cpu", backend="eager").probabilities(x))


def test_a_package_from_before_the_batch1_graph_still_serves(packaged_cnn, tmp_path):
    """A package whose metadata names no graphs (written before there were two) is served by its main graph."""
    pth = tmp_path / "cnn_flowers.pth"
    shutil.copy(packaged_cnn, pth)
    shutil.copy(aot.cpu_package_path(packaged_cnn), aot.cpu_package_path(pth))
    _rewrite_meta(aot.cpu_package_path(pth), graphs=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fc.load_model(pth, device="cpu")
    assert model.backend.package.batch1 is None
    x = _images(1)
    assert torch.allclose(model.probabilities(x), fc.load_model(pth, backend="eager").probabilities(x), atol=1e-4)


def _rewrite_meta(package, **changes) -> None:
    """The same package with some of our metadata changed (as if built elsewhere)."""
    with zipfile.ZipFile(package) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(package, "w") as z:
        for name, data in entries.items():
            if name.endswith(aot.PACKAGE_META):  # a change to None removes the key
                meta = {k: v for k, v in {**json.loads(data), **changes}.items() if v is not None}
                data = json.dumps(meta).encode()
            z.writestr(name, data)


def _copy_package(packaged_cnn, tmp_path):
    pth = tmp_path / "cnn_flowers.pth"
    shutil.copy(packaged_cnn, pth)
    shutil.copy(aot.cpu_package_path(packaged_cnn), aot.cpu_package_path(pth))
    return pth


@pytest.mark.parametrize("change, reason", [
    (dict(torch="2.0.0"), "compiled with torch 2.0.0"),
    (dict(architecture="riscv64"), "compiled for riscv64 CPUs"),
    (dict(cpu_features=["avx2", "an_isa_this_cpu_lacks"]), r"instructions this one lacks \(an_isa_this_cpu_lacks;"),
    (dict(cpu_features=None), "older export.py.*CPU features"),  # from before they were recorded: unknown
    (dict(weights_sha256="0" * 64), "other weights than cnn_flowers.pth"),
])
def test_a_package_that_does_not_fit_is_skipped_with_a_warning(packaged_cnn, tmp_path, change, reason):
    pth = _copy_package(packaged_cnn, tmp_path)
    _rewrite_meta(aot.cpu_package_path(pth), **change)
    with pytest.warns(UserWarning, match=reason) as record:
        model = fc.load_model(pth, device="cpu")
    assert model.backend.name == "eager"  # eager, and it still predicts
    assert "export.py" in str(record[0].message) and "--cpu-package" in str(record[0].message)
    assert model.probabilities(_images(1)).shape == (1, 5)
    with pytest.raises(fc.ModelFileError, match=reason):
        fc.load_model(pth, device="cpu", backend="cpu-package")


def test_a_package_is_refused_on_a_cpu_without_an_extension_it_was_compiled_for(packaged_cnn, tmp_path,
                                                                             monkeypatch):
    """Inductor compiles with -march=native: a package built on a CPU with, say, AVX-512 VNNI or AMX may use them,
    and on a CPU of the same ATen capability ("AVX512") without them it would die with SIGILL. Here: this CPU,
    as if it lacked the last extension the package was built with."""
    pth = _copy_package(packaged_cnn, tmp_path)
    lost = aot.read_package_meta(aot.cpu_package_path(pth))["cpu_features"][-1]
    caps = dict(torch.cpu.get_capabilities())
    older = types.MappingProxyType({**caps, lost.split("=")[0]: False if "=" not in lost else -1})
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: older)
    with pytest.warns(UserWarning, match=rf"instructions this one lacks \({lost};.*could crash") as record:
        model = fc.load_model(pth, device="cpu")
    assert model.backend.name == "eager" and f"export.py {pth} --cpu-package" in str(record[0].message)
    with pytest.raises(fc.ModelFileError, match=f"lacks \\({lost};"):
        fc.load_model(pth, device="cpu", backend="cpu-package")


def test_a_temperature_only_re_export_keeps_the_package(packaged_cnn, tmp_path):
    """The package computes logits from the weights; the temperature divides them outside it."""
    pth = _copy_package(packaged_cnn, tmp_path)
    payload = load_payload(pth)
    payload[payload_module.TEMPERATURE_KEY] = 1.7
    torch.save(payload, pth)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fc.load_model(pth, device="cpu")
    assert model.backend.name == "cpu-package" and model.temperature == 1.7
    x = _images(2)
    assert torch.allclose(model.probabilities(x), (model.logits(x) / 1.7).softmax(-1), atol=1e-6)


def test_new_weights_in_the_pth_make_the_old_package_stale(packaged_cnn, tmp_path, tiny_cnn_pth):
    pth = tmp_path / "cnn_flowers.pth"
    shutil.copy(aot.cpu_package_path(packaged_cnn), aot.cpu_package_path(pth))
    payload = load_payload(tiny_cnn_pth)
    payload["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    torch.save(payload, pth)
    with pytest.warns(UserWarning, match="other weights"):
        assert fc.load_model(pth, device="cpu").backend.name == "eager"


def test_a_damaged_package_is_skipped_with_a_warning(packaged_cnn, tmp_path):
    pth = tmp_path / "cnn_flowers.pth"
    shutil.copy(packaged_cnn, pth)
    aot.cpu_package_path(pth).write_bytes(b"not a zip archive")
    with pytest.warns(UserWarning, match="not a CPU package"):
        assert fc.load_model(pth, device="cpu").backend.name == "eager"


def test_cpu_package_true_without_a_package_names_the_command(tiny_cnn_pth, tmp_path):
    pth = tmp_path / "cnn_flowers.pth"
    shutil.copy(tiny_cnn_pth, pth)
    with pytest.raises(fc.ModelFileError, match=r"export\.py .*--cpu-package"):
        fc.load_model(pth, device="cpu", backend="cpu-package")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no package, default: eager, silently (nothing was asked for)
        assert fc.load_model(pth, device="cpu").backend.name == "eager"


def _failing_compile(error: Exception):
    def compile(*args, **kwargs):
        raise error
    return compile


@pytest.mark.parametrize("failure, says, never", [
    (_failing_compile(InvalidCxxCompiler("g++")), r"C\+\+ compiler is missing or failed.*g\+\+", "not supported"),
    (_failing_compile(InductorError(CppCompileError(["g++"], "internal compiler error"), None)),
     r"C\+\+ compiler is missing or failed.*internal compiler error", "not supported"),
    (None, rf"torch {re.escape(torch.__version__)} is not supported by --cpu-package.*aot_compile", "C++ compiler"),
    (_failing_compile(RuntimeError("a lowering bug")), "compiling the CPU package failed.*a lowering bug",
     "C++ compiler"),
], ids=["no compiler", "compiler error", "inductor api moved", "other failure"])
def test_a_failed_compile_writes_nothing_and_names_its_cause(tiny_cnn_pth, tmp_path, monkeypatch, capsys, failure,
                                                            says, never):
    """Only a missing or failing compiler is blamed on the compiler; an Inductor API that moved (here: gone, as
    after a torch upgrade) names the torch version."""
    pth = tmp_path / "cnn_flowers.pth"
    shutil.copy(tiny_cnn_pth, pth)
    if failure is None:
        monkeypatch.delattr(torch._inductor, "aot_compile")
    else:
        monkeypatch.setattr(torch._inductor, "aot_compile", failure)
    assert commands.export([str(pth), "--cpu-package"]) == 2
    err = capsys.readouterr().err
    assert re.search(says, err, re.S) and never not in err and "nothing was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn_flowers.pth"]  # no package, no temp file


def test_a_package_that_disagrees_with_pytorch_is_not_written(tiny_cnn_pth, tmp_path, monkeypatch):
    """Also: the graphs are traced from the rewritten network (small-map depthwise convolutions as dense mixes),
    and the compiled result is checked against the network as it is, not against the rewrite."""
    pth = tmp_path / "cnn_flowers.pth"
    shutil.copy(tiny_cnn_pth, pth)
    traced, checked, trace_graph = [], [], cpu_package._aot_compile
    # traced for real, not compiled (the fixture's export compiles): the check below is what fails
    monkeypatch.setattr(torch._inductor, "aot_compile", lambda *args, **kwargs: [])
    monkeypatch.setattr(cpu_package, "load_cpu_package", lambda *args: None)
    monkeypatch.setattr(cpu_package, "_aot_compile", lambda net, *args: traced.append(net) or trace_graph(net, *args))
    monkeypatch.setattr(cpu_package, "_max_prob_diff", lambda runner, net, payload: checked.append(net) or 0.5)
    with pytest.raises(aot.CpuPackageError, match="disagrees with PyTorch"):
        cpu_package.compile_cpu_package(load_payload(pth), pth)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn_flowers.pth"]
    assert traced and all(_count(net, cpu_package.SmallMapDepthwiseConv) > 0 for net in traced)
    assert _count(checked[0], cpu_package.SmallMapDepthwiseConv) == 0 and _count(checked[0], torch.nn.Conv2d) > 0


def _count(net: torch.nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


@pytest.mark.parametrize("kernel,map_size", [(7, (4, 4)), (7, (2, 2)), (7, (1, 1)), (3, (3, 4)), (5, (4, 2))])
@pytest.mark.parametrize("bias", [True, False])
def test_a_small_map_depthwise_conv_computes_the_convolution(kernel, map_size, bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, kernel, padding=kernel // 2, groups=6, bias=bias)
    dense = cpu_package.SmallMapDepthwiseConv(conv, *map_size)
    x = torch.randn(3, 6, *map_size)
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            assert torch.allclose(dense(x.contiguous(memory_format=layout)), conv(x), atol=1e-5)
        with pytest.raises(ValueError, match="built for"):
            dense(torch.randn(1, 6, 5, 5))
    with pytest.raises(ValueError, match="stride-1 depthwise"):
        cpu_package.SmallMapDepthwiseConv(torch.nn.Conv2d(6, 12, 3, padding=1, groups=6), 4, 4)


def test_only_depthwise_convs_on_small_maps_are_rewritten(tiny_cnn_pth):
    """convnextv2_atto at 64 px: stages on 16x16, 8x8, 4x4 and 2x2 maps; only the last two's go dense."""
    payload = load_payload(tiny_cnn_pth)
    net, eager = cpu_package.compiled_net(payload), cpu_package.eager_cpu_net(payload)
    rewritten = [m for m in net.modules() if isinstance(m, cpu_package.SmallMapDepthwiseConv)]
    assert rewritten and all(h * w <= cpu_package.SMALL_MAP for h, w in (m.map_size for m in rewritten))
    seen = []

    def record(conv, args):
        seen.append(args[0].shape[-2:])
    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if cpu_package.is_depthwise(m)]
    x = _images(2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out, expected = net(x), eager(x)
    for hook in hooks:
        hook.remove()
    assert seen and all(h * w > cpu_package.SMALL_MAP for h, w in seen)  # the convolutions left run on larger maps
    assert len(rewritten) == _count(eager, torch.nn.Conv2d) - _count(net, torch.nn.Conv2d)  # nothing else changed
    assert torch.allclose(out, expected, atol=1e-5)


def test_the_clip_family_compiles_and_serves_too(tiny_vit_pth, tmp_path):
    require(shutil.which("g++") is not None or shutil.which("c++") is not None,
            "compiling a CPU package needs a C++ compiler (apt-get install g++)")
    pth = tmp_path / "vit_flowers.pth"
    shutil.copy(tiny_vit_pth, pth)
    _, diff = cpu_package.compile_cpu_package(load_payload(pth), pth)
    assert diff < cpu_package.PACKAGE_TOLERANCE
    compiled, eager = fc.load_vit_model(pth, device="cpu"), fc.load_model(pth, device="cpu", backend="eager")
    assert compiled.backend.name == "cpu-package" and compiled.model_name == TINY_CLIP
    # its patch embedding compiles as a Linear: no convolution left, so one graph serves every batch size
    assert aot.read_package_meta(aot.cpu_package_path(pth))["graphs"] == [aot.MAIN_GRAPH]
    assert compiled.backend.package.batch1 is None
    for n in (3, 1):
        x = _images(n)
        assert torch.allclose(compiled.probabilities(x), eager.probabilities(x), atol=1e-4)


def test_the_eager_network_is_built_only_when_grad_cam_asks(packaged_cnn, real_photos):
    from flowers_classifier.explain import grad_cam
    model = fc.load_model(packaged_cnn, device="cpu")
    fc.predict(model, real_photos["tulip"][0])
    assert not model.backend.eager_built  # predicting never built (nor held) the eager model
    eager_heat = grad_cam(fc.load_model(packaged_cnn, device="cpu", backend="eager"), real_photos["tulip"][0])
    heat = grad_cam(model, real_photos["tulip"][0])
    assert model.backend.eager_built and model.backend.name == "cpu-package"  # built for Grad-CAM; the package serves
    assert heat.shape == eager_heat.shape and abs(heat - eager_heat).max() < 1e-4
