"""Offline wheelhouse: every wheel a machine that already has PyTorch (but no network) needs to train with
flowers_fastai and serve with flowers_classifier, downloaded on a connected machine into one folder.

    python -m flowers_fastai.wheelhouse DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64 ...]
                                            [--exclude torch,torchvision,...] [--extras train[,demo,onnx]]

then, on the offline machine: pip install --no-index --find-links DIR 'flowers-fastai[train]'

How the set is found (pip cannot resolve dependencies for a foreign interpreter with --no-deps, and a plain
`pip download` with dependencies would download torch and its CUDA wheels, gigabytes, even to resolve:
this pip fetches whole wheels for their metadata):

1. The project's own wheel is built from this checkout (`pip wheel --no-deps`, from a copy of the source so
   that build/ and *.egg-info stay out of it).
2. Every name the target already has (`--exclude`, default torch, torchvision, torchaudio) gets *stub* wheels:
   empty wheels with no dependencies, one per version the index offers for the target (`pip index versions`)
   or only the version given as `name==version` (then also a constraint). Their local version label
   (+9999.wheelhouse.stub) sorts above any real build of the same version, so pip's resolver takes the stub:
   torch's dependencies (the nvidia-*, cuda-* and triton wheels) never enter the resolution and nothing of
   torch is downloaded (a real wheel of an excluded name in the download is an error).
3. `pip download --only-binary=:all:` with the target's --python-version/--platform resolves and downloads
   the project wheel with its extras, stubs in --find-links, into a staging folder.
4. pip evaluates environment markers for the interpreter it runs under, not the target's. So the closure is
   walked again here from the project's requirements, with the target's markers (python_version,
   sys_platform, platform_machine, ...): wheels only the running interpreter needed are dropped, and a
   requirement only the target has (e.g. `x; python_version >= "3.12"`) is added as a root and step 3 runs
   again. Excluded names (and glob patterns such as nvidia-*) end the walk, so what only they need is left
   out too. CUDA wheels (nvidia-*, cuda-*, triton) are always left out: they come with torch.
5. The kept wheels go into DIR with MANIFEST.txt (requirements format: each wheel pinned, its file, size and
   what requires it) and a summary with the install command is printed.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from flowers_classifier.errors import FlowersError

PROJECT = "flowers-fastai"
SOURCE = Path(__file__).resolve().parents[1]  # the checkout holding this module: the project wheel is built from it
# What "a machine with PyTorch" has: torch's CUDA dependencies come with it (CUDA_PATTERNS, always left out).
DEFAULT_EXCLUDE = ("torch", "torchvision", "torchaudio")
CUDA_PATTERNS = ("nvidia-*", "cuda-*", "triton", "pytorch-triton*")
DEFAULT_EXTRAS = ("train",)
STUB_LABEL = "9999.wheelhouse.stub"  # a numeric first segment sorts above +cpu, +cu130, +xpu and small numbers
MANIFEST = "MANIFEST.txt"
MAX_PASSES = 4  # resolution passes: each adds the requirements only the target's markers asked for


class WheelhouseError(FlowersError):
    """A wrong option or a failed step, with what to do about it."""


@dataclass(frozen=True)
class Exclusion:
    """A distribution the target already has: a canonical name or a glob pattern, optionally a version."""

    name: str
    version: str | None = None

    @property
    def is_pattern(self) -> bool:
        return any(c in self.name for c in "*?[")


@dataclass
class Wheel:
    """One downloaded wheel and its metadata."""

    path: Path
    name: str
    version: str
    requires: list[Requirement]
    required_by: list[str] = field(default_factory=list)

    @property
    def is_stub(self) -> bool:
        return self.version.endswith("+" + STUB_LABEL)


# --------------------------------------------------------------------------- options


def parse_excludes(text: str) -> list[Exclusion]:
    """'torch==2.11.0,torchvision,nvidia-*' -> Exclusions. An empty string excludes nothing beyond the CUDA
    wheels. A version keeps only its public part (2.11.0+cu128 -> 2.11.0): the stub carries its own label."""
    found = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, version = item.partition("==")
        if not re.fullmatch(r"[A-Za-z0-9*?\[\]._-]+", name) or (sep and not version):
            raise WheelhouseError(f"--exclude {item!r}: give a distribution name, name==version or a glob pattern "
                                  f"such as nvidia-*, separated by commas (e.g. --exclude torch==2.11.0,torchvision)")
        exclusion = Exclusion(canonicalize_name(name) if "*" not in name else name.lower(), None)
        if version:
            try:
                public = Version(version).public
            except InvalidVersion:
                raise WheelhouseError(f"--exclude {item!r}: {version!r} is not a version") from None
            if exclusion.is_pattern:
                raise WheelhouseError(f"--exclude {item!r}: a pattern cannot carry a version")
            exclusion = Exclusion(exclusion.name, public)
        if exclusion.name == PROJECT:
            raise WheelhouseError(f"--exclude {item!r}: the wheelhouse is for {PROJECT}; it cannot leave it out")
        found.append(exclusion)
    return found


def parse_extras(text: str, available: list[str]) -> list[str]:
    """'train,demo' -> ['train', 'demo'], each one of the project's extras."""
    extras = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in extras if e not in available]
    if unknown:
        raise WheelhouseError(f"--extras {text!r}: no extra named {', '.join(unknown)}; the project's extras are "
                              f"{', '.join(available)} (none: --extras '')")
    return extras


