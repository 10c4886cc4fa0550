"""The CPU image's lock file (deploy/docker/requirements-cpu.lock, written by deploy/docker/lock.py):
every package pinned to one version with a sha256, every runtime requirement of pyproject.toml (its
dependencies and the cpu extra) present at a version its specifier allows, and the Dockerfile
installing exactly the lock (hashes required, nothing resolved besides)."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[3]
DOCKER = REPO / "deploy" / "docker"


def lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_lock", DOCKER / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_locked_package_has_one_version_and_a_sha256():
    locked = lock_module().read_lock(DOCKER / "requirements-cpu.lock")
    assert len(locked) > 50
    for name, (version, hashes) in locked.items():
        assert version and hashes, name
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name


def test_the_lock_holds_every_runtime_requirement_at_an_allowed_version():
    locked = lock_module().read_lock(DOCKER / "requirements-cpu.lock")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for raw in [*project["dependencies"], *project["optional-dependencies"]["cpu"]]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} (pyproject.toml) is not in the lock: run deploy/docker/lock.py cpu"
        version = locked[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name}: the lock has {version}, pyproject.toml asks {req.specifier}: run deploy/docker/lock.py cpu"
        )
    assert "setuptools" in locked  # the project is built without build isolation, from the lock
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(locked)  # builds that break the CPU torch


def test_the_cpu_image_installs_the_lock_and_nothing_else():
    dockerfile = (DOCKER / "Dockerfile.cpu").read_text()
    assert "pip install --require-hashes --no-deps -r requirements-cpu.lock" in dockerfile
    installs = re.findall(r"pip install [^\n]*", dockerfile)
    assert all("--no-deps" in line for line in installs), installs
    assert "!deploy/docker/requirements-cpu.lock" in (DOCKER / "Dockerfile.cpu.dockerignore").read_text()
