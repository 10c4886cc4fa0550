"""safetensors written with the hash on the way, read once into a verified buffer, tensors as views."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from shared.durable_files import file_digest
from shared.models.safetensors_io import (
    CorruptFile,
    SafetensorsError,
    read_verified,
    tensors_from_buffer,
    write_safetensors,
)


def some_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(7, 5, generator=g),
        "norm.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 3, generator=g).to(torch.float16),
        "steps": torch.tensor([1, 2, 3], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous: written as its values
    }


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_written_file_is_safetensors_and_its_digest_is_the_files(tmp_path, algorithm):
    tensors = some_tensors()
    path = tmp_path / "model.safetensors"
    hex_, size = write_safetensors(path, tensors, algorithm, metadata={"format": "pt"})
    assert (hex_, size) == file_digest(path, algorithm)
    loaded = load_file(str(path))  # the safetensors library reads it
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


def test_read_verified_then_views_equal_what_was_written(tmp_path):
    tensors = some_tensors()
    path = tmp_path / "model.safetensors"
    hex_, size = write_safetensors(path, tensors, "blake3")
    buf = read_verified(path, hex_, size, "blake3")
    views = tensors_from_buffer(buf)
    assert views.keys() == tensors.keys()
    for name, t in tensors.items():
        assert views[name].dtype == t.dtype and torch.equal(views[name], t), name
    # views, not copies: the float32 tensor shares the buffer's memory
    buf_start = buf.ctypes.data
    assert buf_start <= views["embed.weight"].data_ptr() < buf_start + len(buf)


def test_buffer_written_by_the_safetensors_library_reads_the_same():
    tensors = some_tensors()
    data = save({k: v.contiguous() for k, v in tensors.items()})
    views = tensors_from_buffer(np.frombuffer(bytearray(data), dtype=np.uint8))
    for name, t in tensors.items():
        assert torch.equal(views[name], t), name


def test_a_changed_byte_or_size_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    hex_, size = write_safetensors(path, some_tensors(), "blake3")
    with pytest.raises(CorruptFile, match="bytes, the manifest says"):
        read_verified(path, hex_, size + 1, "blake3")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFile, match="does not match its blake3 digest"):
        read_verified(path, hex_, size, "blake3")


def _buffer(header: dict, data: bytes) -> np.ndarray:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return np.frombuffer(bytearray(struct.pack("<Q", len(raw)) + raw + data), dtype=np.uint8)


@pytest.mark.parametrize(
    ("header", "data", "problem"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "cover 8 of the 12"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "8 bytes for shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            "starts at byte",
        ),
        ({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "known dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "negative"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "starts at byte 4"),
    ],
)
def test_a_header_that_does_not_describe_the_bytes_is_refused(header, data, problem):
    with pytest.raises(SafetensorsError, match=problem):
        tensors_from_buffer(_buffer(header, data))


def test_header_longer_than_the_buffer_is_refused():
    buf = np.frombuffer(bytearray(struct.pack("<Q", 1 << 40) + b"{}"), dtype=np.uint8)
    with pytest.raises(SafetensorsError, match="does not fit"):
        tensors_from_buffer(buf)


def test_cast_writes_floating_tensors_in_the_new_dtype_only(tmp_path):
    tensors = some_tensors()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, tensors, "blake3", cast=torch.bfloat16)
    loaded = load_file(str(path))
    for name, t in tensors.items():
        want = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert loaded[name].dtype == want.dtype and torch.equal(loaded[name], want), name