def check_python_version(text: str) -> str:
    """'3.12' -> '3.12'; the project needs 3.10 or newer."""
    if not re.fullmatch(r"3\.\d{1,2}", text):
        raise WheelhouseError(f"--python-version {text!r}: give the target's major.minor version, e.g. 3.12")
    if Version(text) < Version("3.10"):
        raise WheelhouseError(f"--python-version {text}: {PROJECT} needs Python 3.10 or newer")
    return text


def expand_platforms(platforms: list[str]) -> list[str]:
    """Each tag and the older tags a machine that accepts it also accepts, which pip does not add itself:
    manylinux_2_28_x86_64 -> manylinux_2_28 ... manylinux_2_5 and the aliases manylinux2014/2010/1 (many wheels
    are only tagged manylinux2014). Other tags (musllinux, win, macosx: pip expands macOS) stay as given."""
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    expanded: list[str] = []
    for tag in platforms:
        if not re.fullmatch(r"[a-z0-9_]+", tag):
            raise WheelhouseError(f"--platform {tag!r}: give a wheel platform tag such as manylinux_2_28_x86_64, "
                                  f"manylinux_2_28_aarch64, win_amd64 or macosx_11_0_arm64")
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag) or re.fullmatch(r"(manylinux(?:2014|2010|1))_(\w+)", tag)
        if not m:
            expanded.append(tag)
            continue
        glibc = int(m.group(1)) if m.group(1).isdigit() else {v: k for k, v in legacy.items()}[m.group(1)]
        for minor in range(glibc, 4, -1):
            expanded.append(f"manylinux_2_{minor}_{m.group(2)}")
            if minor in legacy:
                expanded.append(f"{legacy[minor]}_{m.group(2)}")
    return list(dict.fromkeys(expanded))


def platform_environment(platform: str) -> dict[str, str]:
    """The marker values a platform tag fixes: sys_platform, platform_system, os_name, platform_machine."""
    if m := re.fullmatch(r"(?:many|musl)linux\w*?_((?:x86_64|aarch64|i686|ppc64le|s390x|armv7l|riscv64))", platform):
        return dict(sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine=m.group(1))
    if m := re.fullmatch(r"linux_(\w+)", platform):
        return dict(sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine=m.group(1))
    if m := re.fullmatch(r"win_?(\w*)", platform):
        machine = {"amd64": "AMD64", "arm64": "ARM64", "32": "x86", "": "x86"}.get(m.group(1), m.group(1))
        return dict(sys_platform="win32", platform_system="Windows", os_name="nt", platform_machine=machine)
    if m := re.fullmatch(r"macosx_\d+_\d+_(\w+)", platform):
        return dict(sys_platform="darwin", platform_system="Darwin", os_name="posix", platform_machine=m.group(1))
    raise WheelhouseError(f"--platform {platform}: unknown platform tag; give e.g. manylinux_2_28_x86_64, "
                          f"manylinux_2_28_aarch64, win_amd64 or macosx_11_0_arm64")


