"""The three layers import only downward: `flowers_classifier` (the runtime: torch, timm, open_clip, PIL) never
imports the trainer `flowers_fastai`, the apps `flowers_apps` or their libraries; the apps (the demo) never import
the trainer or fastai; the project's modules import each other without cycles, and the
runtime installs on its own (its declared dependencies, nothing from the [train] or [demo] extras) and
predicts with a model the trainer exported. What only writes a model (ONNX export, compiling the CPU package,
pretrained weights) is the trainer's: the runtime's source never imports it, and loading and predicting with
every backend imports none of it, in the project's .venv and in the runtime's own.

The install test builds a fresh virtual environment offline in seconds: the runtime's dependency closure is
read from the metadata of the distributions installed in the project's .venv and symlinked into the new
environment's site-packages (torch is gigabytes; copying or downloading it is out of the question), then the
project itself is pip-installed from a copy of its source, without extras.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import subprocess
import sys
import sysconfig
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_CNN, builders_imported_by_serving
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from flowers_classifier.classes import CLASSES
from flowers_classifier.payload import INT8, QUANTIZE_KEY, load_payload
from flowers_fastai.hub import write_model_files
from flowers_fastai.onnx_export import export_onnx
from flowers_fastai.wheelhouse import copy_source  # what a build of the project reads, copied (no build/ in the repo)

PACKAGES = ("flowers_classifier", "flowers_fastai", "flowers_apps")
# What only the [train]/[demo] extras bring: the runtime must install and work without any of them.
TRAINER_LIBS = ("fastai", "fastcore", "gradio", "pandas", "matplotlib")
# ... nor import the trainer, which ships in the same distribution (installed, but unusable without [train]).
TRAINER_ONLY = ("flowers_fastai", *TRAINER_LIBS)
# The apps serve through the runtime's public API, beside the trainer: never it, nor fastai.
NOT_FOR_APPS = ("flowers_fastai", "fastai", "fastcore")
# What only builds a model: onnx, onnxscript and torch.onnx write ONNX, ONNX Runtime's quantiser writes int8 ONNX;
# torch.export and Inductor compile the CPU package.
BUILDER_IMPORTS = ("onnx", "onnxscript", "onnxruntime.quantization", "torch.onnx", "torch.export", "torch._inductor")
# The Hub client (pretrained weights, models by Hub id): in the runtime, only flowers_classifier/hub.py imports it,
# and only inside the functions that resolve an "hf-hub:" id.
HUB_CLIENT, HUB_MODULE = "huggingface_hub", ROOT / "flowers_classifier" / "hub.py"
EXPORT_LIBS = ("onnx", "onnxscript")  # the [onnx] extra less ONNX Runtime: writing an .onnx needs them, serving not


# ---------------------------------------------------------------------------------------------------------
# Imports read from the source with `ast`: every import statement, at module level or inside a function.


def module_name(path: Path) -> str:
    """flowers_classifier/payload.py -> flowers_classifier.payload; a package's __init__.py -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) per import in the file, relative imports resolved to absolute module names;
    `import a.b` gives ("a.b", []), `from a import b, c` gives ("a", ["b", "c"])."""
    name = module_name(path)
    # The package a relative import starts from: the module's parent, or the package itself for __init__.
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                assert len(base) == len(package) - (node.level - 1), \
                    f"{path.relative_to(ROOT)}:{node.lineno}: relative import climbs above the top-level package"
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [alias.name for alias in node.names]
            if target:
                found.append((node.lineno, target, names))
            else:  # `from .. import x` from a top-level package's module: each name is a top-level module
                found += [(node.lineno, n, []) for n in names]
    return found


def is_within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def imports_of(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """`file:line imports module` for each import in `package`'s source that falls within `forbidden`."""
    files = sorted((ROOT / package).rglob("*.py"))
    assert (ROOT / package / "__init__.py") in files, f"no package {package} under {ROOT}"
    offenders = []
    for path in files:
        for line, module, names in imported_modules(path):
            # `from x import y` may name a submodule y: check both x and x.y.
            for candidate in [module] + [f"{module}.{n}" for n in names]:
                if is_within(candidate, forbidden):
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {candidate}")
    return sorted(set(offenders))


