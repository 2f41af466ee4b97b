"""Serving the ahead-of-time compiled CPU form of a payload: `<name>.cpu.pt2` beside `<name>.pth`, which
`load_model` serves on the CPU by default (`load_cpu_package`). Compiling it is an export concern
(`export.py --cpu-package`, `flowers_fastai.cpu_package`: a C++ compiler and a minute or more); loading it
takes torch alone and a few seconds at most. The archive's format (its graphs, the metadata we add) is defined
here and written by the builder through `package_meta`/`write_package_meta`.

A package is only valid where it was built: the same weights (a sha256 of the state dict's tensors and of the
spec fields that shape the graph, so a re-export that changes only the temperature keeps it), the same torch
version (AOTInductor's ABI) and a CPU with every instruction set extension of the one that compiled it:
Inductor compiles with `-march=native` (torch._inductor.config.cpp.march) plus the vector ISA it detected there,
so the code may use any extension that CPU has (torch.cpu.get_capabilities(), recorded at build): a package built
on a Sapphire Rapids is refused on a Skylake instead of dying there with SIGILL. `load_cpu_package` checks all
three before it loads anything and otherwise says which one differs; `load_model` then serves the eager model and
warns once, naming the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import zipfile
from pathlib import Path

import torch

from .errors import FlowersError
from .payload import CPU_PACKAGE_SUFFIX, ModelFileError

PACKAGE_META = "extra/flowers_fastai.json"  # our entry in the .pt2 archive: what it was built from and for
MAIN_GRAPH, BATCH1_GRAPH = "model", "batch1"  # the graphs' names in the archive (AOTInductor's default first)
GRAPH_KEYS = ("family", "model_name", "image_size", "quick_gelu", "classes")  # spec fields a package depends on


class CpuPackageError(FlowersError, ValueError):
    """A CPU package cannot be built or used. The message says why and what to do."""


def cpu_package_path(weights_path: str | os.PathLike) -> Path:
    """models/cnn_flowers.pth -> models/cnn_flowers.cpu.pt2 (where export writes it and load_model looks)."""
    path = Path(weights_path)
    return path.with_name(path.stem + CPU_PACKAGE_SUFFIX)


def weights_sha256(payload: dict) -> str:
    """The sha256 of what a package computes: the state dict's tensors (names, dtypes, shapes, bytes) and the
    spec fields that shape the graph (GRAPH_KEYS); not the temperature, preprocessing or int8 request, which act
    outside it. A mapped payload's tensors are read through the file, not copied."""
    digest = hashlib.sha256(json.dumps({k: payload.get(k) for k in GRAPH_KEYS}, sort_keys=True).encode())
    for name, tensor in sorted(payload["state_dict"].items()):
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cpu_features() -> list[str]:
    """This CPU's instruction set extensions as torch's cpuinfo reports them (avx2, avx512_vnni, amx_tile, ...;
    an SVE machine's vector length as sve_max_length=N): what code compiled with -march=native here may use."""
    caps = torch.cpu.get_capabilities()
    return sorted([k for k, v in caps.items() if v is True] +
                  [f"{k}={v}" for k, v in caps.items() if k.endswith("_max_length") and isinstance(v, int)])


def build_target() -> dict:
    """What a package is compiled for: the torch version and the CPU (its architecture and extensions; its name
    and ATen's capability for the messages)."""
    return dict(torch=torch.__version__, architecture=platform.machine(), cpu_features=cpu_features(),
                cpu=torch.cpu.get_capabilities().get("cpu_name", "unknown"),
                cpu_capability=torch.backends.cpu.get_cpu_capability())