def target_environment(python_version: str | None, platforms: list[str]) -> dict[str, str]:
    """The environment markers of the target: this interpreter's, with the target's Python and platform."""
    env = dict(default_environment())
    if python_version and python_version != env["python_version"]:
        env.update(python_version=python_version, python_full_version=f"{python_version}.0",
                   implementation_version=f"{python_version}.0")
    if platforms:
        machines = {tuple(sorted(platform_environment(p).items())) for p in platforms}
        if len(machines) > 1:
            raise WheelhouseError(f"--platform {' '.join(platforms)}: these tags are for different systems or "
                                  f"processors; build one wheelhouse per kind of machine")
        env.update(platform_environment(platforms[0]))
        env.update(platform_release="", platform_version="")  # unknown for another machine; none of ours reads them
    return env


# --------------------------------------------------------------------------- exclusion and closure


def is_excluded(name: str, exclusions: list[Exclusion]) -> bool:
    """Whether the distribution `name` is one the target has (an --exclude name or pattern) or a CUDA wheel."""
    name = canonicalize_name(name)
    patterns = [e.name for e in exclusions] + list(CUDA_PATTERNS)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def closure(roots: list[tuple[Requirement, str]], wheels: dict[str, Wheel], exclusions: list[Exclusion],
            env: dict[str, str]) -> tuple[dict[str, Wheel], list[tuple[Requirement, str]]]:
    """Walk the requirements from `roots` ((requirement, who asks) pairs) through the downloaded `wheels`,
    markers evaluated for the target `env`, not into excluded names. Returns the wheels reached, each with
    who requires it, and the requirements no wheel satisfies (missing, or a version pip did not pick)."""
    kept: dict[str, Wheel] = {}
    unmet: list[tuple[Requirement, str]] = []
    seen: set[tuple[str, str]] = set()
    todo = list(roots)
    while todo:
        req, wanted_by = todo.pop(0)
        name = canonicalize_name(req.name)
        if is_excluded(name, exclusions):
            continue
        wheel = wheels.get(name)
        if wheel is None or not req.specifier.contains(wheel.version, prereleases=True):
            unmet.append((req, wanted_by))
            continue
        if name not in kept:
            kept[name] = wheel
            wheel.required_by = []
        if wanted_by not in wheel.required_by:
            wheel.required_by.append(wanted_by)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            label = f"{name}[{extra}]" if extra else name
            todo += [(dep, label) for dep in wheel.requires
                     if dep.marker is None or dep.marker.evaluate(env | {"extra": extra})]
    return kept, unmet