def test_runtime_never_imports_the_trainer_or_the_apps():
    offenders = imports_of("flowers_classifier", (*TRAINER_ONLY, "flowers_apps"))
    assert not offenders, "the runtime imports the layers above it or their libraries:\n" + "\n".join(offenders)


def test_the_apps_use_the_runtime_never_the_trainer():
    offenders = imports_of("flowers_apps", NOT_FOR_APPS)
    assert not offenders, "the apps import the trainer or fastai:\n" + "\n".join(offenders)
    assert not imports_of("flowers_fastai", ("flowers_apps",)), "the trainer imports the apps"


def test_no_package_hides_its_imports_behind_getattr():
    """A module-level __getattr__ in a package's __init__ is the lazy-import net the layers make unneeded."""
    nets = [pkg for pkg in PACKAGES
            if any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
                   for node in ast.parse((ROOT / pkg / "__init__.py").read_text()).body)]
    assert not nets, f"lazy imports in {nets}' __init__.py"


def test_the_runtime_imports_no_builder():
    """Compiling a CPU package, writing ONNX and pretrained weights are the trainer's (flowers_fastai.cpu_package,
    .onnx_export, .pretrained): no runtime module imports what they need, at module level or in a function."""
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {candidate}"
                 for path in sorted((ROOT / "flowers_classifier").rglob("*.py"))
                 for line, module, names in imported_modules(path)
                 for candidate in [module] + [f"{module}.{n}" for n in names] if is_within(candidate, BUILDER_IMPORTS)]
    assert not offenders, "the runtime imports what only builds a model:\n" + "\n".join(sorted(set(offenders)))


def function_level_lines(path: Path) -> set[int]:
    """The lines of the import statements inside functions (they run when the function is called)."""
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    return {node.lineno for f in functions for node in ast.walk(f) if isinstance(node, ast.Import | ast.ImportFrom)}


def test_the_runtime_imports_the_hub_client_only_lazily_in_its_hub_module():
    """Loading a .pth or a folder needs no Hub client: huggingface_hub is imported by flowers_classifier/hub.py
    alone, inside its functions (those that resolve an "hf-hub:" id), never at module level."""
    found, offenders = [], []
    for path in sorted((ROOT / "flowers_classifier").rglob("*.py")):
        lazy = function_level_lines(path)
        for line, module, names in imported_modules(path):
            if any(is_within(c, (HUB_CLIENT,)) for c in [module] + [f"{module}.{n}" for n in names]):
                found.append(path)
                if path != HUB_MODULE or line not in lazy:
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert HUB_MODULE in found, f"{HUB_MODULE.relative_to(ROOT)} imports no {HUB_CLIENT}: the check sees nothing"
    assert not offenders, "the runtime imports huggingface_hub outside hub.py's functions:\n" + "\n".join(offenders)


def served_models(pth: Path, out: Path) -> list[Path]:
    """`pth`, a copy of it that asks for int8 and its fp32 ONNX export, in `out`: a model for each backend that
    load_model's defaults serve without a compiler (the CPU package: tests/test_cpu_package.py)."""
    payload = load_payload(pth)
    onnx_path, _ = export_onnx(payload, out / f"{pth.stem}.onnx")
    int8 = out / f"{pth.stem}_int8.pth"
    torch.save({**payload, QUANTIZE_KEY: INT8}, int8)
    return [pth, int8, onnx_path]


def test_serving_every_backend_imports_no_builder(tiny_cnn_pth, tiny_vit_pth, real_flowers, tmp_path):
    """... nor the Hub client's download code, for a Hub folder either (loaded by path)."""
    folder = tmp_path / "hub"
    write_model_files(load_payload(tiny_vit_pth), folder)
    models = served_models(tiny_cnn_pth, tmp_path) + [tiny_vit_pth, folder]
    models.append(export_onnx(load_payload(tiny_vit_pth), tmp_path / "vit_int8.onnx", int8=True)[0])
    photo = sorted((real_flowers / "rose").glob("*.jpg"))[0]
    assert builders_imported_by_serving(models, photo) == []