class PackageForward:
    """The compiled forward of a package: (N, 3, H, W) fp32 -> (N, num_classes) logits, one image through the
    batch-1 graph where the package has one, any other batch through the main graph. Each graph is AOTInductor's
    C++ runner, called with the one input tensor it was exported with. (torch's Python wrapper,
    `torch._inductor.package.load_package`, adds a pytree round trip per call and the import of Inductor at
    load, seconds; it also loads every graph of the archive for each one asked for.)"""

    def __init__(self, main, batch1=None):
        self.main, self.batch1 = main, batch1  # torch._C._aoti.AOTIModelPackageLoader: run([x]) -> [logits]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        runner = self.batch1 if self.batch1 is not None and x.shape[0] == 1 else self.main
        return runner.run([x])[0]


def _load_runner(path: str | os.PathLike, graphs: list[str]) -> PackageForward:
    runners = {name: torch._C._aoti.AOTIModelPackageLoader(str(path), name, False, 1, -1) for name in graphs}
    return PackageForward(runners[MAIN_GRAPH], runners.get(BATCH1_GRAPH))


def read_package_meta(path: str | os.PathLike) -> dict:
    """Our metadata from a .cpu.pt2 (without loading its code); ModelFileError if it is not one of ours."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith(f"/{PACKAGE_META}"))
            return json.loads(z.read(name))
    except (OSError, StopIteration, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not a CPU package written by `export.py --cpu-package` "
                             f"({type(e).__name__}: {e})") from e


def package_meta(payload: dict, payload_path: str | os.PathLike, graphs: list[str]) -> dict:
    """What a package built here from `payload` (the one written at `payload_path`) records about what it was
    built from and for: read back by `read_package_meta` and checked by `package_mismatch`."""
    return dict(build_target(), weights_sha256=weights_sha256(payload), payload_file=Path(payload_path).name,
                family=payload["family"], model_name=payload["model_name"], image_size=int(payload["image_size"]),
                graphs=list(graphs))


def write_package_meta(path: str | os.PathLike, meta: dict) -> None:
    """Add `meta` to the .pt2 archive at `path`, inside its one top folder, where `read_package_meta` looks."""
    with zipfile.ZipFile(path, "a") as z:
        z.writestr(f"{z.namelist()[0].split('/')[0]}/{PACKAGE_META}", json.dumps(meta))


def package_mismatch(meta: dict, payload: dict, payload_path: str | os.PathLike) -> str | None:
    """Why a package cannot serve `payload` (read from `payload_path`) on this machine, or None when it can."""
    if meta.get("torch") != torch.__version__:  # first: the rest is only asked of the torch that built it
        return f"it was compiled with torch {meta.get('torch')}, this is torch {torch.__version__}"
    here = build_target()
    if "cpu_features" not in meta or "weights_sha256" not in meta:
        return ("it was written by an older export.py, which did not record the CPU features it was compiled for "
                "(it could crash this CPU)")
    if meta.get("architecture") != here["architecture"]:
        return f"it was compiled for {meta.get('architecture')} CPUs, this one is {here['architecture']}"
    missing = sorted(set(meta["cpu_features"]) - set(here["cpu_features"]))
    if missing:
        return (f"it was compiled for a CPU with instructions this one lacks ({', '.join(missing)}; built on "
                f"{meta.get('cpu')}, this is {here['cpu']}): its code could crash here")
    if meta["weights_sha256"] != weights_sha256(payload):
        return f"it was compiled from other weights than {Path(payload_path).name} holds now"
    return None


def load_cpu_package(path: str | os.PathLike, payload: dict, payload_path: str | os.PathLike) -> PackageForward:
    """The compiled forward (N, 3, H, W) fp32 -> (N, num_classes) logits of the package at `path`, checked
    against the payload it must serve (read from `payload_path`); CpuPackageError saying why it cannot be used."""
    meta = read_package_meta(path)
    reason = package_mismatch(meta, payload, payload_path)
    if reason:
        raise CpuPackageError(f"{path}: {reason}")
    try:
        return _load_runner(path, meta.get("graphs", [MAIN_GRAPH]))
    except Exception as e:  # noqa: BLE001 - a damaged archive or library: the eager model still serves
        raise CpuPackageError(f"{path}: cannot be loaded ({type(e).__name__}: {str(e)[:300]})") from e