def read_wheel(path: Path) -> Wheel:
    """Name, version and Requires-Dist from the wheel's METADATA."""
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        metadata = next((n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if metadata is None:
            raise WheelhouseError(f"{path.name} has no .dist-info/METADATA: not a wheel pip can install")
        headers = Parser().parsestr(zf.read(metadata).decode("utf-8"), headersonly=True)
    requires = [Requirement(r) for r in headers.get_all("Requires-Dist", [])]
    return Wheel(path, canonicalize_name(name), str(version), requires)


def make_stub(name: str, version: str, dest: Path) -> Path:
    """An empty wheel `name==version+9999.wheelhouse.stub` with no dependencies: stands, during resolution, for
    a distribution the target already has."""
    dist = re.sub(r"[-_.]+", "_", name)
    full = f"{version}+{STUB_LABEL}"
    info = f"{dist}-{full}.dist-info"
    path = dest / f"{dist}-{full}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {full}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: flowers_fastai.wheelhouse\nRoot-Is-Purelib: true\n"
                                     "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


# --------------------------------------------------------------------------- pip


def pip(args: list[str], what: str) -> str:
    """Run this interpreter's pip; its output on failure, in the error."""
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WheelhouseError(f"{what} failed (pip exit {proc.returncode}): {' '.join(cmd)}\n"
                              f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def target_args(python_version: str | None, platforms: list[str]) -> list[str]:
    """pip's options for the target interpreter: wheels only (pip cannot build an sdist for another interpreter,
    and the offline machine should build nothing), CPython of that version, those platforms (none: this
    machine's)."""
    args = ["--only-binary=:all:"]
    if python_version:
        args += ["--python-version", python_version, "--implementation", "cp"]
    for platform in platforms:
        args += ["--platform", platform]
    return args


def stub_versions(exclusion: Exclusion, target: list[str]) -> list[str]:
    """The versions to stub: the one given, else every version the index has for the target."""
    if exclusion.version:
        return [exclusion.version]
    out = pip(["index", "versions", exclusion.name, *target], f"listing the versions of {exclusion.name}")
    line = next((ln for ln in out.splitlines() if ln.startswith("Available versions:")), None)
    if line is None:
        raise WheelhouseError(f"pip index versions {exclusion.name} printed no 'Available versions:' line; give the "
                              f"target's version with --exclude {exclusion.name}==VERSION")
    return list(dict.fromkeys(Version(v.strip()).public for v in line.split(":", 1)[1].split(",") if v.strip()))


def copy_source(dest: Path) -> Path:
    """What the build reads: pyproject.toml, the top-level files (README.md) and the packages it lists."""
    pyproject = project_metadata()
    dest.mkdir(parents=True)
    for item in SOURCE.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    for pkg in pyproject["tool"]["setuptools"]["packages"]:
        shutil.copytree(SOURCE / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def project_metadata() -> dict:
    pyproject = SOURCE / "pyproject.toml"
    if not pyproject.is_file():
        raise WheelhouseError(f"no pyproject.toml in {SOURCE}: the wheelhouse builds {PROJECT}'s wheel from its "
                              f"source, so run it from a clone of the project (python -m flowers_fastai.wheelhouse)")
    return tomllib.loads(pyproject.read_text())


def build_project_wheel(work: Path) -> Path:
    """The project's wheel (pure Python, any platform). Built with this environment's setuptools when it has
    one (no download); otherwise pip fetches the build backend as usual."""
    out = work / "project"
    no_isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    pip(["wheel", "--no-deps", *no_isolation, "-q", "-w", str(out), str(copy_source(work / "src"))],
        f"building the {PROJECT} wheel")
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise WheelhouseError(f"building the {PROJECT} wheel gave {len(wheels)} wheels in {out}, expected one")
    return wheels[0]


# --------------------------------------------------------------------------- the wheelhouse


def resolve(project: Path, extras: list[str], exclusions: list[Exclusion], python_version: str | None,
            platforms: list[str], work: Path) -> tuple[dict[str, Wheel], dict[str, Wheel]]:
    """Download the project's closure for the target into work/stage; return (kept, left out) by name."""
    target = target_args(python_version, expand_platforms(platforms))
    env = target_environment(python_version, platforms)
    stubs, stage = work / "stubs", work / "stage"
    stubs.mkdir()
    for exclusion in exclusions:
        if not exclusion.is_pattern:
            for version in stub_versions(exclusion, target):
                make_stub(exclusion.name, version, stubs)
    # A stub only outranks a real wheel of its own version: a pinned name must not resolve to a newer real one.
    pins = work / "excluded-versions.txt"
    pins.write_text("".join(f"{e.name}=={e.version}\n" for e in exclusions if e.version))
    wanted = f"{PROJECT}[{','.join(extras)}]" if extras else PROJECT
    roots = [(Requirement(f"{wanted} @ {project.resolve().as_uri()}"), "the wheelhouse")]
    for _ in range(MAX_PASSES):
        pip(["download", *target, "--find-links", str(stubs), "-c", str(pins), "--dest", str(stage),
             "--progress-bar", "off", *[str(req) for req, _ in roots]],
            "resolving and downloading the wheels (pip download)")
        wheels = {w.name: w for w in map(read_wheel, sorted(stage.glob("*.whl")))}
        fake = sorted(n for n, w in wheels.items() if is_excluded(n, exclusions) and not w.is_stub
                      and not any(fnmatch.fnmatchcase(n, p) for p in CUDA_PATTERNS))
        if fake:
            raise WheelhouseError(f"pip picked real wheels for the excluded {', '.join(fake)} over the stubs; report "
                                  f"this, and meanwhile give their versions: --exclude NAME==VERSION")
        kept, unmet = closure(roots, wheels, exclusions, env)
        if not unmet:
            return kept, {n: w for n, w in wheels.items() if n not in kept and not w.is_stub}
        # Requirements only the target's markers ask for: pip resolved for this interpreter. Resolve them too,
        # as roots without their marker (already evaluated, for the target).
        known = {str(r) for r, _ in roots}
        new = [(r, by) for r, by in ((without_marker(r), by) for r, by in unmet) if str(r) not in known]
        if not new:
            break
        roots += new
    listed = "; ".join(f"{r} (required by {by})" for r, by in unmet)
    raise WheelhouseError(f"no downloaded wheel satisfies {listed}: the requirements of the target conflict with "
                          f"what pip resolved; try another --python-version/--platform or report this")


def without_marker(req: Requirement) -> Requirement:
    copy = Requirement(str(req))
    copy.marker = None
    return copy


def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WheelhouseError(f"DIR {out} exists and is not an empty folder: give a new or empty folder (an old "
                              f"wheelhouse's wheels would mix with the new ones)")


def install_command(out: Path, extras: list[str]) -> str:
    wanted = f"{PROJECT}[{','.join(extras)}]" if extras else PROJECT
    return f"pip install --no-index --find-links {out} '{wanted}'"


def write_manifest(out: Path, kept: dict[str, Wheel], header: list[str]) -> Path:
    """MANIFEST.txt in requirements format: each wheel pinned, with its file, size and who requires it."""
    lines = [f"# {line}" for line in header] + [""]
    for name, wheel in sorted(kept.items()):
        size = wheel.path.stat().st_size / 1e6
        lines.append(f"{name}=={wheel.version}  # {wheel.path.name}, {size:.2f} MB; "
                     f"required by {', '.join(wheel.required_by)}")
    path = out / MANIFEST
    path.write_text("\n".join(lines) + "\n")
    return path


def build_wheelhouse(out: Path, python_version: str | None = None, platforms: list[str] | None = None,
                     exclusions: list[Exclusion] | None = None, extras: list[str] | None = None) -> dict[str, Path]:
    """Write the wheelhouse into `out`: the project's wheel and its closure for the target, less `exclusions`;
    returns {name: wheel path} and writes out/MANIFEST.txt."""
    platforms = platforms or []
    exclusions = [Exclusion(n) for n in DEFAULT_EXCLUDE] if exclusions is None else exclusions
    extras = list(DEFAULT_EXTRAS) if extras is None else extras
    check_output_dir(out)
    target_environment(python_version, platforms)  # validates the platforms before any download
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        work = Path(tmp)
        project = build_project_wheel(work)
        kept, left_out = resolve(project, extras, exclusions, python_version, platforms, work)
        out.mkdir(parents=True, exist_ok=True)
        for wheel in kept.values():
            wheel.path = Path(shutil.move(wheel.path, out / wheel.path.name))
    header = [f"Offline wheelhouse for {PROJECT}, built by python -m flowers_fastai.wheelhouse",
              f"python {python_version or sysconfig.get_python_version()}, platform "
              f"{' '.join(platforms) or 'of the machine that built it (' + sysconfig.get_platform() + ')'}",
              f"extras: {','.join(extras) or 'none'}",
              "left out (the target has them; CUDA wheels come with torch): "
              + ", ".join([e.name + (f"=={e.version}" if e.version else "") for e in exclusions] + list(CUDA_PATTERNS)),
              f"install: {install_command(out, extras)}"]
    if left_out:
        header.append("downloaded but not needed by the target: " + ", ".join(sorted(left_out)))
    write_manifest(out, kept, header)
    return {name: wheel.path for name, wheel in kept.items()}


if __name__ == "__main__":  # `python -m flowers_fastai.wheelhouse`, the command the offline docs give
    from .cli import wheelhouse

    sys.exit(wheelhouse())