# ---------------------------------------------------------------------------------------------------------
# Cycles between the project's own modules.


def script_lines(path: Path) -> set[int]:
    """The lines of `if __name__ == "__main__":` blocks (`python -m pkg.mod` runs them in another module)."""
    lines = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("__name__ == '__main__'", "'__main__' == __name__"):
            lines |= set(range(node.lineno, node.end_lineno + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (function-level imports included: still dependencies).

    Importing `pkg.x` (`from .x import f`, `import pkg.x`) is an edge to `pkg.x` only, not to `pkg` as well,
    although Python runs pkg/__init__.py first: when a submodule imports a sibling, `pkg` is already in
    sys.modules (its __init__ is what is importing the submodule), so the __init__ -> submodule -> sibling
    chain is no cycle at runtime. Counting it would make every package that re-exports from its submodules a
    cycle. An edge to `pkg` is only drawn when a name is taken from the package itself (`from pkg import f`,
    f not a submodule), which does read the half-initialised __init__ and is a real cycle if __init__
    imports back."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        script_only = script_lines(path)
        for line, module, names in imported_modules(path):
            if line in script_only:  # runs in the module `__main__`, not in `name`: no edge of `name`
                continue
            if names:
                # `from pkg import x`: the module pkg.x when it is one, else a name defined in pkg.
                deps |= {f"{module}.{n}" if f"{module}.{n}" in modules else module for n in names}
            else:
                # `import a.b.c`: the deepest project module on that path (a.b.c, else a.b, ...).
                parts = module.split(".")
                deps |= {next((m for m in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if m in modules),
                              module)}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: depth-first search, a back edge to a module on the stack."""
    state: dict[str, str] = {}  # "active" while on the stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "active"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "active":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_the_cycle():
    """The detector itself: a cycle through three modules is found and named, an acyclic graph passes."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert {"flowers_classifier", "flowers_classifier.inference", "flowers_fastai.train"} <= graph.keys(), \
        f"the project's modules were not all found: {sorted(graph)}"
    # Sanity: the re-exports of flowers_classifier/__init__ are edges, so a cycle through them would show.
    assert "flowers_classifier.inference" in graph["flowers_classifier"], "the import graph misses known edges"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between the project's modules: " + " -> ".join(cycle or [])


# ---------------------------------------------------------------------------------------------------------
# The runtime alone, installed in a fresh environment.


def installed_distributions(site: Path) -> dict[str, md.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in md.distributions(path=[str(site)])}


def dependency_closure(requirements: list[str], dists: dict[str, md.Distribution]) -> dict[str, md.Distribution]:
    """Every installed distribution `requirements` need, transitively, extras included (torch wants
    cuda-toolkit[cublas,...]); requirements whose marker is false here (other platforms, extras nobody asked
    for) are left out."""
    closure: dict[str, md.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "pyproject.toml") for r in requirements]
    while todo:
        req, wanted_by = todo.pop()
        name = canonicalize_name(req.name)
        assert name in dists, f"{req} (required by {wanted_by}) is not installed in {sys.prefix}"
        dist = closure.setdefault(name, dists[name])
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for dep in map(Requirement, dist.requires or []):
                if dep.marker is None or dep.marker.evaluate({"extra": extra}):
                    todo.append((dep, f"{name}[{extra}]" if extra else name))
    return closure


def link_distributions(wanted: dict[str, md.Distribution], every: dict[str, md.Distribution],
                       site: Path, new_site: Path) -> None:
    """Symlink the files of the `wanted` distributions from site-packages into new_site. A directory that
    holds files of one distribution only is linked whole; one shared between distributions (namespace dirs
    such as nvidia/, nvidia/cu13/lib/, cuda/, __pycache__/) is made a real directory and its entries are
    linked one level down, so that the files of an unwanted distribution never appear in new_site."""
    owners: dict[tuple[str, ...], set[str]] = defaultdict(set)  # path prefix -> distributions with files in it
    children: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for name, dist in every.items():
        for file in dist.files or ():
            parts = file.parts
            if not parts or parts[0] == "..":  # console scripts in bin/: not needed to import anything
                continue
            for i in range(len(parts)):
                owners[parts[:i + 1]].add(name)
                children[parts[:i]].add(parts[i])
    missing = [name for name, dist in wanted.items() if not dist.files]
    assert not missing, f"these distributions list no files (no RECORD), they cannot be linked: {missing}"

    def mirror(prefix: tuple[str, ...]) -> None:
        for child in sorted(children[prefix]):
            path = prefix + (child,)
            if not owners[path] & wanted.keys():
                continue
            src, dst = site.joinpath(*path), new_site.joinpath(*path)
            if len(owners[path]) == 1 or not src.is_dir():
                dst.symlink_to(src, target_is_directory=src.is_dir())
            else:
                dst.mkdir()
                mirror(path)

    mirror(())


def linked_venv(venv: Path, wanted: dict[str, md.Distribution], every: dict[str, md.Distribution],
                site: Path) -> tuple[Path, Path]:
    """A new venv without pip at `venv` holding the `wanted` distributions of `site`, symlinked (link_distributions);
    (its python, its site-packages)."""
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv], "creating the venv",
        env=clean_env())
    python = venv / "bin" / "python"
    new_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        "locating the venv's site-packages").stdout.strip())
    link_distributions(wanted, every, site, new_site)
    return python, new_site


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would let the outer .venv or the repo leak in: no PYTHONPATH, no
    user site-packages, no pip configuration; hub downloads refused, so any network access fails loudly."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP") and not k.startswith("PIP_")}
    return env | {"PYTHONNOUSERSITE": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1",
                  "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", **extra}


def run(cmd: list, what: str, **kwargs) -> subprocess.CompletedProcess:
    """Run cmd, capturing its output; fail the test with that output when it exits non-zero."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
                                  f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def runtime_imports(pyproject: dict) -> list[str]:
    """Every runtime module and every third-party module its source imports, lazily imported ones included
    (open_clip is only imported for CLIP models, so predicting with a CNN would not notice it missing), less
    the optional ONNX backend (the [onnx] extra, imported only when an .onnx model is used)."""
    onnx = {canonicalize_name(Requirement(r).name) for r in pyproject["project"]["optional-dependencies"]["onnx"]}
    providers = {m: {canonicalize_name(d) for d in ds} for m, ds in md.packages_distributions().items()}
    wanted = set()
    for name, path in project_modules().items():
        if not is_within(name, ("flowers_classifier",)):
            continue
        if name != "flowers_classifier.__main__":  # runs the CLI on import
            wanted.add(name)
        for _, module, _ in imported_modules(path):
            top = module.split(".")[0]
            optional = bool(providers.get(top)) and providers[top] <= onnx
            if not (top in sys.stdlib_module_names or top in PACKAGES or optional):
                wanted.add(top)
    return sorted(wanted)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv holding the runtime's dependency closure and ONNX Runtime's (symlinked from .venv), pip and
    setuptools, and the project installed without extras, offline."""
    tmp = tmp_path_factory.mktemp("runtime")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    site = Path(sysconfig.get_paths()["purelib"])
    every = installed_distributions(site)
    runtime = dependency_closure(pyproject["project"]["dependencies"], every)
    leaked = sorted(set(runtime) & {canonicalize_name(n) for n in TRAINER_LIBS})
    assert not leaked, f"the runtime's dependencies pull in trainer-only distributions: {leaked}"
    # pip to install and check; setuptools because the project builds with it (--no-build-isolation).
    tools = dependency_closure(["pip", *pyproject["build-system"]["requires"]], every)
    # ONNX Runtime alone, the serving half of the [onnx] extra: an .onnx is served without onnx or onnxscript.
    serving = dependency_closure(["onnxruntime"], every)
    assert not set(serving) & set(EXPORT_LIBS), f"onnxruntime pulls in {sorted(set(serving) & set(EXPORT_LIBS))}"

    venv = tmp / "venv"
    python, _ = linked_venv(venv, runtime | tools | serving, every, site)

    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "--no-cache-dir",
         "-q", copy_source(tmp / "src")], "installing the project without extras", env=clean_env(), cwd=tmp)
    return venv


@pytest.fixture(scope="module")
def exported_cnn(tmp_path_factory, real_flowers) -> Path:
    """A from-scratch convnextv2_atto trained one epoch at 32 px by train.py in the project's .venv."""
    tmp = tmp_path_factory.mktemp("export")
    run([sys.executable, "train.py", "--arch", "cnn", "--model", TINY_CNN, "--no-pretrained",
         "--data", real_flowers, "--img-size", "32", "--epochs", "1", "--bs", "16", "--patience", "0",
         "--out", tmp / "run", "--export", tmp / "cnn.pth"], "train.py", cwd=ROOT)
    assert (tmp / "cnn.pth").is_file(), f"train.py --export wrote no {tmp / 'cnn.pth'}"
    return tmp / "cnn.pth"


@pytest.mark.slow
def test_runtime_installs_and_predicts_without_fastai(runtime_venv, exported_cnn, real_flowers, tmp_path):
    python = runtime_venv / "bin" / "python"
    # cwd is an empty folder, not the repo, so the source tree cannot shadow the installed package.
    in_venv = dict(env=clean_env(), cwd=tmp_path)

    importable = run([python, "-c", "import importlib.util as u, sys; "
                                    "print(' '.join(m for m in sys.argv[1:] if u.find_spec(m)))",
                      *TRAINER_LIBS, *EXPORT_LIBS],
                     "looking for trainer and exporter modules in the venv", **in_venv).stdout.split()
    assert not importable, f"the runtime venv can import trainer-only or export-only libraries: {importable}"

    modules = runtime_imports(tomllib.loads((ROOT / "pyproject.toml").read_text()))
    assert {"torch", "timm", "open_clip", "flowers_classifier.cli"} <= set(modules), f"too few modules: {modules}"
    run([python, "-c", "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]", *modules],
        "importing the runtime's modules and everything they import, in the runtime venv", **in_venv)

    # Every requirement of every distribution in the venv is met: the closure and the declared deps are complete.
    run([python, "-m", "pip", "check"], "pip check in the runtime venv", **in_venv)

    photo = sorted((real_flowers / "rose").glob("*.jpg"))[0]
    code = ("import sys, flowers_classifier as fc; m = fc.load_cnn_model(sys.argv[1]); "
            "print(fc.predict(m, sys.argv[2])); print(fc.__file__); "
            "print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] in sys.argv[3:])))")
    lines = run([python, "-c", code, exported_cnn, photo, *TRAINER_ONLY], "predicting in the runtime venv",
                **in_venv).stdout.splitlines()
    assert len(lines) >= 3, f"unexpected output from the prediction script: {lines}"
    label, package_file, trainer_modules = lines[-3:]
    assert label in CLASSES, f"predict returned {label!r}, not one of {CLASSES}"
    assert Path(package_file).resolve().is_relative_to(runtime_venv.resolve()), \
        f"flowers_classifier was imported from {package_file}, not from the runtime venv {runtime_venv}"
    assert not trainer_modules, f"predicting imported trainer modules: {trainer_modules}"

    out = run([python, "-m", "flowers_classifier", photo, "--model", exported_cnn], "python -m flowers_classifier",
              **in_venv).stdout.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{photo}\t"), f"expected one result line for {photo}, got {out}"
    top = out[0].split("\t")[1].split()[0]
    assert top in CLASSES, f"python -m flowers_classifier printed {out[0]!r}: {top!r} is not a class"

    # Every backend it has the packages for (eager, int8, ONNX Runtime) loads and predicts, importing no builder.
    assert builders_imported_by_serving(served_models(exported_cnn, tmp_path), photo, python, **in_venv) == []
